"""Queue operations in the admin: confirmations with counts, results, refusals by role, overview and dead letters."""

import pytest
from django.urls import reverse
from django.utils import timezone

from monitoring.metrics import recorder
from queues import broker
from queues import control
from queues.models import AuditEntry, BulkOperation, CaptionTask, TaskStatus
from queues.operations.services import INLINE_LIMIT, bulk_operation_run
from queues.services import TaskSpec, tasks_publish, tasks_submit_many

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:queues_captiontask_changelist"


@pytest.fixture
def tasks(redis, media_image, django_capture_on_commit_callbacks):
    """12 queued tasks, then 5 of them failed with one error class and 2 with another, 1 completed."""
    with django_capture_on_commit_callbacks(execute=True):
        ids = tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(12)]).created
    CaptionTask.objects.filter(pk__in=ids[:5]).update(status=TaskStatus.FAILED, last_error_class="HTTPNotFound",
                                                      last_error_message="the image server answered HTTP 404")
    CaptionTask.objects.filter(pk__in=ids[5:7]).update(status=TaskStatus.FAILED, last_error_class="WorkerLost",
                                                       last_error_message="worker died")
    CaptionTask.objects.filter(pk=ids[7]).update(status=TaskStatus.COMPLETED)
    return ids


def action_post(client, action, ids, *, confirm=False, query="", **extra):
    data = {"action": action, "_selected_action": [str(pk) for pk in ids], "index": "0", **extra}
    if confirm:
        data.pop("index")
        data["confirm"] = "yes"
    return client.post(reverse(CHANGELIST) + query, data, follow=confirm)


def test_requeue_all_matching_filter_shows_counts_then_acts(client, operator_user, tasks,
                                                            django_capture_on_commit_callbacks):
    client.force_login(operator_user)
    query = "?status__exact=FAILED&last_error_class=HTTPNotFound"
    page = action_post(client, "requeue_tasks", tasks[:1], query=query, select_across="1")
    assert page.status_code == 200
    assert "Requeue <strong>5</strong> of the 5 selected task(s)" in page.content.decode()
    assert CaptionTask.objects.filter(status=TaskStatus.FAILED).count() == 7  # nothing changed yet

    with django_capture_on_commit_callbacks(execute=True):
        done = action_post(client, "requeue_tasks", tasks[:1], query=query, select_across="1", confirm=True)
    assert "Requeued 5 task(s)." in done.content.decode()
    assert CaptionTask.objects.filter(status=TaskStatus.FAILED, last_error_class="WorkerLost").count() == 2
    assert CaptionTask.objects.filter(pk__in=tasks[:5], status=TaskStatus.QUEUED, attempts=0).count() == 5
    assert AuditEntry.objects.get(action="tasks_requeue").count == 5


def test_requeue_refuses_completed_with_a_clear_message(client, operator_user, tasks):
    client.force_login(operator_user)
    done = action_post(client, "requeue_tasks", [tasks[7]], confirm=True)
    assert "Requeued 0 task(s). Refused 1 (1 completed): only failed, discarded or cancelled tasks can be requeued." in \
        done.content.decode()
    assert CaptionTask.objects.get(pk=tasks[7]).status == TaskStatus.COMPLETED


def test_change_priority_asks_for_the_new_one(client, operator_user, tasks, django_capture_on_commit_callbacks):
    client.force_login(operator_user)
    page = action_post(client, "change_priority", tasks[8:12])
    assert '<select name="priority"' in page.content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        action_post(client, "change_priority", tasks[8:12], confirm=True, priority="urgent")
    assert set(CaptionTask.objects.filter(pk__in=tasks[8:12]).values_list("priority", flat=True)) == {"urgent"}
    assert broker.queue_lengths()["urgent"] == 4


def test_support_user_cannot_act_even_by_posting(client, support_user, tasks):
    client.force_login(support_user)
    assert client.get(reverse(CHANGELIST)).status_code == 200
    for action in ("requeue_tasks", "cancel_tasks", "change_priority", "retry_tasks_now"):
        action_post(client, action, tasks, confirm=True, priority="urgent")
    for name, args in [("queues_captiontask_do", [tasks[0], "requeue"]),
                       ("queues_queueoverview_act", ["normal", "pause"]),
                       ("queues_queueoverview_act", ["normal", "empty"]),
                       ("queues_queueoverview_maintenance", [])]:
        assert client.post(reverse(f"admin:{name}", args=args), {"confirm": "yes", "confirm_name": "normal"}
                           ).status_code == 403
    assert CaptionTask.objects.filter(status=TaskStatus.FAILED).count() == 7
    assert CaptionTask.objects.filter(status=TaskStatus.CANCELLED).count() == 0
    assert not control.paused_queues() and not AuditEntry.objects.exists()


def test_single_task_requeue_from_its_page(client, operator_user, tasks, django_capture_on_commit_callbacks):
    client.force_login(operator_user)
    url = reverse("admin:queues_captiontask_do", args=[tasks[0], "requeue"])
    assert "Requeue <strong>1</strong> of the 1 selected" in client.get(url).content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(url, {"confirm": "yes"})
    assert response.status_code == 302
    assert CaptionTask.objects.get(pk=tasks[0]).status == TaskStatus.QUEUED


def test_large_selection_runs_as_background_operation(client, operator_user, redis, media_image):
    ids = CaptionTask.objects.insert_new([(media_image(), "normal", None)] * (INLINE_LIMIT + 1),
                                         publish_after=timezone.now())
    CaptionTask.objects.update(status=TaskStatus.FAILED)
    client.force_login(operator_user)
    page = action_post(client, "requeue_tasks", ids[:1], select_across="1", confirm=True).content.decode()
    operation = BulkOperation.objects.get()
    assert "runs in the background" in page and operation.total == INLINE_LIMIT + 1
    assert CaptionTask.objects.filter(status=TaskStatus.FAILED).count() == INLINE_LIMIT + 1  # not yet
    assert broker.queue_lengths()["urgent"] == 1
    detail = client.get(reverse("admin:queues_bulkoperation_change", args=[operation.pk]))
    assert detail.status_code == 200 and "<progress" in detail.content.decode()


def test_all_matching_the_filter_runs_from_the_stored_filter_not_a_list_of_ids(
        client, operator_user, redis, media_image, django_capture_on_commit_callbacks):
    def failed(count, error_class, reference, status=TaskStatus.FAILED):
        return [task.pk for task in CaptionTask.objects.bulk_create(
            [CaptionTask(image_ref=reference, status=status, last_error_class=error_class) for _ in range(count)],
            batch_size=500)]

    matching = failed(INLINE_LIMIT + 1, "HTTPNotFound", media_image("photos/cat.png"))
    completed = failed(3, "HTTPNotFound", media_image("photos/cat.png"), status=TaskStatus.COMPLETED)
    other_error = failed(2, "WorkerLost", media_image("photos/cat.png"))
    other_search = failed(2, "HTTPNotFound", media_image("dogs/rex.png"))
    client.force_login(operator_user)
    query = "?last_error_class=HTTPNotFound&q=photos&created_at__gte=2000-01-01+00%3A00%3A00%2B00%3A00"
    page = action_post(client, "requeue_tasks", matching[:1], query=query, select_across="1")
    assert f"Requeue <strong>{INLINE_LIMIT + 1}</strong> of the {INLINE_LIMIT + 4} selected" in \
        page.content.decode()

    action_post(client, "requeue_tasks", matching[:1], query=query, select_across="1", confirm=True)

    operation = BulkOperation.objects.get()
    # A million matching tasks would have been a million ids in one text field; the filter is stored instead.
    assert operation.task_ids == "" and operation.selection and operation.total == INLINE_LIMIT + 1
    # Before the worker runs it: one task is completed elsewhere, a new one fails with the same error.
    CaptionTask.objects.filter(pk=matching[0]).update(status=TaskStatus.COMPLETED)
    late = failed(1, "HTTPNotFound", media_image("photos/cat.png"))

    with django_capture_on_commit_callbacks(execute=True):
        operation = bulk_operation_run(operation_id=operation.pk)

    assert (operation.state, operation.changed, operation.refused) == (BulkOperation.State.DONE, INLINE_LIMIT, 0)
    statuses = dict(CaptionTask.objects.values_list("pk", "status"))
    assert {statuses[pk] for pk in matching[1:]} == {TaskStatus.QUEUED}
    assert {statuses[pk] for pk in [matching[0], *completed]} == {TaskStatus.COMPLETED}  # never requeued
    # Outside the filter, or created after the confirmation: untouched.
    assert {statuses[pk] for pk in [*other_error, *other_search, *late]} == {TaskStatus.FAILED}
    assert broker.queue_lengths()["normal"] == INLINE_LIMIT


def test_overview_page_counts_without_touching_redis(client, support_user, tasks, redis,
                                                     django_assert_max_num_queries):
    control.queue_set_paused(queue="low", paused=True)
    client.force_login(support_user)
    # The metrics flusher (a thread of this process) waits meanwhile: its pool report every 5 s is an HSET.
    with recorder.BUFFER.cycle:
        before = redis.info("commandstats")
        with django_assert_max_num_queries(16):
            page = client.get(reverse("admin:queues_queueoverview_changelist"))
        after = redis.info("commandstats")
    html = page.content.decode()
    assert page.status_code == 200
    assert '<tr data-queue="normal">' in html and '<td class="waiting">12</td>' in html
    assert "paused" in html
    writes = ("cmdstat_zremrangebyscore", "cmdstat_zrem", "cmdstat_del", "cmdstat_hset", "cmdstat_lpush")
    assert all(after.get(name, {}).get("calls", 0) == before.get(name, {}).get("calls", 0) for name in writes)


def test_pause_empty_and_maintenance_from_the_overview(client, admin_user, tasks):
    client.force_login(admin_user)
    client.post(reverse("admin:queues_queueoverview_act", args=["normal", "pause"]))
    assert control.paused_queues() == {"normal"}
    client.post(reverse("admin:queues_queueoverview_act", args=["normal", "resume"]))
    assert control.paused_queues() == set()
    wrong = client.post(reverse("admin:queues_queueoverview_act", args=["normal", "empty"]), {"confirm_name": "x"})
    assert wrong.status_code == 400 and "Type the queue&#x27;s name (normal)" in wrong.content.decode()
    assert CaptionTask.objects.filter(status=TaskStatus.QUEUED).count() == 4
    client.post(reverse("admin:queues_queueoverview_act", args=["normal", "empty"]), {"confirm_name": "normal"})
    assert CaptionTask.objects.filter(status=TaskStatus.QUEUED).count() == 0
    done = client.post(reverse("admin:queues_queueoverview_maintenance"), follow=True)
    assert "Registry maintenance done" in done.content.decode()


def test_emptying_a_large_queue_shows_counts_then_runs_in_the_background(client, admin_user, redis, media_image):
    created = CaptionTask.objects.bulk_create([CaptionTask(image_ref=media_image(), priority="low")
                                               for _ in range(INLINE_LIMIT + 1)], batch_size=500)
    tasks_publish(tasks=[(task.pk, "low") for task in created])
    client.force_login(admin_user)
    url = reverse("admin:queues_queueoverview_act", args=["low", "empty"])
    question = client.get(url).content.decode()
    assert f"Its {INLINE_LIMIT + 1} queued task(s) are cancelled" in question and "in the background" in question

    done = client.post(url, {"confirm_name": "low"}, follow=True).content.decode()

    operation = BulkOperation.objects.get()
    assert (operation.kind, operation.total, operation.task_ids) == ("empty_queue", INLINE_LIMIT + 1, "")
    assert "runs in the background" in done and reverse("admin:queues_bulkoperation_change",
                                                        args=[operation.pk]) in done
    # The request changed nothing: the worker cancels the rows, then drops the list.
    assert CaptionTask.objects.filter(status=TaskStatus.QUEUED).count() == INLINE_LIMIT + 1
    assert broker.queue_lengths() == {"urgent": 1, "high": 0, "normal": 0, "low": INLINE_LIMIT + 1}
    detail = client.get(reverse("admin:queues_bulkoperation_change", args=[operation.pk])).content.decode()
    assert "<progress" in detail and "Empty queue" in detail


def test_dead_letters_grouped_by_error_class(client, support_user, tasks):
    client.force_login(support_user)
    html = client.get(reverse("admin:queues_queueoverview_dead_letters")).content.decode()
    assert html.index('data-error-class="HTTPNotFound"') < html.index('data-error-class="WorkerLost"')
    assert f"task {tasks[4]}" in html and "answered HTTP 404" in html  # newest example of the group
    group = client.get(reverse(CHANGELIST), {"status__exact": "FAILED", "last_error_class": "HTTPNotFound"})
    assert group.context["cl"].result_count == 5


def test_task_browser_query_budget_and_filters(client, admin_user, tasks, django_assert_max_num_queries):
    client.force_login(admin_user)
    with django_assert_max_num_queries(9):  # 8, and the dispatch mode row the admin banner reads
        page = client.get(reverse(CHANGELIST), {"status__exact": "FAILED", "created_at__gte": "2000-01-01T00:00:00+00:00"})
    assert page.context["cl"].result_count == 7
    assert client.get(reverse(CHANGELIST), {"worker": "nobody"}).context["cl"].result_count == 0
    assert client.get(reverse(CHANGELIST), {"q": str(tasks[3])}).context["cl"].result_count == 1


def test_a_background_operation_works_under_the_id_of_the_request_that_started_it(client, operator_user, redis,
                                                                                     media_image):
    ids = CaptionTask.objects.insert_new([(media_image(), "normal", None)] * (INLINE_LIMIT + 1),
                                         publish_after=timezone.now())
    CaptionTask.objects.update(status=TaskStatus.FAILED)
    client.force_login(operator_user)
    data = {"action": "requeue_tasks", "_selected_action": [str(ids[0])], "select_across": "1", "confirm": "yes"}
    client.post(reverse(CHANGELIST), data, HTTP_X_CORRELATION_ID="operator-request-7")
    operation = BulkOperation.objects.get()
    assert operation.correlation_id == "operator-request-7"
    bulk_operation_run(operation_id=operation.pk, worker_name="test")  # as the worker runs it, outside the request
    entry = AuditEntry.objects.get(action="tasks_requeue")
    assert entry.correlation_id == "operator-request-7"
    from queues.models import TaskEvent

    events = TaskEvent.objects.filter(task_id__in=ids, kind=TaskEvent.Kind.REQUEUED)
    assert events.count() == INLINE_LIMIT + 1
    assert set(events.values_list("correlation_id", flat=True)) == {"operator-request-7"}
