"""The fleet API for scripts: POST /api/rq/workers/scale and /restart with an API token (not the metrics token),
audited like the admin's buttons; every refusal is JSON naming what is wrong."""

import json
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from queues import broker
from queues.fleet.worker import CaptionWorker
from queues.models import ApiToken, AuditEntry, FleetEvent, WorkerPool

pytestmark = pytest.mark.django_db

METRICS_TOKEN = "metrics-token-for-the-scrape-only"


@pytest.fixture
def pool(db):
    pool, _ = WorkerPool.objects.update_or_create(
        name="default", defaults={"queues": "urgent high normal low", "desired": 2, "minimum": 1, "maximum": 6})
    return pool


@pytest.fixture
def token(operator_user):
    return ApiToken.issue(name="runbook", user=operator_user)[1]


def post(client, path, body, token=None, **headers):
    if token:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client.post(path, data=body if isinstance(body, str) else json.dumps(body),
                       content_type="application/json", **headers)


def test_a_token_scales_a_pool_and_the_change_is_audited_as_its_user_via_the_token(client, pool, token,
                                                                                    operator_user):
    response = post(client, "/api/rq/workers/scale", {"pool": "default", "count": 5}, token,
                    REMOTE_ADDR="192.0.2.7")
    assert response.status_code == 200
    assert response.json() == {"pool": "default", "desired": 5, "previous": 2, "minimum": 1, "maximum": 6}
    assert WorkerPool.objects.get(name="default").desired == 5
    entry = AuditEntry.objects.get(action="pool_scale")
    assert entry.user == operator_user and entry.target == "default" and entry.count == 5
    assert entry.detail == {"from": 2, "to": 5, "via": "API token runbook"} and entry.address == "192.0.2.7"
    assert FleetEvent.objects.get(kind=FleetEvent.Kind.POOL_SCALED).reason == "API token runbook"
    assert ApiToken.objects.get(name="runbook").last_used_at is not None


@pytest.mark.parametrize("body, status, message, field", [
    ({"pool": "default", "count": 9}, 400,
     "count: Pool 'default' runs between 1 and 6 workers; 9 is outside that range.", "count"),
    ({"pool": "default", "count": "3"}, 400, "count: Input should be a valid integer", "count"),
    ({"pool": "default"}, 400, "count: Field required", "count"),
    ({"pool": "nightly", "count": 3}, 404, "Unknown pool 'nightly' (pools: default)", None),
    ({"pool": 7, "count": 3}, 400, "pool: Input should be a valid string", "pool"),
    ("[1, 2]", 400, "the body must be a JSON object", None),
    ("{not json", 400, "the body must be a JSON object (Content-Type: application/json)", None),
])
def test_bad_scale_requests_are_refused_naming_the_field_and_change_nothing(client, pool, token, body, status,
                                                                            message, field):
    response = post(client, "/api/rq/workers/scale", body, token)
    assert (response.status_code, response.json()) == (status, {"error": message, "field": field})
    assert WorkerPool.objects.get(name="default").desired == 2
    assert not AuditEntry.objects.filter(action="pool_scale").exists()


def test_only_a_live_token_of_a_user_who_may_manage_the_fleet_is_accepted(client, pool, token, settings,
                                                                          support_user):
    settings.METRICS_TOKEN = METRICS_TOKEN
    anonymous = post(client, "/api/rq/workers/scale", {"count": 3})
    assert anonymous.status_code == 401 and anonymous["WWW-Authenticate"] == 'Bearer realm="api"'
    assert post(client, "/api/rq/workers/scale", {"count": 3}, "rqo_made-up").status_code == 401
    metrics = post(client, "/api/rq/workers/scale", {"count": 3}, METRICS_TOKEN)  # the scrape's token scales nothing
    assert metrics.status_code == 401 and "not valid" in metrics.json()["error"]
    support_token = ApiToken.issue(name="support script", user=support_user)[1]
    refused = post(client, "/api/rq/workers/scale", {"count": 3}, support_token)
    assert refused.status_code == 403
    assert refused.json() == {"error": "the token's user 'sam-support' lacks the queues.manage_fleet permission",
                              "field": None}
    owner = ApiToken.objects.get(name="runbook").user
    type(owner).objects.filter(pk=owner.pk).update(is_staff=False)  # may no longer sign in to the admin
    assert post(client, "/api/rq/workers/scale", {"count": 3}, token).status_code == 403
    type(owner).objects.filter(pk=owner.pk).update(is_staff=True)
    call_command("api_token", "revoke", "runbook")
    assert post(client, "/api/rq/workers/scale", {"count": 3}, token).status_code == 401
    assert client.get("/api/rq/workers/scale", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 405
    assert WorkerPool.objects.get(name="default").desired == 2


def test_restart_asks_the_pools_live_workers_to_finish_and_exit(client, pool, token, redis):
    worker = CaptionWorker(broker.get_queues(), connection=broker.get_connection(), name="api-restarted",
                           pool="default")
    worker.register_birth()
    try:
        response = post(client, "/api/rq/workers/restart", {"pool": "default"}, token)
        assert response.status_code == 202 and response.json() == {"pool": "default", "restarting": 1}
        one = post(client, "/api/rq/workers/restart", {"worker": "api-restarted"}, token)
        assert one.status_code == 202 and one.json() == {"restarted": ["api-restarted"]}
    finally:
        worker.register_death()
    assert post(client, "/api/rq/workers/restart", {"worker": "nobody"}, token).json() == {
        "error": "No worker named 'nobody' is registered", "field": None}
    assert [entry.detail.get("via") for entry in AuditEntry.objects.filter(
        action__in=["pool_restart", "worker_restart"])] == ["API token runbook"] * 2


def test_restart_answers_503_while_redis_is_unreachable(client, pool, token, unreachable_redis):
    response = post(client, "/api/rq/workers/restart", {"pool": "default"}, token)
    assert response.status_code == 503 and response["Retry-After"] == "10"
    assert response.json() == {"error": "Redis is unreachable; try again shortly", "field": None}, \
        "no host or port of the driver's"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path, body", [("/api/rq/workers/scale", {"pool": "default", "count": 3}),
                                        ("/api/rq/workers/restart", {"pool": "default"})])
def test_a_database_outage_answers_503_without_the_drivers_text(client, pool, token, path, body):
    """Token holders are scripts and their logs: the driver's message (a file path, a host and port) stays in the
    portal's log."""
    from tests.monitoring.test_alert_evaluation import database_unreachable

    with database_unreachable():
        response = post(client, path, body, token)
    assert response.status_code == 503 and response["Retry-After"] == "10"
    assert response.json()["error"] == "the database is unreachable; try again shortly"
    assert "unable to open" not in response.content.decode() and "nonexistent" not in response.content.decode()


def test_the_command_issues_lists_and_revokes_tokens(operator_user, support_user, capsys):
    call_command("api_token", "create", "deploy hook", "--user", operator_user.username)
    raw = capsys.readouterr().out.strip()
    assert raw.startswith("rqo_") and ApiToken.objects.authenticate(raw).name == "deploy hook"
    assert raw not in json.dumps(list(ApiToken.objects.values()), default=str)  # only its digest is stored
    call_command("api_token", "list")
    assert "deploy hook" in capsys.readouterr().out
    with pytest.raises(CommandError, match="exists already"):
        call_command("api_token", "create", "deploy hook", "--user", operator_user.username)
    outsider = get_user_model().objects.create_user("outsider", password="x", is_staff=False)
    with pytest.raises(CommandError, match="'outsider' is not an active staff member"):
        call_command("api_token", "create", "outsider", "--user", outsider.username)
    with pytest.raises(CommandError, match="--rate must be between 1 and 10000"):
        call_command("api_token", "create", "too fast", "--user", operator_user.username, "--rate", "0")
    with pytest.raises(CommandError, match="no user named 'ghost'"):
        call_command("api_token", "create", "ghost", "--user", "ghost")
    assert ApiToken.objects.get(name="deploy hook").expires_at is not None, "90 days unless told otherwise"
    call_command("api_token", "revoke", "deploy hook")
    assert ApiToken.objects.authenticate(raw) is None
    # Audited as the command and the account that ran it, not as the token's owner (who did neither).
    for entry in AuditEntry.objects.filter(action__in=["api_token_create", "api_token_revoke"]):
        assert entry.user is None and entry.detail["token_user"] == operator_user.username
        assert entry.detail["via"].startswith("manage.py api_token ") and "(account " in entry.detail["via"]
    assert AuditEntry.objects.filter(action__in=["api_token_create", "api_token_revoke"]).count() == 2
    with pytest.raises(CommandError, match="no active token"):
        call_command("api_token", "revoke", "deploy hook")
    # A Support user's token reads /api/v1/; the fleet API stays closed to it, which the command says.
    capsys.readouterr()
    call_command("api_token", "create", "support reader", "--user", support_user.username, "--rate", "5")
    assert "cannot call the fleet API" in capsys.readouterr().err
    assert ApiToken.objects.get(name="support reader").rate_limit == 5


def test_an_expired_token_is_refused(client, pool, operator_user, capsys):
    """Tokens never expired: a forgotten script's token worked for ever."""
    call_command("api_token", "create", "one day", "--user", operator_user.username, "--days", "1")
    issued = capsys.readouterr()
    raw = issued.out.strip()
    assert "expires" in issued.err
    assert post(client, "/api/rq/workers/scale", {"count": 3}, raw).status_code == 200
    ApiToken.objects.filter(name="one day").update(expires_at=timezone.now() - timedelta(seconds=1))
    refused = post(client, "/api/rq/workers/scale", {"count": 4}, raw)
    assert refused.status_code == 401 and "expired" in refused.json()["error"]
    call_command("api_token", "list")
    assert "one day" in capsys.readouterr().out.split("expired")[0]
    call_command("api_token", "create", "forever", "--user", operator_user.username, "--no-expiry")
    assert ApiToken.objects.get(name="forever").expires_at is None
    with pytest.raises(CommandError, match="--days must be between 1 and 3650"):
        call_command("api_token", "create", "never", "--user", operator_user.username, "--days", "0")
