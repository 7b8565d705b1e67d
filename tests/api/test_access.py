"""Who may call the API and how often: tokens act as their user's role, a token's rate is held in Redis (and in the
process while Redis is away), and every refusal or outage is JSON with the status the description lists."""

import json
import time
import urllib.error
import urllib.request
from datetime import timedelta

import pytest
from django.utils import timezone

from queues.models import ApiToken, AuditEntry, CaptionTask, TaskStatus
from tests.api.conftest import Caller

pytestmark = pytest.mark.django_db


def test_no_token_or_a_bad_one_is_a_401_naming_what_to_send(client, operator_user, redis):
    response = client.get("/api/v1/tasks")
    assert response.status_code == 401 and response["WWW-Authenticate"] == 'Bearer realm="api"'
    assert "Authorization: Bearer <API token>" in response.json()["error"]
    for header in ("Bearer rqo_unknown", "Basic dXNlcjpwdw==", "Bearer "):
        response = client.get("/api/v1/tasks", HTTP_AUTHORIZATION=header)
        assert response.status_code == 401 and response.json()["field"] is None, header
    row, raw = ApiToken.issue(name="old", user=operator_user, expires_at=timezone.now() - timedelta(seconds=1))
    response = client.get("/api/v1/tasks", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 401 and "unknown, revoked or expired" in response.json()["error"]


def test_support_reads_but_every_action_is_refused_naming_the_permission(as_support, redis, media_image):
    task = CaptionTask.objects.create(image_ref=media_image(), status=TaskStatus.FAILED)
    assert as_support.get("/api/v1/tasks").status_code == 200
    assert as_support.get(f"/api/v1/tasks/{task.pk}").status_code == 200
    assert as_support.get("/api/v1/alerts").status_code == 200
    assert as_support.get("/api/v1/silences").status_code == 200
    assert as_support.get("/api/v1/submission").status_code == 200
    for path, body, permission in [
        ("/api/v1/tasks", {"image_ref": "a.png"}, "queues.add_captiontask"),
        (f"/api/v1/tasks/{task.pk}/requeue", None, "queues.requeue_task"),
        (f"/api/v1/tasks/{task.pk}/discard", None, "queues.discard_task"),
        ("/api/v1/submission/pause", {"reason": "x"}, "migration.pause_submission"),
        ("/api/v1/silences", {"matchers": [{"label": "alertname", "value": "x"}], "reason": "r",
                              "duration_minutes": 5}, "monitoring.add_silence"),
    ]:
        response = as_support.post(path, body)
        assert response.status_code == 403, (path, response.content)
        assert response.json()["error"] == f"the token's user 'sam-support' lacks the {permission} permission"
    assert CaptionTask.objects.get(pk=task.pk).status == TaskStatus.FAILED and not AuditEntry.objects.exists()


# A valid body for each operation that acts (the permission is checked once the body has been read).
ACTING = {
    "task_submit": {"image_ref": "a.png"}, "tasks_submit_many": {"tasks": [{"image_ref": "a.png"}]},
    "task_requeue": None, "task_cancel": None, "task_change_priority": {"priority": "high"}, "task_discard": None,
    "submission_pause": {"reason": "x"}, "submission_resume": None, "alert_acknowledge": None,
    "alert_unacknowledge": None, "alert_shelve": {"duration_minutes": 5}, "alert_unshelve": None,
    "silence_create": {"matchers": [{"label": "alertname", "value": "x"}], "reason": "r", "duration_minutes": 5},
    "silence_expire": None, "pool_scale": {"count": 3}, "pool_restart": None, "worker_restart": None,
    "workers_scale": {"count": 3}, "workers_restart": None, "scale_workers": {"queue": "normal", "count": 3},
    "restart_workers": None, "pause_task_submission": {"reason": "x"}, "resume_task_submission": None,
}


def test_every_operation_that_acts_refuses_support_and_is_allowed_to_an_admin(client, as_support, as_admin,
                                                                              redis):
    """Support reads; every operation in the description that is not a GET refuses Support's token naming the
    permission and changes nothing, and an Admin (every permission) gets past the check."""
    schema = client.get("/api/schema/").json()
    operations = {operation["operationId"]: path for path, methods in schema["paths"].items()
                  for method, operation in methods.items() if method != "get"}
    assert set(operations) == set(ACTING), "a new operation needs its body in ACTING"
    for operation_id, path in operations.items():
        path = path.format(task_id=1, alert_id=1, silence_id=1, pool="default", worker="w-1")
        refused = as_support.post(path, ACTING[operation_id])
        assert refused.status_code == 403, (operation_id, refused.content)
        assert refused.json()["error"].startswith("the token's user 'sam-support' lacks the "), operation_id
        allowed = as_admin.post(path, ACTING[operation_id])
        assert allowed.status_code not in (403, 500), (operation_id, allowed.content)
    assert not AuditEntry.objects.filter(user__username="sam-support").exists()


def test_a_token_of_a_user_no_longer_active_staff_is_refused(client, operator_user, redis):
    raw = ApiToken.issue(name="leaver", user=operator_user)[1]
    operator_user.is_staff = False
    operator_user.save()
    response = client.get("/api/v1/tasks", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 403 and "not an active staff member" in response.json()["error"]


def test_a_token_over_its_rate_gets_429_with_retry_after_and_other_tokens_are_not_held(client, operator_user,
                                                                                      support_user, redis):
    slow = Caller(client, ApiToken.issue(name="cron", user=operator_user, rate_limit=2)[1])
    other = Caller(client, ApiToken.issue(name="desk", user=support_user, rate_limit=2)[1])
    answers = [slow.get("/api/v1/submission").status_code for _ in range(8)]
    assert answers[:4] == [200] * 4 and 429 in answers, answers  # a burst of twice the rate, then refused
    refused = slow.get("/api/v1/submission")
    assert refused.status_code == 429 and 1 <= int(refused["Retry-After"]) <= 2
    assert "too many requests for this token" in refused.json()["error"]
    assert other.get("/api/v1/submission").status_code == 200
    time.sleep(int(refused["Retry-After"]))
    assert slow.get("/api/v1/submission").status_code == 200
    # The buckets live in Redis, shared by every web process.
    assert redis.exists(f"portal:api:rate:{ApiToken.objects.get(name='cron').pk}")


def test_with_redis_away_the_rate_is_held_in_the_process_and_reads_still_answer(client, operator_user,
                                                                                  unreachable_redis, media_image):
    task = CaptionTask.objects.create(image_ref=media_image())
    caller = Caller(client, ApiToken.issue(name="cron", user=operator_user, rate_limit=3)[1])
    answers = [caller.get(f"/api/v1/tasks/{task.pk}").status_code for _ in range(10)]
    assert answers[:6] == [200] * 6 and answers[-1] == 429, answers
    time.sleep(1.5)
    # A requeue needs no Redis: the row is queued and the relay publishes it once Redis answers.
    CaptionTask.objects.filter(pk=task.pk).update(status=TaskStatus.FAILED)
    requeued = caller.post(f"/api/v1/tasks/{task.pk}/requeue").json()
    assert requeued["status"] == "QUEUED" and requeued["published_at"] is None
    # A discard takes the job out of rq's failed-job registry first: without Redis, a 503 and nothing changed.
    CaptionTask.objects.filter(pk=task.pk).update(status=TaskStatus.FAILED)
    response = caller.post(f"/api/v1/tasks/{task.pk}/discard")
    assert response.status_code == 503 and response["Retry-After"] == "10", response.content
    assert response.json() == {"error": "Redis is unreachable; try again shortly", "field": None}
    assert CaptionTask.objects.get(pk=task.pk).status == TaskStatus.FAILED


def test_unknown_paths_and_methods_answer_json(as_operator, redis):
    response = as_operator.client.put("/api/v1/tasks", HTTP_AUTHORIZATION=f"Bearer {as_operator.token}")
    assert response.status_code == 405 and set(response["Allow"].split(", ")) == {"POST", "GET"}
    assert response.json()["error"] == f"PUT is not allowed on /api/v1/tasks; use {response['Allow']}"
    response = as_operator.get("/api/v1/no-such-thing")
    assert response.status_code == 404 and response["Content-Type"] == "application/json"
    assert response.json() == {"error": "no such endpoint: /api/v1/no-such-thing", "field": None}


def test_the_description_is_openapi_3_1_valid_and_names_every_operation(client):
    from openapi_spec_validator import validate

    response = client.get("/api/schema/")
    assert response.status_code == 200
    schema = response.json()
    validate(schema)
    assert schema["openapi"] == "3.1.0"
    operations = {(method, path) for path, methods in schema["paths"].items() for method in methods}
    assert {("post", "/api/v1/tasks"), ("post", "/api/v1/tasks/batch"), ("get", "/api/v1/tasks"),
            ("get", "/api/v1/tasks/{task_id}"), ("post", "/api/v1/tasks/{task_id}/requeue"),
            ("post", "/api/v1/tasks/{task_id}/cancel"), ("post", "/api/v1/tasks/{task_id}/priority"),
            ("post", "/api/v1/tasks/{task_id}/discard"), ("get", "/api/v1/submission"),
            ("post", "/api/v1/submission/pause"), ("post", "/api/v1/submission/resume"), ("get", "/api/v1/alerts"),
            ("get", "/api/v1/alerts/{alert_id}"), ("post", "/api/v1/alerts/{alert_id}/acknowledge"),
            ("post", "/api/v1/alerts/{alert_id}/shelve"), ("get", "/api/v1/silences"), ("post", "/api/v1/silences"),
            ("post", "/api/v1/silences/{silence_id}/expire"), ("get", "/api/v1/pools"),
            ("post", "/api/v1/pools/{pool}/scale"), ("post", "/api/v1/pools/{pool}/restart"),
            ("post", "/api/v1/workers/{worker}/restart")} <= operations
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            assert {"401", "403", "429", "503"} <= set(operation["responses"]), (method, path)
            for code in ("429", "503"):
                assert "Retry-After" in operation["responses"][code]["headers"], (method, path, code)
            assert operation["security"] == [{"TokenAuth": []}], (method, path)
    for path in ("/api/v1/tasks", "/api/v1/silences"):
        assert "Location" in schema["paths"][path]["post"]["responses"]["201"]["headers"], path


def test_every_route_outside_the_admin_is_described_or_known_to_be_no_api_tokens(client):
    """Every operation a token calls is in /api/schema/ (the older calls at the old system's paths too); what is not
    an operation is one of the read-only and ingest paths with their own access (the metrics token or a session,
    the webhook's token), the probes, or the description itself. A view added outside the API fails here."""
    import re

    from django.urls import URLResolver, get_resolver

    def routes(patterns, prefix=""):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                if pattern.namespace != "admin":
                    yield from routes(pattern.url_patterns, prefix + str(pattern.pattern))
            else:
                yield prefix + str(pattern.pattern), pattern.callback

    described = set(client.get("/api/schema/").json()["paths"])
    operations, others = set(), set()
    for route, callback in routes(get_resolver().url_patterns):
        (operations if callback.__module__ == "ninja.operation" else others).add(route)
    assert {"/" + re.sub(r"<(\w+)>", r"{\1}", route) for route in operations} == described
    assert {"api/rq/workers/scale", "admin/rq/scale-workers", "admin/maintenance/pause-task-submission"} <= operations
    assert others == {"", "api/schema/", "api/docs/", "health", "healthz", "readyz", "metrics", "admin/rq/health",
                      "admin/rq/stats", "api/rq/health", "api/rq/metrics", "api/rq/performance", "api/rq/alerts",
                      "api/alerts/alertmanager"}


def test_no_two_schemas_share_a_name():
    """The description keys its schemas by class name: two classes of one name would be described as one (the
    older calls' body once replaced /api/v1/'s ScaleIn)."""
    from collections import Counter

    from ninja import Schema

    from api import alerts, errors, fleet, pages, runbook, submission, tasks

    names = Counter(value.__name__ for module in (alerts, errors, fleet, pages, runbook, submission, tasks)
                    for value in vars(module).values()
                    if isinstance(value, type) and issubclass(value, Schema) and value.__module__ == module.__name__)
    assert [name for name, count in names.items() if count > 1] == []


def test_the_documentation_page_loads_its_assets_from_the_portal(client):
    page = client.get("/api/docs/").content.decode()
    assert "/static/ninja/swagger-ui-bundle.js" in page and "/api/schema/" in page
    assert "cdn" not in page.lower() and "https://" not in page


@pytest.mark.django_db(transaction=True)
def test_a_database_outage_is_a_503_with_retry_after_from_a_live_server(web_server, redis):
    # The web process' database cannot be opened: every query fails (an SQLite file in a folder that is not there).
    url = web_server(DATABASE_URL="sqlite:////nonexistent-folder/portal.sqlite3")
    # The API's own paths and the older calls at the old system's paths (before, those answered 500, some in HTML).
    for method, path in (("GET", "/api/v1/tasks"), ("POST", "/api/rq/workers/scale"),
                         ("POST", "/api/rq/workers/restart"), ("POST", "/admin/rq/scale-workers"),
                         ("POST", "/admin/rq/restart-workers"), ("POST", "/admin/maintenance/pause-task-submission"),
                         ("POST", "/admin/maintenance/resume-task-submission")):
        request = urllib.request.Request(f"{url}{path}", method=method, data=b"{}" if method == "POST" else None,
                                         headers={"Authorization": "Bearer rqo_anything",
                                                  "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=30)
        assert (path, answer.value.code, answer.value.headers["Retry-After"]) == (path, 503, "10")
        assert json.load(answer.value) == {"error": "the database is unreachable; try again shortly", "field": None}


def test_the_token_is_checked_before_the_body_is_read(client, redis):
    response = client.post("/api/v1/tasks/batch", data="{not json", content_type="application/json",
                           HTTP_AUTHORIZATION="Bearer rqo_unknown")
    assert response.status_code == 401


def test_the_older_fleet_calls_count_against_the_same_bucket(client, operator_user, redis):
    from queues.models import WorkerPool

    WorkerPool.objects.update_or_create(name="default", defaults={"desired": 2, "minimum": 1, "maximum": 6})
    caller = Caller(client, ApiToken.issue(name="cron", user=operator_user, rate_limit=1)[1])
    answers = [caller.get("/api/v1/pools").status_code for _ in range(3)]
    assert answers == [200, 200, 429]
    response = caller.post("/api/rq/workers/scale", {"pool": "default", "count": 3})
    assert response.status_code == 429 and int(response["Retry-After"]) >= 1
    assert WorkerPool.objects.get(name="default").desired == 2


@pytest.mark.django_db(transaction=True)
def test_a_value_the_database_cannot_hold_is_a_400_not_an_outage(as_operator, redis):
    from django.db import connection

    if connection.vendor != "mysql":
        pytest.skip("MySQL/MariaDB: a column in a character set that cannot hold the value")
    # A database created in latin1 (a server's default under --no-defaults): the pool names' column is one.
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE queues_workerpool CONVERT TO CHARACTER SET latin1 COLLATE latin1_swedish_ci")
    try:
        response = as_operator.post("/api/v1/pools/%F0%9F%98%80/scale", {"count": 1})
        assert response.status_code == 400, response.content
        assert "cannot store or compare a value" in response.json()["error"]
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE queues_workerpool CONVERT TO CHARACTER SET utf8mb4 "
                           "COLLATE utf8mb4_unicode_ci")
