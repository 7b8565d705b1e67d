"""The old system's action paths its runbooks call (seed 000: /admin/rq/scale-workers and /admin/rq/restart-workers;
seed 001: /admin/maintenance/pause-task-submission and /resume-task-submission), with an API token of a user who may
act; the portal's own views, audited like the admin's buttons."""

import json

import pytest

from migration import state
from queues.models import ApiToken, AuditEntry, WorkerPool

pytestmark = pytest.mark.django_db


@pytest.fixture
def pools(db):
    WorkerPool.objects.update_or_create(name="default", defaults={
        "queues": "urgent high normal", "desired": 2, "minimum": 1, "maximum": 6})
    WorkerPool.objects.update_or_create(name="bulk", defaults={"queues": "low", "desired": 1, "minimum": 0,
                                                               "maximum": 4})


@pytest.fixture
def token(operator_user):
    return ApiToken.issue(name="runbook", user=operator_user)[1]


def post(client, path, body=None, token=None):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    return client.post(path, data=json.dumps(body) if body is not None else "", content_type="application/json",
                       **headers)


def test_scale_workers_by_queue_scales_the_pool_that_drains_it(client, pools, token):
    response = post(client, "/admin/rq/scale-workers", {"queue": "normal", "count": 4}, token)
    assert response.status_code == 200 and response.json()["pool"] == "default" and response.json()["desired"] == 4
    assert post(client, "/admin/rq/scale-workers", {"queue": "low", "count": 3}, token).json()["pool"] == "bulk"
    assert dict(WorkerPool.objects.values_list("name", "desired")) == {"default": 4, "bulk": 3}
    assert AuditEntry.objects.filter(action="pool_scale", detail__via="API token runbook").count() == 2


@pytest.mark.parametrize("body, status, words", [
    ({"queue": "nightly", "count": 4}, 400, "queue: Input should be 'urgent', 'high', 'normal' or 'low'"),
    ({"queue": "normal", "count": "4"}, 400, "count: Input should be a valid integer"),
    ({"queue": "normal", "count": 40}, 400, "count: Pool 'default' runs between 1 and 6 workers"),
])
def test_scale_workers_names_what_is_wrong(client, pools, token, body, status, words):
    response = post(client, "/admin/rq/scale-workers", body, token)
    assert response.status_code == status and words in response.json()["error"], response.json()
    assert dict(WorkerPool.objects.values_list("name", "desired")) == {"default": 2, "bulk": 1}


def test_a_queue_drained_by_two_pools_asks_for_the_pool(client, pools, token):
    WorkerPool.objects.filter(name="bulk").update(queues="normal low")
    response = post(client, "/admin/rq/scale-workers", {"queue": "normal", "count": 4}, token)
    assert response.status_code == 400 and "bulk, default" in response.json()["error"]
    assert post(client, "/admin/rq/scale-workers", {"queue": "normal", "pool": "bulk", "count": 4},
                token).json()["pool"] == "bulk"


def test_restart_workers_without_a_body_restarts_every_pool(client, pools, token, redis):
    response = post(client, "/admin/rq/restart-workers", None, token)
    assert response.status_code == 202 and set(response.json()["pools"]) == {"default", "bulk"}


def test_the_old_paths_need_a_token_whose_user_may_act(client, pools, support_user):
    assert post(client, "/admin/rq/scale-workers", {"queue": "normal", "count": 4}).status_code == 401
    weak = ApiToken.issue(name="reader", user=support_user)[1]
    refused = post(client, "/admin/rq/scale-workers", {"queue": "normal", "count": 4}, weak)
    assert refused.status_code == 403 and "manage_fleet" in refused.json()["error"]
    refused = post(client, "/admin/maintenance/pause-task-submission", {"reason": "x"}, weak)
    assert refused.status_code == 403 and "pause_submission" in refused.json()["error"]
    assert client.get("/admin/rq/scale-workers").status_code == 405


def test_pause_for_two_hours_then_resume_as_the_runbook_does(client, token, mode):
    response = post(client, "/admin/maintenance/pause-task-submission",
                    {"reason": "RQ migration in progress", "duration": "2 hours"}, token)
    assert response.status_code == 200 and response.json()["submission_paused"] is True
    row = state.system_mode()
    assert row.paused_now() and row.paused_reason == "RQ migration in progress"
    assert 7190 < (row.paused_until - row.paused_at).total_seconds() <= 7200
    resumed = post(client, "/admin/maintenance/resume-task-submission", None, token)
    assert resumed.status_code == 200 and resumed.json()["submission_paused"] is False
    assert not state.system_mode().paused_now()
    assert list(AuditEntry.objects.filter(detail__via="API token runbook").values_list("action", flat=True)
                .order_by("pk")) == ["submission_pause", "submission_resume"]


@pytest.mark.parametrize("body, words", [
    ({"duration": "2 hours"}, "reason:"),
    ({"reason": "disk", "duration": "2 fortnights"}, "duration: '2 fortnights' is not a positive duration"),
    ({"reason": "disk", "duration": 7200}, "duration: Input should be a valid string"),
])
def test_pause_names_what_is_wrong_and_pauses_nothing(client, token, mode, body, words):
    response = post(client, "/admin/maintenance/pause-task-submission", body, token)
    assert response.status_code == 400 and words in response.json()["error"], response.json()
    assert not state.system_mode().paused_now()


def test_while_a_migration_run_holds_the_pause_both_are_refused_with_409(client, token, mode):
    from migration.models import MigrationRun
    from migration.runs import run_create

    run = run_create(user=None)
    MigrationRun.objects.filter(pk=run.pk).update(state=MigrationRun.State.STOPPED)
    for path, body in (("/admin/maintenance/pause-task-submission", {"reason": "disk"}),
                       ("/admin/maintenance/resume-task-submission", None)):
        response = post(client, path, body, token)
        assert response.status_code == 409 and str(run) in response.json()["error"], response.json()
    assert not state.system_mode().paused_now()
