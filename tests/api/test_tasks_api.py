"""Tasks over the HTTP API: submit one or many (validation, idempotency, held while paused), read one with its
timeline, list with filters and cursors, and the operators' actions; each against a real Redis and database."""

import base64

import pytest
from django.utils import timezone

from queues import broker
from queues.models import AuditEntry, CaptionTask, Dispatch, TaskEvent, TaskStatus
from tests.conftest import run_worker

pytestmark = pytest.mark.django_db


@pytest.fixture
def image(media_image):
    return media_image()


def test_submit_queues_the_task_in_redis_and_audits_it_as_the_token(as_operator, operator_user, redis, image,
                                                                    django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = as_operator.post("/api/v1/tasks", {"image_ref": image, "priority": "high"}, REMOTE_ADDR="192.0.2.9")
    assert response.status_code == 201, response.content
    body = response.json()
    assert response["Location"] == f"/api/v1/tasks/{body['id']}"
    assert body["status"] == "QUEUED" and body["priority"] == "high" and body["held"] is False
    assert broker.queued_task_ids("high") == {body["id"]}
    entry = AuditEntry.objects.get(action="task_submit")
    assert entry.user == operator_user and entry.target == f"task {body['id']}" and entry.address == "192.0.2.9"
    assert entry.detail == {"via": "API token deploy hook"}


def test_a_known_idempotency_key_answers_200_with_the_first_task_and_writes_nothing(as_operator, redis, image,
                                                                                     media_image):
    first = as_operator.post("/api/v1/tasks", {"image_ref": image, "idempotency_key": "order-17"})
    again = as_operator.post("/api/v1/tasks", {"image_ref": media_image("other.png"), "idempotency_key": "order-17"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"] and again.json()["image_ref"] == image
    assert CaptionTask.objects.count() == 1 and AuditEntry.objects.filter(action="task_submit").count() == 1


@pytest.mark.parametrize("body, field, text", [
    ({}, "image_ref", "Field required"),
    ({"image_ref": ""}, "image_ref", "at least 1 character"),
    ({"image_ref": "missing.png"}, "image_ref", "No file 'missing.png' under the media root"),
    ({"image_ref": "ftp://example.org/a.png"}, "image_ref", "Unsupported URL scheme 'ftp'"),
    ({"image_ref": "IMAGE", "priority": "asap"}, "priority", "'urgent', 'high', 'normal' or 'low'"),
    ({"image_ref": "IMAGE", "idempotency_key": ""}, "idempotency_key", "at least 1 character"),
    ({"image_ref": "IMAGE", "idempotency_key": "   "}, "idempotency_key", "1 to 200 characters"),
    ({"image_ref": ["IMAGE"]}, "image_ref", "valid string"),
    # Found by the contract test: a name longer than the file system takes was a 500 (the admin's form too).
    ({"image_ref": "0" * 2048}, "image_ref", "cannot be read: File name too long"),
])
def test_bad_input_is_a_400_naming_the_field_and_nothing_is_written(as_operator, redis, image, body, field, text):
    body = {name: image if value == "IMAGE" else value for name, value in body.items()}
    response = as_operator.post("/api/v1/tasks", body)
    assert response.status_code == 400 and response["Content-Type"] == "application/json"
    assert response.json()["field"] == field and text in response.json()["error"], response.json()
    assert not CaptionTask.objects.exists() and not AuditEntry.objects.exists()


@pytest.mark.parametrize("body", ["{not json", "[1, 2]", "null", ""])
def test_a_body_that_is_not_a_json_object_is_a_400(as_operator, redis, body):
    response = as_operator.post("/api/v1/tasks", body)
    assert response.status_code == 400 and "error" in response.json()


def test_a_batch_with_one_bad_item_names_it_and_writes_nothing(as_operator, redis, image):
    items = [{"image_ref": image}] * 3 + [{"image_ref": image, "priority": "soon"}]
    response = as_operator.post("/api/v1/tasks/batch", {"tasks": items})
    assert response.status_code == 400 and response.json()["field"] == "tasks[3].priority"
    items[3] = {"image_ref": "gone.png"}
    response = as_operator.post("/api/v1/tasks/batch", {"tasks": items})
    assert response.status_code == 400 and response.json()["field"] == "tasks[3].image_ref"
    assert not CaptionTask.objects.exists()
    assert as_operator.post("/api/v1/tasks/batch", {"tasks": []}).json()["field"] == "tasks"


def test_a_batch_submits_in_order_skips_known_keys_and_is_one_audit_entry(as_operator, redis, image,
                                                                          django_capture_on_commit_callbacks):
    known = as_operator.post("/api/v1/tasks", {"image_ref": image, "idempotency_key": "k-1"}).json()["id"]
    items = [{"image_ref": image, "idempotency_key": "k-1"}, *({"image_ref": image, "priority": "low"}
                                                               for _ in range(5))]
    with django_capture_on_commit_callbacks(execute=True):
        response = as_operator.post("/api/v1/tasks/batch", {"tasks": items})
    assert response.status_code == 201
    body = response.json()
    assert body["existing"] == [known] and len(body["created"]) == 5 and body["created"] == sorted(body["created"])
    assert broker.queued_task_ids("low") == set(body["created"]) and body["held"] is False
    entry = AuditEntry.objects.get(action="tasks_submit")
    assert entry.count == 5 and entry.detail["via"] == "API token deploy hook"


def test_while_submission_is_paused_tasks_are_accepted_and_held(as_operator, redis, image, mode,
                                                                django_capture_on_commit_callbacks):
    assert as_operator.post("/api/v1/submission/pause", {"reason": "database upgrade", "duration": "2 hours"}
                            ).status_code == 200
    with django_capture_on_commit_callbacks(execute=True):
        one = as_operator.post("/api/v1/tasks", {"image_ref": image}).json()
        many = as_operator.post("/api/v1/tasks/batch", {"tasks": [{"image_ref": image}] * 2}).json()
    assert one["held"] is True and one["dispatch"] == Dispatch.HELD and many["held"] is True
    assert broker.queued_task_ids("normal") == set()
    state = as_operator.get("/api/v1/submission").json()
    assert state["paused"] is True and state["reason"] == "database upgrade" and state["held"] == 3
    with django_capture_on_commit_callbacks(execute=True):
        resumed = as_operator.post("/api/v1/submission/resume", {"reason": "upgrade done"}).json()
    assert resumed["released"] == 3 and resumed["paused"] is False and resumed["held"] == 0


def test_while_a_migration_run_holds_the_pause_pause_and_resume_are_refused_with_409(as_operator, mode):
    from migration.models import MigrationRun
    from migration.runs import run_create

    run = run_create(user=None)
    MigrationRun.objects.filter(pk=run.pk).update(state=MigrationRun.State.STOPPED)
    for path, body in (("/api/v1/submission/pause", {"reason": "disk"}), ("/api/v1/submission/resume", None)):
        response = as_operator.post(path, body)
        assert response.status_code == 409 and str(run) in response.json()["error"], response.json()
    assert as_operator.get("/api/v1/submission").json()["paused"] is False


def test_a_task_requeued_over_and_over_answers_with_its_newest_events(as_support, media_image):
    from datetime import timedelta

    from api.tasks import TIMELINE_MOST

    task = CaptionTask.objects.create(image_ref=media_image(), status=TaskStatus.QUEUED)
    start = timezone.now() - timedelta(days=1)
    TaskEvent.objects.bulk_create(TaskEvent(task=task, kind=TaskEvent.Kind.REQUEUED, at=start + timedelta(seconds=n),
                                            detail=str(n)) for n in range(TIMELINE_MOST + 20))
    timeline = as_support.get(f"/api/v1/tasks/{task.pk}").json()["timeline"]
    assert [event["detail"] for event in timeline] == [str(n) for n in range(20, TIMELINE_MOST + 20)]


@pytest.mark.django_db(transaction=True)  # the worker closes the connection when it is done
def test_a_task_reads_with_its_timeline_after_a_real_worker_ran_it(as_operator, as_support, redis, image,
                                                                   django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        task_id = as_operator.post("/api/v1/tasks", {"image_ref": image}).json()["id"]
    run_worker()
    response = as_support.get(f"/api/v1/tasks/{task_id}")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "COMPLETED" and body["attempts"] == 1 and body["caption"]
    assert [event["kind"] for event in body["timeline"]] == [TaskEvent.Kind.COMPLETED]
    assert body["timeline"][0]["worker_name"] == body["worker_name"] and body["timeline"][0]["duration_ms"] >= 0
    assert as_support.get("/api/v1/tasks/999999").status_code == 404
    assert as_support.get("/api/v1/tasks/999999").json() == {"error": "no such task 999999", "field": None}


def test_the_list_filters_like_the_admin_and_pages_with_a_stable_cursor(as_support, db, image):
    now = timezone.now()
    failed = [CaptionTask.objects.create(image_ref=image, status=TaskStatus.FAILED, last_error_class="Timeout",
                                         finished_at=now).pk for _ in range(5)]
    CaptionTask.objects.create(image_ref="http://images.example.org/cat.png", priority="low")
    pages, cursor = [], None
    while True:
        body = as_support.get("/api/v1/tasks", {"status": "FAILED", "limit": 2, **({"cursor": cursor} if cursor
                                                                                     else {})}).json()
        pages.append([row["id"] for row in body["results"]])
        if not body["next_cursor"]:
            break
        cursor = body["next_cursor"]
        CaptionTask.objects.create(image_ref=image, status=TaskStatus.FAILED)  # new rows do not shift the pages
    assert pages == [failed[::-1][0:2], failed[::-1][2:4], failed[::-1][4:5]]
    assert [row["priority"] for row in as_support.get("/api/v1/tasks", {"q": "cat"}).json()["results"]] == ["low"]
    assert len(as_support.get("/api/v1/tasks", {"error_class": "Timeout"}).json()["results"]) == 5
    assert as_support.get("/api/v1/tasks", {"q": str(failed[0])}).json()["results"][0]["id"] == failed[0]
    after = (now + timezone.timedelta(minutes=1)).isoformat()
    assert as_support.get("/api/v1/tasks", {"finished_after": after}).json()["results"] == []
    refused = as_support.get("/api/v1/tasks", {"cursor": "not-a-cursor"})
    assert refused.status_code == 400 and refused.json()["field"] == "cursor"


def test_requeue_cancel_priority_and_discard_use_the_admins_rules(as_operator, redis, image,
                                                                  django_capture_on_commit_callbacks):
    failed = CaptionTask.objects.create(image_ref=image, status=TaskStatus.FAILED, attempts=3,
                                        last_error_class="PermanentCaptionError", published_at=timezone.now())
    with django_capture_on_commit_callbacks(execute=True):
        queued = as_operator.post("/api/v1/tasks", {"image_ref": image}).json()["id"]
    moved = as_operator.post(f"/api/v1/tasks/{queued}/priority", {"priority": "urgent"})
    assert moved.status_code == 200 and moved.json()["priority"] == "urgent"
    assert broker.queued_task_ids("urgent") == {queued}
    assert as_operator.post(f"/api/v1/tasks/{queued}/cancel").json()["status"] == "CANCELLED"
    refused = as_operator.post(f"/api/v1/tasks/{queued}/cancel")
    assert refused.status_code == 409
    assert refused.json()["error"] == f"task {queued} is cancelled: only queued tasks can be cancelled"
    with django_capture_on_commit_callbacks(execute=True):
        requeued = as_operator.post(f"/api/v1/tasks/{queued}/requeue")
    assert requeued.json()["status"] == "QUEUED" and requeued.json()["attempts"] == 0
    assert as_operator.post(f"/api/v1/tasks/{failed.pk}/discard").json()["status"] == "DISCARDED"
    assert as_operator.post(f"/api/v1/tasks/{failed.pk}/discard").status_code == 409
    assert as_operator.post("/api/v1/tasks/424242/requeue").status_code == 404
    actions = set(AuditEntry.objects.values_list("action", flat=True))
    assert {"task_submit", "tasks_priority", "tasks_cancel", "tasks_requeue", "tasks_discard"} <= actions, actions
    assert all(entry.detail.get("via") == "API token deploy hook" for entry in AuditEntry.objects.all())


def test_odd_input_found_by_review_is_a_400_or_an_answer_never_a_500(as_support, db):
    # "²" is a digit to str.isdigit but not to int(): the search and the cursor took it for a number.
    assert as_support.get("/api/v1/tasks", {"q": "²"}).status_code == 200
    cursor = base64.urlsafe_b64encode("before:²".encode()).decode().rstrip("=")
    assert as_support.get("/api/v1/tasks", {"cursor": cursor}).json()["field"] == "cursor"
    # A date that overflows once moved to UTC.
    for name, value in [("created_after", "0001-01-01T00:00:00+01:00"),
                        ("finished_before", "9999-12-31T23:59:59-01:00")]:
        response = as_support.get("/api/v1/tasks", {name: value})
        assert response.status_code == 400 and response.json()["field"] == name, response.content


def test_a_batch_answers_200_when_every_key_was_known_and_maps_a_repeated_key(as_operator, redis, image):
    first = as_operator.post("/api/v1/tasks/batch", {"tasks": [{"image_ref": image, "idempotency_key": "a"},
                                                               {"image_ref": image, "idempotency_key": "a"}]})
    assert first.status_code == 201 and len(first.json()["created"]) == 1
    assert first.json()["existing"] == first.json()["created"]  # the repeat is the first item's task
    again = as_operator.post("/api/v1/tasks/batch", {"tasks": [{"image_ref": image, "idempotency_key": "a"}]})
    assert again.status_code == 200 and again.json() == {"created": [], "existing": first.json()["created"],
                                                         "held": False}
    assert CaptionTask.objects.count() == 1


def test_a_priority_a_task_has_already_is_answered_as_it_is(as_operator, redis, image):
    task = as_operator.post("/api/v1/tasks", {"image_ref": image, "priority": "high"}).json()
    response = as_operator.post(f"/api/v1/tasks/{task['id']}/priority", {"priority": "high"})
    assert response.status_code == 200 and response.json()["priority"] == "high"
    assert not TaskEvent.objects.filter(task_id=task["id"]).exists()


def test_held_counts_only_tasks_still_waiting(as_operator, redis, image, mode, django_capture_on_commit_callbacks):
    as_operator.post("/api/v1/submission/pause", {"reason": "maintenance"})
    held = as_operator.post("/api/v1/tasks", {"image_ref": image}).json()["id"]
    as_operator.post("/api/v1/tasks", {"image_ref": image})
    assert as_operator.post(f"/api/v1/tasks/{held}/cancel").json()["status"] == "CANCELLED"
    assert as_operator.get("/api/v1/submission").json()["held"] == 1
    with django_capture_on_commit_callbacks(execute=True):
        resumed = as_operator.post("/api/v1/submission/resume").json()
    assert resumed["released"] == 1 and resumed["held"] == 0
