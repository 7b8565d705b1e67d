import json
import subprocess
import sys
import tempfile
import urllib.request

import pytest
from django.conf import settings

from portal.embedded_redis import free_port
from tests.conftest import subprocess_env
from tests.processes import stop_process, wait_for

from queues.models import ApiToken


class Caller:
    """The Django test client with an API token: ``caller.get(path)``, ``caller.post(path, body)``."""

    def __init__(self, client, token: str | None):
        self.client, self.token = client, token

    def _headers(self, headers: dict) -> dict:
        if self.token:
            headers.setdefault("HTTP_AUTHORIZATION", f"Bearer {self.token}")
        return headers

    def get(self, path, params=None, **headers):
        return self.client.get(path, params or {}, **self._headers(headers))

    def post(self, path, body=None, **headers):
        data = body if isinstance(body, (str, bytes)) else json.dumps(body if body is not None else {})
        return self.client.post(path, data=data, content_type="application/json", **self._headers(headers))


@pytest.fixture
def as_operator(client, operator_user):
    return Caller(client, ApiToken.issue(name="deploy hook", user=operator_user, rate_limit=1000)[1])


@pytest.fixture
def as_support(client, support_user):
    return Caller(client, ApiToken.issue(name="support desk", user=support_user, rate_limit=1000)[1])


@pytest.fixture
def as_admin(client, admin_user):
    return Caller(client, ApiToken.issue(name="admin script", user=admin_user, rate_limit=1000)[1])


@pytest.fixture
def web_server():
    """``web_server(**environment)``: the portal's web process as deployed (gunicorn, two workers) on this test's
    database and Redis unless ``environment`` says otherwise; its base URL once /api/schema/ answers. Stopped after
    the test, its log printed."""
    started = []

    def start(**environment) -> str:
        port = free_port()
        log = tempfile.TemporaryFile()
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:portal.gunicorn_config", "portal.wsgi", "--workers", "2",
             "--bind", f"127.0.0.1:{port}"], cwd=settings.BASE_DIR, env=subprocess_env(**environment),
            stdout=log, stderr=subprocess.STDOUT)
        process.log = log
        started.append(process)
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/api/schema/", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return process.poll() is not None  # a dead server ends the wait; the assertion below says so

        wait_for(answers, 60, "the portal to serve /api/schema/")
        assert process.poll() is None, "gunicorn exited"
        return url

    yield start
    for process in started:
        stop_process(process)


@pytest.fixture(autouse=True)
def _no_roles_remembered():
    """Each test reads its users' roles afresh (the API keeps a user's permissions for 2 s per process)."""
    from api.access import _permissions

    _permissions.clear()
    yield
    _permissions.clear()
