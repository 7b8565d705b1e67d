"""Discarding dead letters: failed tasks that can never succeed leave rq's failed-job registries, the dead-letter counts
and the dead-letter alert, stay in the history as DISCARDED, and can still be requeued. From the admin (with a
confirmation), ``tasks discard`` and the service; audited; Operators and Admins only. Real workers fail the tasks
first, so the dead letters are where rq files them."""

from __future__ import annotations

import getpass
import time
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone
from rq.registry import FailedJobRegistry

from monitoring.metrics.snapshot import take_snapshot
from queues import broker
from queues.errors import BrokerUnavailable
from queues.models import AuditEntry, CaptionTask, TaskEvent, TaskStatus
from queues.operations.services import tasks_cleanup, tasks_discard, tasks_requeue
from queues.services import TaskSpec, tasks_submit_many
from tests.conftest import respond, run_worker

pytestmark = pytest.mark.django_db(transaction=True)


def failed_registry_ids(queue: str = "normal") -> set[str]:
    registry = FailedJobRegistry(queue, connection=broker.get_connection())
    return {raw.decode() for raw in broker.get_connection().zrange(registry.key, 0, -1)}


@pytest.fixture
def gone(http_server):
    """An image URL whose server answers 404: a permanent failure, the task's first attempt is its last."""
    return http_server.route("/gone.png", respond(404, b"gone"))


@pytest.fixture
def dead_letters(redis, media_image, gone):
    """Five tasks a real worker failed for good (their image is gone), one completed, one still queued."""
    missing = tasks_submit_many(specs=[TaskSpec(gone) for _ in range(5)]).created
    completed = tasks_submit_many(specs=[TaskSpec(media_image())]).created
    run_worker()
    queued = tasks_submit_many(specs=[TaskSpec(media_image())]).created
    assert CaptionTask.objects.filter(pk__in=missing, status=TaskStatus.FAILED).count() == 5
    assert failed_registry_ids() == {f"caption-{pk}" for pk in missing}
    return {"failed": missing, "completed": completed, "queued": queued,
            "error_class": CaptionTask.objects.get(pk=missing[0]).last_error_class}


def test_discarded_dead_letters_leave_the_registries_and_the_counts_and_stay_in_the_history(dead_letters,
                                                                                            operator_user, redis):
    assert take_snapshot().dead_letters["normal"] == 5  # what the dead-letter alert and /metrics read
    assert all(redis.exists(f"rq:results:caption-{pk}") for pk in dead_letters["failed"])  # rq keeps the tracebacks
    result = tasks_discard(task_ids=dead_letters["failed"] + dead_letters["completed"] + dead_letters["queued"],
                           user=operator_user, address="10.1.2.3")
    assert result.describe() == ("Discarded 5 task(s). Refused 2 (1 completed, 1 queued): only failed tasks (dead "
                                 "letters) can be discarded, once their worker has filed them (a moment after they "
                                 "fail).")
    assert CaptionTask.objects.filter(pk__in=dead_letters["failed"], status=TaskStatus.DISCARDED).count() == 5
    assert CaptionTask.objects.get(pk=dead_letters["queued"][0]).status == TaskStatus.QUEUED
    assert failed_registry_ids() == set() and take_snapshot().dead_letters["normal"] == 0
    assert all(broker.fetch_job(pk) is None for pk in dead_letters["failed"])
    assert not any(redis.exists(f"rq:results:caption-{pk}") for pk in dead_letters["failed"])  # nor their tracebacks
    events = TaskEvent.objects.filter(kind=TaskEvent.Kind.DISCARDED)
    assert events.count() == 5 and {event.actor for event in events} == {operator_user}
    entry = AuditEntry.objects.get(action="tasks_discard")
    assert (entry.user, entry.count, entry.address, entry.detail["refused"]) == (
        operator_user, 5, "10.1.2.3", {"COMPLETED": 1, "QUEUED": 1})

    # Discarded is not final: a cause fixed later, the task can run again.
    again = tasks_requeue(task_ids=dead_letters["failed"][:1])
    assert again.changed == 1 and CaptionTask.objects.get(pk=dead_letters["failed"][0]).status == TaskStatus.QUEUED


def test_with_redis_stopped_nothing_is_discarded(redis_server_factory, gone, operator_user):
    server = redis_server_factory("stopped")
    ids = tasks_submit_many(specs=[TaskSpec(gone) for _ in range(3)]).created
    run_worker()
    assert failed_registry_ids() == {f"caption-{pk}" for pk in ids}
    server.stop()
    with pytest.raises(BrokerUnavailable):
        tasks_discard(task_ids=ids, user=operator_user)
    # No row says DISCARDED while its job would still count as a dead letter; nothing is audited as done.
    assert CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.FAILED).count() == 3
    assert not TaskEvent.objects.filter(kind=TaskEvent.Kind.DISCARDED).exists()
    assert not AuditEntry.objects.filter(action="tasks_discard").exists()
    server.start()
    assert tasks_discard(task_ids=ids, user=operator_user).changed == 3 and failed_registry_ids() == set()


def test_the_cleanup_deletes_old_discarded_tasks_and_keeps_dead_letters(dead_letters):
    tasks_discard(task_ids=dead_letters["failed"][:3])
    CaptionTask.objects.filter(pk__in=dead_letters["failed"]).update(finished_at=timezone.now() - timedelta(days=40))
    done = tasks_cleanup(cutoff=timezone.now() - timedelta(days=30))
    assert done["rows"] == 3
    assert sorted(CaptionTask.objects.filter(status=TaskStatus.FAILED).values_list("pk", flat=True)) == \
        sorted(dead_letters["failed"][3:])


def test_tasks_discard_command(dead_letters, capsys, monkeypatch):
    with pytest.raises(CommandError, match="Say which tasks: --failed"):
        call_command("tasks", "discard")
    call_command("tasks", "discard", "--failed", "--error-class", dead_letters["error_class"], "--dry-run")
    assert "Would discard up to 5 task(s) (dry run, nothing changed)." in capsys.readouterr().out
    call_command("tasks", "discard", "--failed", "--error-class", "NoSuchError", "--yes")
    assert "No task matches." in capsys.readouterr().out
    monkeypatch.setattr("queues.management.commands.tasks.Command.stdin_isatty", lambda self: False)
    with pytest.raises(CommandError, match=r"Discard 5 task\(s\)\? Add --yes to confirm"):
        call_command("tasks", "discard", "--failed")
    assert CaptionTask.objects.filter(status=TaskStatus.FAILED).count() == 5
    call_command("tasks", "discard", "--ids", ",".join(map(str, dead_letters["failed"][:2] +
                                                             dead_letters["completed"])), "--yes")
    assert "Discarded 2 task(s). Refused 1 (1 completed)" in capsys.readouterr().out
    call_command("tasks", "discard", "--failed", "--queue", "normal", "--yes")
    assert "Discarded 3 task(s)." in capsys.readouterr().out
    assert failed_registry_ids() == set()
    # No portal user runs the command: each entry names it and the OS account running it, as api_token's do.
    assert [(entry.user, entry.detail["via"]) for entry in AuditEntry.objects.filter(action="tasks_discard")] == [
        (None, f"manage.py tasks discard (account {getpass.getuser()})")] * 2


def test_the_admin_action_asks_first_then_discards(client, operator_user, dead_letters):
    client.force_login(operator_user)
    changelist = reverse("admin:queues_captiontask_changelist")
    selected = [str(pk) for pk in dead_letters["failed"] + dead_letters["completed"]]
    page = client.post(changelist, {"action": "discard_tasks", "_selected_action": selected, "index": "0"})
    assert page.status_code == 200
    assert "Discard <strong>5</strong> of the 6 selected task(s)" in page.content.decode()
    assert CaptionTask.objects.filter(status=TaskStatus.FAILED).count() == 5  # nothing yet

    done = client.post(changelist, {"action": "discard_tasks", "_selected_action": selected, "confirm": "yes"},
                       follow=True)
    assert "Discarded 5 task(s). Refused 1 (1 completed)" in done.content.decode()
    assert CaptionTask.objects.filter(status=TaskStatus.DISCARDED).count() == 5 and failed_registry_ids() == set()


def test_the_dead_letter_page_discards_a_whole_error_class_after_a_confirmation(client, operator_user,
                                                                                dead_letters):
    client.force_login(operator_user)
    page = client.get(reverse("admin:queues_queueoverview_dead_letters")).content.decode()
    url = reverse("admin:queues_queueoverview_dead_letters_discard") + f"?error_class={dead_letters['error_class']}"
    assert "Discard all 5" in page and url in page.replace("&amp;", "&")
    question = client.get(url)
    assert question.status_code == 200
    assert f"Discard the 5 dead letter(s) of error class {dead_letters['error_class']}?" in question.content.decode()
    assert CaptionTask.objects.filter(status=TaskStatus.FAILED).count() == 5
    done = client.post(url, follow=True)
    assert "Discarded 5 task(s)." in done.content.decode() and "No dead letters." in done.content.decode()
    assert failed_registry_ids() == set()
    assert AuditEntry.objects.get(action="tasks_discard").detail["error_class"] == dead_letters["error_class"]


def test_support_cannot_discard_even_by_posting(client, support_user, dead_letters):
    client.force_login(support_user)
    page = client.get(reverse("admin:queues_queueoverview_dead_letters")).content.decode()
    assert "Discard all" not in page
    url = reverse("admin:queues_queueoverview_dead_letters_discard") + f"?error_class={dead_letters['error_class']}"
    assert client.post(url).status_code == 403
    single = reverse("admin:queues_captiontask_do", args=[dead_letters["failed"][0], "discard"])
    assert client.post(single, {"confirm": "yes"}).status_code == 403
    changelist = client.get(reverse("admin:queues_captiontask_changelist")).content.decode()
    assert "discard_tasks" not in changelist  # not offered...
    client.post(reverse("admin:queues_captiontask_changelist"),  # ...and not run when posted anyway
                {"action": "discard_tasks", "_selected_action": [str(dead_letters["failed"][0])], "confirm": "yes"})
    assert CaptionTask.objects.filter(status=TaskStatus.FAILED).count() == 5
    assert not AuditEntry.objects.filter(action="tasks_discard").exists()


def test_a_single_dead_letter_from_its_page(client, admin_user, dead_letters):
    client.force_login(admin_user)
    task_id = dead_letters["failed"][0]
    page = client.get(reverse("admin:queues_captiontask_change", args=[task_id])).content.decode()
    single = reverse("admin:queues_captiontask_do", args=[task_id, "discard"])
    assert single in page
    assert "Discard <strong>1</strong> of the 1 selected" in client.get(single).content.decode()
    client.post(single, {"confirm": "yes"})
    assert CaptionTask.objects.get(pk=task_id).status == TaskStatus.DISCARDED
    assert f"caption-{task_id}" not in failed_registry_ids()


def test_a_job_its_worker_is_still_filing_is_left_for_later(dead_letters, redis, operator_user):
    """The worker commits the FAILED row inside the job, then rq files the job in the failed-job registry (its hash
    says ``started`` until then). A discard in between would remove nothing and let the filing land after it: the job
    would count as a dead letter for 30 days under a DISCARDED row. It is refused instead, and discarded once filed."""
    first = dead_letters["failed"][0]
    job_key = f"rq:job:caption-{first}"
    redis.zrem(FailedJobRegistry("normal", connection=redis).key, f"caption-{first}")
    redis.hset(job_key, "status", "started")  # the moment between the row's commit and rq's filing
    result = tasks_discard(task_ids=dead_letters["failed"], user=operator_user)
    assert result.changed == 4 and result.refused == {"BEING FILED": 1}
    assert "Refused 1 (1 being filed)" in result.describe()
    assert CaptionTask.objects.get(pk=first).status == TaskStatus.FAILED and redis.exists(job_key)

    redis.hset(job_key, "status", "failed")  # rq files it
    redis.zadd(FailedJobRegistry("normal", connection=redis).key, {f"caption-{first}": time.time() + 3600})
    assert tasks_discard(task_ids=[first], user=operator_user).changed == 1
    assert failed_registry_ids() == set() and not redis.exists(job_key)


def test_more_dead_letters_than_a_request_handles_are_discarded_in_the_background(client, operator_user, gone,
                                                                                  redis, monkeypatch):
    from queues.models import BulkOperation
    from queues.operations import admin as operations_admin
    from queues.operations.services import bulk_operation_run

    monkeypatch.setattr(operations_admin, "INLINE_LIMIT", 3)
    ids = tasks_submit_many(specs=[TaskSpec(gone) for _ in range(5)]).created
    run_worker()
    client.force_login(operator_user)
    url = reverse("admin:queues_queueoverview_dead_letters_discard") + "?error_class=PermanentCaptionError"
    question = client.get(url).content.decode()
    assert "Discard the 5 dead letter(s)" in question and "in the background" in question
    assert "runs in the background" in client.post(url, follow=True).content.decode()
    operation = BulkOperation.objects.get(kind=BulkOperation.Kind.DISCARD)
    assert CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.FAILED).count() == 5  # the worker's job, later
    operation = bulk_operation_run(operation_id=operation.pk, worker_name="test")
    assert (operation.state, operation.changed) == (BulkOperation.State.DONE, 5)
    assert CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.DISCARDED).count() == 5
    assert failed_registry_ids() == set()
    entry = AuditEntry.objects.get(action="tasks_discard")
    assert (entry.user, entry.count, entry.detail["error_class"]) == (operator_user, 5, "PermanentCaptionError")
