"""The test command: its two pytest runs (the suite, then the tests marked ``alone``) make one exit code, and a
stopped run leaves nothing running."""

import os
import signal
import subprocess
import sys
import time

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


def test_waits_to_be_stopped():
    # A child that ignores SIGTERM, in a session of its own as workers are: only the SIGKILL after the grace ends it.
    subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "time.sleep(600)"], start_new_session=True)
    with open(os.environ["PROBE_READY"], "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(600)
'''


def test_a_test_run_stopped_by_sigterm_leaves_nothing_running(tmp_path, settings):
    """SIGTERM to the test command (a CI timeout, a closed terminal) stops pytest, its xdist workers, every process a
    test started and the Redis servers, and exits 143; before, all of them outlived the command."""
    from portal import testing
    from portal.testing import command_line
    from tests.processes import MARK, descendants, kill_all, marked_processes, stop_process, wait_for

    (tmp_path / "test_probe.py").write_text(PROBE)
    ready = tmp_path / "ready"
    log = open(tmp_path / "run.log", "w+b")
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("TEST_REDIS_URL", "TEST_PROCESSES", "PYTEST_XDIST_WORKER")}
    runner = subprocess.Popen(
        [sys.executable, "-m", "portal.testing", str(tmp_path / "test_probe.py"), "-c", "pytest.ini",
         "--rootdir", str(settings.BASE_DIR), "-p", "no:cacheprovider", "-q"],
        cwd=settings.BASE_DIR, env={**environment, "TEST_PROCESSES": "2", "PROBE_READY": str(ready)},
        stdout=log, stderr=subprocess.STDOUT)
    runner.log = log
    servers = []
    try:
        wait_for(ready.exists, 120, "the probe test started under the test command")
        time.sleep(0.5)  # the probe's child is past its signal() call
        started = marked_processes(os.environ[MARK])  # pytest, two xdist workers, the probe's child
        assert len(started) >= 4, started
        servers = [pid for pid in descendants(runner.pid) if "redis-server" in command_line(pid)]
        assert len(servers) == 2, descendants(runner.pid)  # one per xdist worker (they rewrite their environment)
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(testing.STOP_GRACE + 30) == 128 + signal.SIGTERM
        assert marked_processes(os.environ[MARK]) == {}
        assert [pid for pid in servers if os.path.exists(f"/proc/{pid}")] == []
    finally:
        stop_process(runner)
        kill_all(pid for pid in servers if "redis-server" in command_line(pid))
