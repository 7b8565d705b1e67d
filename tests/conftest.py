"""Shared fixtures: a real Redis (the test command's server), real databases, standard users, local HTTP servers."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable

import pytest
from django.contrib.auth.models import Group

from portal.embedded_redis import RedisServer, free_port
from queues import broker
from queues.fleet.worker import CaptionWorker


def pytest_configure(config):
    """Under pytest-xdist, each worker uses a Redis server of its own (portal.testing starts one per worker and lists
    them in TEST_REDIS_URLS): tests flush Redis and read its command statistics, which another worker's tests would
    disturb. Child processes the tests start get the worker's address through REDIS_URL."""
    import os

    worker, urls = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("TEST_REDIS_URLS", "")
    if not worker or not urls:
        return
    from django.conf import settings

    choices = urls.split(",")
    url = choices[int(worker.removeprefix("gw")) % len(choices)]
    os.environ["REDIS_URL"] = settings.REDIS_URL = url
    settings.RQ_QUEUES = {name: {**queue, "URL": url} for name, queue in settings.RQ_QUEUES.items()}
    settings.CHANNEL_LAYERS = {**settings.CHANNEL_LAYERS, "default": {
        **settings.CHANNEL_LAYERS["default"],
        "CONFIG": {**settings.CHANNEL_LAYERS["default"]["CONFIG"], "hosts": [  # the settings' pool options kept
            {**host, "address": url} if isinstance(host, dict) else url
            for host in settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"]]}}}
    broker.reset_connection()


@pytest.fixture
def redis(settings):
    """The test run's Redis server, emptied before the test. Tests that use it talk to a real server."""
    broker.reset_connection()
    connection = broker.get_connection()
    connection.flushdb()
    yield connection
    broker.reset_connection()


@pytest.fixture
def redis_server_factory(tmp_path, settings):
    """Starts extra real Redis servers the test may stop and restart; all are stopped at teardown."""
    servers: list[RedisServer] = []

    def start(name: str = "extra", *, use: bool = True) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{name}", port=free_port(), appendonly=True).start()
        servers.append(server)
        if use:
            point_at(server)
        return server

    def point_at(server: RedisServer) -> None:
        settings.REDIS_URL = server.url
        settings.RQ_QUEUES = {name: {**config, "URL": server.url} for name, config in settings.RQ_QUEUES.items()}
        broker.reset_connection()

    start.point_at = point_at
    yield start
    for server in servers:
        server.stop()
    broker.reset_connection()


def run_worker(*, burst: bool = True, max_jobs: int | None = None) -> CaptionWorker:
    """A real caption worker on all queues in this process, until the queues are empty (burst)."""
    worker = CaptionWorker(broker.get_queues(), connection=broker.get_connection())
    worker.work(burst=burst, max_jobs=max_jobs, logging_level="WARNING", with_scheduler=False)
    return worker


@pytest.fixture
def worker_run():
    return run_worker


# --- users --------------------------------------------------------------------------------------------------

def _user(django_user_model, username: str, *, staff: bool, superuser: bool = False, group: str | None = None):
    user = django_user_model.objects.create_user(username=username, password="pw-" + username, is_staff=staff,
                                                 is_superuser=superuser)
    if group:
        from queues.roles import sync_roles

        sync_roles()  # transactional tests empty the tables, groups included
        user.groups.add(Group.objects.get(name=group))
    return user


@pytest.fixture
def admin_user(django_user_model):
    return _user(django_user_model, "ada-admin", staff=True, group="Admins")


@pytest.fixture
def operator_user(django_user_model):
    return _user(django_user_model, "otto-operator", staff=True, group="Operators")


@pytest.fixture
def support_user(django_user_model):
    return _user(django_user_model, "sam-support", staff=True, group="Support")


@pytest.fixture
def outsider_user(django_user_model):
    return _user(django_user_model, "olga-outsider", staff=False)


# --- local HTTP servers (stand-ins for what lives outside: image hosts, Ollama) --------------------------------

class LocalHTTPServer:
    """A real HTTP server on 127.0.0.1 whose answers the test sets per path: ``server.route(path, handler)``.

    A handler receives the request handler object and writes the response itself; ``requests`` keeps what came in.
    """

    def __init__(self):
        self.routes: dict[str, Callable] = {}
        self.requests: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                outer.requests.append({"method": self.command, "path": path, "body": body,
                                       "headers": dict(self.headers)})
                route = outer.routes.get(path)
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "9")
                    self.end_headers()
                    self.wfile.write(b"not found")
                    return
                route(self, body)

            do_GET = do_POST = _handle

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        # A short poll: shutdown() waits for it, at every test's teardown (0.5 s by default).
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def route(self, path: str, handler: Callable) -> str:
        self.routes[path] = handler
        return self.url + path

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def respond(status: int, body: bytes = b"", content_type: str = "application/octet-stream", *, delay: float = 0,
            headers: dict | None = None):
    """A route handler answering ``status`` with ``body`` after ``delay`` seconds."""
    import time

    def handler(request, _body):
        if delay:
            time.sleep(delay)
        try:
            request.send_response(status)
            request.send_header("Content-Type", content_type)
            request.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                request.send_header(name, value)
            request.end_headers()
            request.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    return handler


@pytest.fixture
def http_server():
    server = LocalHTTPServer()
    yield server
    server.stop()


@pytest.fixture
def png_bytes() -> Callable[..., bytes]:
    def make(colour=(200, 30, 30), size=(120, 80), format="PNG") -> bytes:
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", size, colour).save(buffer, format=format)
        return buffer.getvalue()

    return make


@pytest.fixture
def media_image(settings, tmp_path, png_bytes):
    """Writes an image under a fresh media root and returns its reference."""
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.MEDIA_ROOT.mkdir()

    def write(name="red.png", **kwargs) -> str:
        path = settings.MEDIA_ROOT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(**kwargs))
        return name

    return write


@pytest.fixture
def unreachable_redis(settings):
    """Points the portal at a port where no Redis listens."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    settings.REDIS_URL = url
    broker.reset_connection()
    yield url
    broker.reset_connection()


def tool_or_skip(name: str, package: str) -> str:
    """The path of a command-line tool a test checks with (promtool, amtool, systemd-analyze). CI installs them all:
    there a missing one fails the test; elsewhere the test is skipped."""
    import os
    import shutil

    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have {name} (Debian: apt-get install {package})")
        pytest.skip(f"{name} is not installed here (Debian: apt-get install {package})")
    return path


def subprocess_env(**extra) -> dict:
    """Environment for a child process (manage.py command, worker) that must use this test's Redis and database."""
    import os
    from urllib.parse import quote

    from django.conf import settings
    from django.db import connection

    database = connection.settings_dict
    if database["ENGINE"].endswith("sqlite3"):
        database_url = f"sqlite:///{database['NAME']}"
    else:
        database_url = (f"mysql://{quote(database['USER'])}:{quote(database['PASSWORD'])}@{database['HOST']}:"
                        f"{database['PORT'] or 3306}/{database['NAME']}")
    return {**os.environ, "REDIS_URL": settings.REDIS_URL, "DATABASE_URL": database_url,
            "MEDIA_ROOT": str(settings.MEDIA_ROOT), **extra}


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    """Marks every process the test starts (tests/processes.py) and fails the test if one outlives it: whatever is
    still running a few seconds after the test's own teardown is SIGKILLed and named in the failure."""
    import os
    import time
    import uuid

    from tests.processes import MARK, kill_all, marked_processes

    mark = os.environ[MARK] = uuid.uuid4().hex
    yield
    deadline = time.monotonic() + 5  # workers told to stop by a parent-death signal may still be on their way out
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    del os.environ[MARK]
    if left:
        kill_all(left)
        pytest.fail("processes started by this test were still running after it (now killed):\n"
                    + "\n".join(f"  {pid} {command[:200]}" for pid, command in left.items()), pytrace=False)


@pytest.fixture(autouse=True)
def _fresh_rate_limits():
    """The API tokens' buckets this process keeps while Redis is away start empty in each test (a token of the next
    test can have the same id)."""
    from portal.rate_limits import limiter

    limiter.reset()
    yield
    limiter.reset()


@pytest.fixture(autouse=True)
def _fresh_queue_control():
    """Queue pauses are cached for a second per process; each test starts from what its database says."""
    from queues import control

    control.clear_cache()
    yield
    control.clear_cache()


@pytest.fixture
def mode(db):
    """Sets fields of the dispatch mode row: ``mode(mode="legacy", submission_paused=True, ...)``."""

    from migration.models import SystemMode
    from migration.state import system_mode_ensure

    def set_fields(**fields) -> SystemMode:
        system_mode_ensure()
        SystemMode.objects.filter(pk=1).update(**fields)
        return SystemMode.objects.get(pk=1)

    return set_fields


def alert_rules_seed() -> None:
    """The alert rules and escalation policy a fresh install starts with, written again (where missing) by the data
    migrations that wrote them: transactional tests empty the tables after each test."""
    import importlib

    from django.apps import apps

    for migration in ("0005_seed_alerts", "0009_seed_monitoring_stale", "0013_seed_document_alerts"):
        importlib.import_module(f"monitoring.migrations.{migration}").seed(apps, None)

