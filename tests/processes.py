"""Real processes for tests: how every test stops what it started, supervisors (``manage.py runworkers``) with short
intervals, and helpers to watch them. Shared by every test that starts a process.

Every process a test starts carries ``PORTAL_TEST_PROCESS=<the test's mark>`` in its environment (tests/conftest.py
sets it in ``os.environ`` for the length of each test, and children inherit it: workers the supervisor starts in
sessions of their own too). After the test, anything still carrying the mark is SIGKILLed and the test fails, so a
leak is blamed on the test that made it, never on the next one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from django.conf import settings
from django.db import close_old_connections, connection

from portal import testing
from portal.testing import descendants, parent_pid  # noqa: F401 (the tests' helpers too)
from queues.fleet.services import fleet_workers
from tests.conftest import respond, subprocess_env


def wait_for(predicate, timeout: float, message: str, interval: float = 0.1):
    """``predicate()``'s first true value, polled every ``interval`` seconds. After ``timeout`` it fails, once the
    manage.py processes this test started have printed their threads' stacks into their output (which the test's
    report shows): where a supervisor or worker was when what the test waited for did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        close_old_connections()
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    mark = os.environ.get(MARK)
    if mark:
        dump_stacks(pid for pid, command in marked_processes(mark).items()
                    if "manage.py" in command and _running_for(pid) > 2)  # its SIGUSR2 handler is set by then
    raise AssertionError(f"timed out after {timeout} s: {message}")


def _running_for(pid: int) -> float:
    """Seconds since ``pid`` started (0 if it is gone)."""
    try:
        started = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return 0.0
    return uptime - started / os.sysconf("SC_CLK_TCK")


MARK = "PORTAL_TEST_PROCESS"


def marked_processes(mark: str) -> dict[int, str]:
    """Live processes whose environment carries ``PORTAL_TEST_PROCESS=mark``, with their command lines."""
    return testing.marked_processes(MARK, mark)


def dump_stacks(pids: Iterable[int]) -> None:
    """Asks each manage.py process in ``pids`` for the stacks of its threads (SIGUSR2, manage.py), before it is
    killed for not exiting: its output then shows where it was stuck."""
    asked = False
    for pid in pids:
        try:
            os.kill(pid, signal.SIGUSR2)
            asked = True
        except ProcessLookupError:
            pass
    if asked:
        time.sleep(1)  # faulthandler writes the dump from its signal handler, as soon as the process is scheduled


def kill_all(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def log_text(log) -> str:
    """All a process has written so far to its log file (``start_command``, ``Supervisors``), read without moving
    the file offset it shares with that process, which may still be writing."""
    return os.pread(log.fileno(), os.fstat(log.fileno()).st_size, 0).decode(errors="replace")


def start_command(*arguments: str, **environment: str) -> subprocess.Popen:
    """``manage.py ARGUMENTS`` with this test's Redis and database (and ``environment``), its output kept in a file
    that ``stop_process`` prints (pytest shows it for a failing test)."""
    from tests.conftest import subprocess_env

    log = tempfile.TemporaryFile()  # a pipe nobody reads would block the process once full
    process = subprocess.Popen([sys.executable, "manage.py", *arguments], cwd=settings.BASE_DIR,
                               env=subprocess_env(**environment), stdout=log, stderr=subprocess.STDOUT)
    process.log = log
    return process


def stop_process(process: subprocess.Popen, *, grace: float = 10.0,
                 sig: int | None = signal.SIGTERM) -> bool:
    """Stops a process a test started: ``sig`` (SIGTERM; None: the caller has signalled it already), up to ``grace``
    seconds for it to exit, then SIGKILL of it and of everything it started. Returns whether it exited by itself.
    Workers that a supervisor started in sessions of their own are found through /proc either way, and anything
    orphaned earlier through the test's mark. Prints what a process of ``start_command`` wrote."""
    exited = True
    if process.poll() is None:
        try:
            if sig is not None:
                process.send_signal(sig)
            process.wait(grace)
        except subprocess.TimeoutExpired:
            stuck = [*descendants(process.pid), process.pid]
            dump_stacks(stuck)
            kill_all(stuck)
            process.wait(10)
            exited = False
    log = getattr(process, "log", None)
    if log is not None and not log.closed:
        print(f"--- {' '.join(map(str, process.args))[:200]} (exit code {process.returncode}"
              f"{'' if exited else f', killed {grace} s after its stop signal'}):")
        print(log_text(log)[-20000:])
        log.close()
    return exited


def live_workers(pool: str = "default") -> list:
    return [row for row in fleet_workers() if row.alive and row.pool == pool]


class Supervisors:
    """Starts ``manage.py runworkers`` processes with short intervals; stops whatever is left at the end."""

    def __init__(self, **environment):
        self.environment = subprocess_env(**{"RQ_RETRY_BACKOFF": "0.2", **environment})
        self.processes: list[subprocess.Popen] = []
        self.logs: list = []

    def start(self, *extra) -> subprocess.Popen:
        # Output goes to a file: a pipe nobody reads would block the supervisor once full.
        log = tempfile.TemporaryFile()
        process = subprocess.Popen(
            [sys.executable, "manage.py", "runworkers", "--interval", "0.2", "--lease-ttl", "3",
             "--reconcile-interval", "1", "--worker-verbosity", "0", *extra],
            cwd=settings.BASE_DIR, env=self.environment, stdout=log, stderr=subprocess.STDOUT)
        self.logs.append(log)
        self.processes.append(process)
        return process

    def output(self) -> str:
        """What the supervisors and their workers printed (for a failing test's report)."""
        return "\n---\n".join(log_text(log) for log in self.logs)

    def stop_all(self, grace: float = 30.0):
        """SIGTERM to every supervisor, ``grace`` seconds for them all to exit (an idle fleet leaves in about a
        second), then SIGKILL of whatever is left with its workers. Prints what they wrote: pytest shows it for a
        failing test only."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        # No second signal: to a supervisor it means "stop now" (its workers' attempts are given back at once).
        stuck = [process.pid for process in self.processes
                 if not stop_process(process, grace=max(0.0, deadline - time.monotonic()), sig=None)]
        print(self.output()[-30000:])
        for log in self.logs:
            log.close()
        self.logs.clear()
        assert not stuck, f"supervisor(s) {stuck} had not exited {grace} s after SIGTERM: killed with their workers"


def slow_ollama(http_server, png_bytes, delay: float) -> str:
    http_server.route("/api/generate", respond(200, b'{"response": "A slow caption."}', "application/json",
                                               delay=delay))
    return http_server.route("/photo.png", respond(200, png_bytes(), "image/png"))




def freeze(pid: int, *, rows=(), attempts: int = 200) -> None:
    """SIGSTOP ``pid`` as a VM pause or a long GC would, at a moment when it holds no lock the test needs next.

    A process frozen inside a transaction keeps its locks until it wakes: on SQLite the whole database (the lock
    lives in the writing process), on MariaDB the rows it locked (the server waits innodb_lock_wait_timeout for
    them). That is the database's limit, not a scenario the portal can answer, so the process is frozen, the locks
    probed, and thawed and frozen again a moment later while one is held. On SQLite the probe is ``BEGIN
    IMMEDIATE``; on MariaDB ``rows`` (querysets of the rows the test writes next) are locked with NOWAIT."""
    database = connection.settings_dict
    for _ in range(attempts):
        os.kill(pid, signal.SIGSTOP)
        if database["ENGINE"].endswith("sqlite3"):
            free = _sqlite_writable(database["NAME"])
        else:
            free = _rows_free(rows)
        if free:
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError(f"process {pid} held a lock the test needs at each of {attempts} attempts to freeze it")


def _rows_free(querysets) -> bool:
    from django.db import DatabaseError, transaction

    try:
        with transaction.atomic():
            for queryset in querysets:
                list(queryset.select_for_update(nowait=True).values_list("pk", flat=True))
        return True
    except DatabaseError:
        return False


def _sqlite_writable(path) -> bool:
    """Neither SQLite's write lock nor the writers' lock file (portal/sqlite3) is held."""
    import fcntl
    import sqlite3

    if Path(f"{path}-writers.lock").exists():
        with open(f"{path}-writers.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(lock, fcntl.LOCK_UN)
    probe = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError as error:
        if "locked" not in str(error):
            raise
        return False
    finally:
        probe.close()
