"""The test command: its two pytest runs (the suite, then the tests marked ``alone``) make one exit code, and a
stopped run leaves nothing running."""

import os
import signal
import subprocess
import sys
import time

import pytest

from portal.testing import NO_TESTS, combined


def test_a_failure_in_either_run_fails_the_command():
    assert combined([1, 0]) == 1
    assert combined([0, 1]) == 1
    assert combined([NO_TESTS, 2]) == 2


def test_no_tests_is_an_error_only_when_neither_run_ran_any():
    assert combined([0, NO_TESTS]) == 0
    assert combined([NO_TESTS, 0]) == 0
    assert combined([NO_TESTS, NO_TESTS]) == NO_TESTS


PROBE = '''
import os
import subprocess
import sys
import time

import pytest

from portal.embedded_redis import RedisServer, free_port


def test_waits_to_be_stopped(tmp_path):
    # A child that ignores SIGTERM, in a session of its own as workers are: only the SIGKILL after the grace ends it.
    subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "time.sleep(600)"], start_new_session=True)
    server = RedisServer(tmp_path / "redis", port=free_port(), appendonly=False).start()  # as the drills start theirs
    with open(os.environ["PROBE_READY"], "w") as handle:
        handle.write(str(server.process.pid))
    time.sleep(600)


@pytest.mark.alone
def test_alone():
    with open(os.environ["PROBE_READY"] + ".alone", "w") as handle:
        handle.write("ran")
'''


def start_probe(tmp_path, settings) -> subprocess.Popen:
    """The test command on PROBE with two xdist workers, in a session of its own (as a terminal's foreground job)."""
    (tmp_path / "test_probe.py").write_text(PROBE)
    log = open(tmp_path / "run.log", "w+b")
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("TEST_REDIS_URL", "TEST_PROCESSES", "PYTEST_XDIST_WORKER")}
    runner = subprocess.Popen(
        [sys.executable, "-m", "portal.testing", str(tmp_path / "test_probe.py"), "-c", "pytest.ini",
         "--rootdir", str(settings.BASE_DIR), "-p", "no:cacheprovider", "-q"],
        cwd=settings.BASE_DIR, env={**environment, "TEST_PROCESSES": "2", "PROBE_READY": str(tmp_path / "ready")},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # As a terminal's foreground job has it: a shell that started this suite in the background (`cmd &` in a
        # script) left SIGINT ignored, and an ignored signal stays ignored through exec.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    runner.log = log
    return runner


def probe_running(runner, tmp_path) -> tuple[int, list[int]]:
    """Once the probe test runs: (the Redis server it started, the command's own Redis servers)."""
    from portal.testing import command_line
    from tests.processes import MARK, descendants, marked_processes

    ready = tmp_path / "ready"
    deadline = time.monotonic() + 120  # a plain wait: this test has no database (tests.processes.wait_for uses it)
    while not (ready.exists() and ready.read_text()):
        assert time.monotonic() < deadline and runner.poll() is None, "the probe test never started"
        time.sleep(0.1)
    time.sleep(0.5)  # the probe's child is past its signal() call
    assert len(marked_processes(os.environ[MARK])) >= 4  # pytest, two xdist workers, the probe's child
    probes = int(ready.read_text())
    return probes, [pid for pid in descendants(runner.pid) if "redis-server" in command_line(pid) and pid != probes]


# pytest's own exit after a Ctrl-C, then the probe's child that ignores SIGTERM, each given STOP_GRACE, then the
# Redis servers: well inside this on a loaded machine (a run beside two CPU burners once took over 40 s).
ENDS_WITHIN = 120


def left_running(servers) -> list:
    from portal.testing import command_line
    from tests.processes import MARK, marked_processes

    return [*marked_processes(os.environ[MARK]),
            *(pid for pid in servers if "redis-server" in command_line(pid))]


@pytest.mark.parametrize("how", ["SIGTERM to the command", "Ctrl-C in its terminal"])
def test_a_stopped_test_run_leaves_nothing_running_and_runs_nothing_more(tmp_path, settings, how):
    """A SIGTERM to the test command (a CI timeout, timeout(1)) stops pytest, its xdist workers, every process a
    test started (the Redis servers tests start too, which write over their environment) and the command's own Redis
    servers, and exits 143; a Ctrl-C (SIGINT to the terminal's whole group) ends it without the second run. Before,
    a SIGTERM left all of them running."""
    from tests.processes import kill_all, stop_process

    runner, probe_server, own_servers = start_probe(tmp_path, settings), None, []
    try:
        probe_server, own_servers = probe_running(runner, tmp_path)
        assert len(own_servers) == 2  # one per xdist worker
        if how == "SIGTERM to the command":
            runner.send_signal(signal.SIGTERM)
            assert runner.wait(ENDS_WITHIN) == 128 + signal.SIGTERM
        else:
            os.killpg(runner.pid, signal.SIGINT)
            assert runner.wait(ENDS_WITHIN) != 0
            assert not (tmp_path / "ready.alone").exists(), "the tests marked alone ran after a Ctrl-C"
        time.sleep(0.2)  # the killed servers' parents reap them
        assert left_running([probe_server, *own_servers]) == []
    finally:
        stop_process(runner)
        kill_all(left_running([pid for pid in (probe_server, *own_servers) if pid]))
