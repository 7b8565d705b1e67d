"""Real processes for fleet tests and drills: supervisors (``manage.py runworkers``) with short intervals, and
helpers to watch them. Shared by tests/queues/test_fleet.py and tests/drills/."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time

from django.conf import settings
from django.db import close_old_connections

from queues.fleet import fleet_workers
from tests.conftest import respond, subprocess_env


def wait_for(predicate, timeout: float, message: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        close_old_connections()
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s: {message}")


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


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
        texts = []
        for log in self.logs:
            log.seek(0)
            texts.append(log.read().decode(errors="replace"))
        return "\n---\n".join(texts)

    def stop_all(self):
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        for log in self.logs:
            log.close()
        self.logs.clear()


def slow_ollama(http_server, png_bytes, delay: float) -> str:
    http_server.route("/api/generate", respond(200, b'{"response": "A slow caption."}', "application/json",
                                               delay=delay))
    return http_server.route("/photo.png", respond(200, png_bytes(), "image/png"))


