"""``python -m portal.testing [pytest args]``: the test command's second half (``dev.py test`` runs it).

Starts throw-away real Redis servers on free loopback ports (unless TEST_REDIS_URL names one to use), points
REDIS_URL at them, runs pytest and stops the servers. pytest's exit code is returned, so no tests run (exit code 5)
or any failure fails the command.

The suite runs in ``TEST_PROCESSES`` pytest-xdist workers (default: 3, or 1 on a single CPU), each with a Redis
server of its own (``TEST_REDIS_URLS``; tests/conftest.py points each worker at its own, or at its own database
number of TEST_REDIS_URL) and a database of its own (pytest-django's per-worker suffix). Most of the suite's time is
spent waiting on real processes (timeouts, leases, captions that take a while), so three workers cut it by a third
even on two cores. ``TEST_PROCESSES=1`` (or ``-n`` given explicitly, or ``-p no:xdist``) runs it as one process.

Tests marked ``alone`` measure timings under a load they set up themselves (the exit drill's two CPU burners): they
run afterwards, in a second pytest run of one process, so the rest of the suite is not part of their load. A run
whose selection holds no test of one of the two halves counts only the other (pytest's "no tests ran" is an error
only when neither ran any). An explicit ``-m`` runs one pytest as asked.

Everything the run starts carries ``PORTAL_TEST_RUN=<a mark of this run>`` in its environment: pytest, its xdist
workers and every process a test starts (workers in sessions of their own too). When the run ends, however it ends
(a SIGTERM or SIGHUP to this command, a terminal's Ctrl-C, a crash of pytest), whatever still carries the mark is
stopped: SIGTERM, a bounded wait, then SIGKILL; then the Redis servers (redis-server writes its process title over
its environment, so they are stopped by pid).
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from portal.embedded_redis import RedisServer, free_port

RUN_MARK = "PORTAL_TEST_RUN"
STOP_GRACE = 10.0  # seconds the run's processes get between SIGTERM and SIGKILL when the run is stopped


class Stopped(SystemExit):
    """This command got SIGTERM or SIGHUP: its exit code is the shell's for a process ended by that signal."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)


def _stop_on_signal(signum, frame):
    for each in (signal.SIGTERM, signal.SIGHUP):  # once: a resent signal must not cut the clean-up short
        signal.signal(each, signal.SIG_IGN)
    raise Stopped(signum)


def main(argv: list[str]) -> int:
    environment = dict(os.environ)
    environment.setdefault("IMAGE_FETCH_ALLOW_PRIVATE", "true")
    environment.setdefault("NOTIFY_ALLOW_PRIVATE", "true")  # the tests' receivers listen on 127.0.0.1
    environment.setdefault("PORTAL_LOCAL", "true")
    environment.pop("RQ_REDIS_URL", None)
    processes = int(environment.get("TEST_PROCESSES") or (3 if (os.cpu_count() or 1) > 1 else 1))
    explicit = any(arg == "-n" or arg.startswith("--numprocesses") or arg.startswith("-n") and arg[2:].isdigit()
                   or arg == "no:xdist" for arg in argv)
    if processes > 1 and not explicit:
        # worksteal: each worker starts with an even share of the tests, and one that runs out takes half of what
        # the busiest has left. xdist's default (load) hands out runs of consecutive tests, so the drills of one
        # file (30 to 95 s each) could queue up on one worker while the others sat idle at the end.
        parallel = ["-n", str(processes), "--dist", "worksteal"]
    else:
        processes, parallel = 1, []
    if any(arg == "-m" or arg.startswith("-m") and len(arg) > 2 for arg in argv):
        runs = [[*parallel, *argv]]
    else:
        runs = [[*parallel, "-m", "not alone", *argv], ["-p", "no:xdist", "-m", "alone", *argv]]
    mark = environment[RUN_MARK] = uuid.uuid4().hex
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop_on_signal)
    with tempfile.TemporaryDirectory(prefix="portal-test-") as directory:
        environment.setdefault("PORTAL_VAR_DIR", os.path.join(directory, "var"))
        servers = []
        try:
            if environment.get("TEST_REDIS_URL"):
                base = environment["TEST_REDIS_URL"].rstrip("/")
                base = base.rsplit("/", 1)[0] if base.rsplit("/", 1)[-1].isdigit() else base
                urls = [f"{base}/{index}" for index in range(processes)]
            else:
                for index in range(processes):
                    servers.append(RedisServer(os.path.join(directory, f"redis-{index}"), port=free_port(),
                                               appendonly=False).start())
                urls = [server.url for server in servers]
                print(f"Test Redis: {', '.join(urls)} ({servers[0].command()[0]})", flush=True)
            environment["REDIS_URL"] = urls[0]
            environment["TEST_REDIS_URLS"] = ",".join(urls)
            codes = []
            for arguments in runs:
                if len(runs) > 1:
                    print(f"=== pytest {' '.join(arguments[:len(arguments) - len(argv)])} ===", flush=True)
                codes.append(_pytest(arguments, environment))
            return combined(codes)
        finally:
            for signum in (signal.SIGTERM, signal.SIGHUP):  # a signal now must not cut the clean-up short
                signal.signal(signum, signal.SIG_IGN)
            # What carries the run's mark, and what descends from this command: pytest and everything under it while
            # it still runs (the Redis servers tests start write over their environment, so only their parents
            # name them), but not this command's own Redis servers, stopped gracefully below.
            own = {server.running_pid() for server in servers}
            found = {**marked_processes(RUN_MARK, mark),
                     **{pid: command_line(pid) for pid in descendants(os.getpid()) if pid not in own}}
            left = stop_processes(found, grace=STOP_GRACE)
            if left:
                print("Stopped what the run left running:\n"
                      + "\n".join(f"  {pid} {command[:200]}" for pid, command in left.items()), flush=True)
            for server in servers:
                server.stop()


def _pytest(arguments: list[str], environment: dict) -> int:
    child = subprocess.Popen([sys.executable, "-m", "pytest", *arguments], env=environment)
    try:
        return child.wait()
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reached pytest too (the whole foreground group): let it run its teardown and report,
        # then end the command (no second run).
        try:
            child.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
        raise


def marked_processes(variable: str, value: str) -> dict[int, str]:
    """Live processes (other than this one) whose environment carries ``variable=value``, with their command lines."""
    wanted = f"{variable}={value}".encode()
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as handle:
                if wanted not in handle.read().split(b"\0"):
                    continue
            found[int(entry.name)] = command_line(int(entry.name))
        except OSError:  # gone meanwhile, or a zombie (whose environment cannot be read)
            continue
    return found


def command_line(pid: int) -> str:
    """The process' command line as it shows it (``""`` once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def stop_processes(found: dict[int, str], *, grace: float) -> dict[int, str]:
    """SIGTERM to each of ``found`` ({pid: command line}), up to ``grace`` seconds for them to exit, then SIGKILL of
    what is left. Returns ``found``."""
    _signal_all(found, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in found):
        time.sleep(0.1)
    _signal_all([pid for pid in found if _alive(pid)], signal.SIGKILL)
    return found


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, their children...), read from /proc: processes in sessions of
    their own too, as long as their parents live."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            parent = parent_pid(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for its parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal_all(pids, signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


NO_TESTS = 5  # pytest's exit code when the selection held no test


def combined(codes: list[int]) -> int:
    """One exit code for the runs: the first failure's; "no tests ran" only when no run ran any."""
    failures = [code for code in codes if code not in (0, NO_TESTS)]
    if failures:
        return failures[0]
    return 0 if 0 in codes else NO_TESTS


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
