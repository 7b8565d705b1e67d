"""Seed 000's runbook, walked against a live portal: the README's run command (``manage.py runportal``: web,
supervisor with workers, sampler, alert evaluator) on its own SQLite and a real Redis server, called over HTTP as the
runbook's curl lines call it (with the README's authentication added: the metrics token for /api/rq/*, an Operator's
API token for the actions). Its steps, in its order:

- Morning health check: ``/api/rq/health | jq '.'``, ``/api/rq/metrics | jq '.queues'``, ``/api/rq/alerts | jq
  '.alerts'``.
- Worker management: ``POST /admin/rq/scale-workers {"queue": "normal", "count": 4}``, ``POST
  /admin/rq/restart-workers``.
- Worker failures, step 3: ``/api/rq/health | jq '.components.workers'``.
- Redis issues: Redis stopped and started again (``systemctl restart redis``), then ``/api/rq/health | jq
  '.components.redis'``.
- High queue backlog, step 1: ``export RQ_WORKER_COUNT=8``, restart the application: 8 workers.
- And seed 001's maintenance calls (its steps 3.1 and 4.2): pause task submission for "2 hours" (a submission is
  held), resume (it runs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings

from portal.embedded_redis import RedisServer, free_port
from tests.processes import descendants, kill_all

pytestmark = pytest.mark.slow

METRICS_TOKEN = "runbook-metrics-token-0123456789"
OPERATOR = ("olive", "Operators")


class Portal:
    """``manage.py runportal`` on a free port; ``start`` waits for its banner, ``stop`` for its exit. Everything the
    runner and its children print goes to a file (a pipe nobody reads while Redis is down would fill and block
    them all)."""

    def __init__(self, environment: dict, log: Path):
        self.environment, self.port, self.log_path = environment, free_port(), log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, **extra) -> "Portal":
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen([sys.executable, "manage.py", "runportal", "--port", str(self.port)],
                                            cwd=settings.BASE_DIR, env={**self.environment, **extra},
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            if self.output().count("Press Ctrl-C") > self.starts:
                break
            time.sleep(0.2)
        self.starts += 1
        assert self.output().count("Press Ctrl-C") == self.starts, self.output()[-20000:]
        return self

    starts = 0

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is not None:  # it ended by itself: what it printed says why
            print(f"runportal had exited with {self.process.returncode}:\n{self.output()[-20000:]}")
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(90)
        except subprocess.TimeoutExpired:
            kill_all([*descendants(self.process.pid), self.process.pid])
            raise
        finally:
            print(self.output()[-20000:])  # pytest shows it for a failing test


def call(portal: Portal, path: str, *, token: str = METRICS_TOKEN, body: dict | None = None,
         method: str | None = None) -> tuple[int, dict]:
    """One of the runbook's curl lines: the answer's status and JSON body (errors are JSON too)."""
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(portal.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=15) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for_answer(portal: Portal, path: str, predicate, message: str, timeout: float = 60) -> dict:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = call(portal, path)
            if predicate(*last):
                return last[1]
        except (urllib.error.URLError, OSError, ValueError) as error:
            last = error
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}; last answer: {last}")


def manage(environment: dict, *arguments: str) -> str:
    result = subprocess.run([sys.executable, "manage.py", *arguments], cwd=settings.BASE_DIR, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def own_redis():
    """A Redis server on a unix socket of this test's own: stopped and started again on the same address, which a
    TCP port freed meanwhile would not guarantee with other test processes starting servers."""
    directory = Path(tempfile.mkdtemp(prefix="rq-walk-", dir="/tmp"))  # short: a socket path has a length limit
    server = RedisServer(directory, port=None, appendonly=True).start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


def test_the_seed_000_runbook_against_a_live_portal(tmp_path, own_redis):
    redis_server = own_redis
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("REDIS_URL", "RQ_REDIS_URL", "DATABASE_URL", "MEDIA_ROOT", "PORTAL_ADMIN_USER",
                                  "RQ_WORKER_COUNT", "PORTAL_WORKERS")}
    environment.update({"PORTAL_VAR_DIR": str(tmp_path / "var"), "PYTHONUNBUFFERED": "1", "PORTAL_LOCAL": "true",
                        "REDIS_URL": redis_server.url, "METRICS_TOKEN": METRICS_TOKEN})
    portal = Portal(environment, tmp_path / "runportal.log")
    try:
        portal.start()
        username, group = OPERATOR
        manage(environment, "shell", "-c",
               "from django.contrib.auth.models import Group, User; "
               f"user = User.objects.create_user({username!r}, password='not-used-here', is_staff=True); "
               f"user.groups.add(Group.objects.get(name={group!r}))")
        operator_token = manage(environment, "api_token", "create", "runbook", "--user", username).strip()

        # Daily operations: the morning health check.
        health = wait_for_answer(portal, "/api/rq/health", lambda status, body: body.get("worker_count") == 2,
                                 "the runner's two workers")
        assert health["overall_status"] == "healthy" and health["issues"] == []
        assert health["components"] == {**health["components"], "redis": "healthy", "database": "healthy",
                                        "workers": "healthy"}
        status, metrics = call(portal, "/api/rq/metrics")
        assert status == 200, metrics
        client = redis_server.client()
        assert metrics["queues"]["total_queued"] == 0, (metrics, {key: client.llen(key)
                                                                  for key in client.smembers("rq:queues")})
        assert metrics["queues"]["by_priority"] == {"urgent": 0, "high": 0, "normal": 0, "low": 0}
        assert (metrics["queues"]["total_queued"], metrics["queues"]["failed_jobs"]) == (0, 0)
        status, alerts = call(portal, "/api/rq/alerts")
        assert status == 200 and alerts["alert_count"] == len(alerts["alerts"])
        # Nothing about the fleet on a fresh start; the host rules judge the test machine itself (its CPU is often
        # above 80 % here: pending, for 5 minutes).
        assert [alert for alert in alerts["alerts"] if not alert["rule"].startswith("host-")] == [], alerts

        # Worker management: scale up through the queue, then restart every worker.
        status, scaled = call(portal, "/admin/rq/scale-workers", token=operator_token,
                              body={"queue": "normal", "count": 4})
        assert status == 200 and (scaled["pool"], scaled["desired"]) == ("default", 4), scaled
        before = wait_for_answer(portal, "/admin/rq/health",
                                 lambda status, body: body["workers"]["active_count"] == 4, "four workers")
        status, restarted = call(portal, "/admin/rq/restart-workers", token=operator_token, method="POST")
        assert status == 202 and restarted == {"pools": {"default": 4}, "restarting": 4}, restarted
        old = set(before["workers"]["worker_ids"])
        wait_for_answer(portal, "/admin/rq/health",
                        lambda status, body: body["workers"]["active_count"] == 4
                        and not old & set(body["workers"]["worker_ids"]), "four fresh workers after the restart")
        # Worker failures, step 3: verify workers started.
        assert call(portal, "/api/rq/health")[1]["components"]["workers"] == "healthy"

        # Redis issues: Redis down answers 503 naming it; after the restart the portal recovers by itself.
        redis_server.stop()
        down = wait_for_answer(portal, "/api/rq/health",
                               lambda status, body: status == 503 and body["components"]["redis"] == "unhealthy",
                               "the health check to see Redis down", timeout=30)
        assert down["overall_status"] == "unhealthy" and any("redis" in issue.lower() for issue in down["issues"])
        redis_server.start()
        wait_for_answer(portal, "/api/rq/health",
                        lambda status, body: status == 200 and body["components"]["redis"] == "healthy"
                        and body["worker_count"] == 4, "Redis and the four workers back", timeout=90)

        # Seed 001's maintenance window: pause submission for two hours, then resume it.
        status, paused = call(portal, "/admin/maintenance/pause-task-submission", token=operator_token,
                              body={"reason": "RQ migration in progress", "duration": "2 hours"})
        assert status == 200 and paused["submission_paused"] is True, paused
        assert "Submitted 2 task(s)" in manage(environment, "submit_tasks", "--count", "2", "--no-progress")
        database = sqlite3.connect(tmp_path / "var" / "portal.sqlite3")
        try:
            held = database.execute("select count(*) from queues_captiontask where dispatch = 'held'").fetchone()
            assert held == (2,)
            status, resumed = call(portal, "/admin/maintenance/resume-task-submission", token=operator_token,
                                   method="POST")
            assert status == 200 and resumed["submission_paused"] is False, resumed
            deadline = time.monotonic() + 60  # released at the resume: both run
            while time.monotonic() < deadline and database.execute(
                    "select count(*) from queues_captiontask where status = 'COMPLETED'").fetchone() != (2,):
                time.sleep(0.2)
            assert database.execute("select count(*) from queues_captiontask where status = 'COMPLETED'"
                                    ).fetchone() == (2,)
        finally:
            database.close()

        # High queue backlog, step 1: export RQ_WORKER_COUNT=8 and restart the application.
        portal.stop()
        assert portal.process.returncode == 0
        portal.start(RQ_WORKER_COUNT="8")
        wait_for_answer(portal, "/api/rq/health", lambda status, body: body.get("worker_count") == 8,
                        "eight workers after the restart with RQ_WORKER_COUNT=8", timeout=120)
    finally:
        portal.stop()
        redis_server.stop()
