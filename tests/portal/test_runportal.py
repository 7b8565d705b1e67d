"""The README's run command: everything in one process tree, working, and gone after Ctrl-C."""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings

from portal.embedded_redis import free_port
from tests.processes import descendants, kill_all

pytestmark = pytest.mark.slow


def processes_mentioning(marker: str) -> list[int]:
    """Live processes whose environment mentions ``marker`` (all descendants of the runner inherit it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().split(")")[-1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return found


def test_run_command_serves_processes_tasks_and_stops_everything(tmp_path):
    port = free_port()
    var = tmp_path / "var"
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("REDIS_URL", "RQ_REDIS_URL", "DATABASE_URL", "MEDIA_ROOT", "PORTAL_ADMIN_USER")}
    # The evaluator passes every second, so it runs while the first workers start and again once they are up.
    environment.update({"PORTAL_VAR_DIR": str(var), "PYTHONUNBUFFERED": "1", "ALERTS_EVALUATION_INTERVAL": "1"})
    runner = subprocess.Popen([sys.executable, "manage.py", "runportal", "--port", str(port)],  # two workers
                              cwd=settings.BASE_DIR, env=environment, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = runner.stdout.readline()
            output.append(line)
            if "Press Ctrl-C" in line or runner.poll() is not None:
                break
        text = "".join(output)
        assert f"running at http://127.0.0.1:{port}/admin/" in text, text
        assert re.search(r"Log in as 'admin' with password \S+", text)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/login/", timeout=5).status == 200

        # A fresh start pages nobody: the evaluator ran before the first workers had started, and no-active-workers
        # and health-unhealthy fired in its first second. Judged once both workers have started and the evaluator
        # has passed a few times with them up, before any work (busy workers are a real condition).
        database = sqlite3.connect(var / "portal.sqlite3")
        deadline = time.monotonic() + 60
        started = lease = None
        while not (started and lease) and time.monotonic() < deadline:
            started = database.execute("select count(*) from queues_fleetevent where kind='worker_started'"
                                       ).fetchone()[0] >= 2
            lease = database.execute("select holder from monitoring_lease where name='alert-evaluator'").fetchone()
            time.sleep(0.2)
        assert started and lease is not None, "the local runner starts two workers and the alert evaluator"
        time.sleep(3)
        # The host rules judge the machine itself (a loaded CI host has its CPU above 80 %): not a start's doing.
        alerts = database.execute("select name, state, summary, started_at from monitoring_alert "
                                  "where name not like 'host-%'").fetchall()
        assert alerts == []

        submitted = subprocess.run([sys.executable, "manage.py", "submit_tasks", "--count", "6", "--no-progress"],
                                   cwd=settings.BASE_DIR, env=environment, capture_output=True, text=True,
                                   timeout=60)
        assert "Submitted 6 task(s)" in submitted.stdout, submitted.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = database.execute("select count(*) from queues_captiontask where status='COMPLETED'").fetchone()[0]
            if done == 6:
                break
            time.sleep(0.2)
        database.close()
        assert done == 6
        assert len(processes_mentioning(str(var))) >= 4  # web, worker, relay, redis-server
    finally:
        runner.send_signal(signal.SIGINT)
        try:
            runner.wait(60)
        except subprocess.TimeoutExpired:
            kill_all([*descendants(runner.pid), runner.pid])
            raise
    rest = runner.stdout.read()
    assert runner.returncode == 0, rest
    assert "Stopped." in rest
    time.sleep(0.2)
    assert processes_mentioning(str(var)) == []
