"""The embedded Redis: a real server started on demand, persistent across restarts, stopped without leftovers."""

import os
import subprocess
import sys

import redis as redis_py
from django.conf import settings

from portal.embedded_redis import RedisServer, ensure_embedded_running, redis_server_binary


def test_binary_is_found():
    assert os.access(redis_server_binary(), os.X_OK)


def test_started_on_demand_persists_queued_work_and_stops_cleanly(tmp_path):
    server = ensure_embedded_running(tmp_path, port=6390)
    try:
        assert server.url.startswith("unix://") and server.ping()
        pid = server.running_pid()
        assert ensure_embedded_running(tmp_path, port=6390).running_pid() == pid  # already running: reused
        client = redis_py.Redis.from_url(server.url)
        client.rpush("rq:queue:normal", "caption-1", "caption-2")
        client.close()
        assert server.stop()
        assert not server.ping()
        assert server.running_pid() is None

        server = ensure_embedded_running(tmp_path, port=6390)  # append-only file replayed
        client = redis_py.Redis.from_url(server.url)
        assert client.lrange("rq:queue:normal", 0, -1) == [b"caption-1", b"caption-2"]
        client.close()
    finally:
        server.stop()
    assert not server.ping()


def test_embedded_redis_command(tmp_path):
    environment = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "RQ_REDIS_URL")}
    environment["PORTAL_VAR_DIR"] = str(tmp_path)

    def command(action):
        return subprocess.run([sys.executable, "manage.py", "embedded_redis", action], cwd=settings.BASE_DIR,
                              env=environment, capture_output=True, text=True, timeout=60)

    try:
        assert "not running" in command("status").stdout
        assert "running at unix://" in command("start").stdout
        assert "running (pid" in command("status").stdout
    finally:
        assert "stopped" in command("stop").stdout
    assert "not running" in command("status").stdout
    assert not RedisServer(tmp_path / "redis").ping()


def test_embedded_redis_command_refuses_when_redis_url_is_set():
    result = subprocess.run([sys.executable, "manage.py", "embedded_redis", "status"], cwd=settings.BASE_DIR,
                            env=dict(os.environ), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "REDIS_URL is set" in result.stderr and "Traceback" not in result.stderr
