"""Operator actions through the services, against real Redis and the database (and real workers where it matters)."""

import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone
from rq.registry import FailedJobRegistry

from queues import broker
from queues.fleet.worker import CaptionWorker
from queues.models import AuditEntry, BulkOperation, CaptionTask, TaskEvent, TaskStatus
from queues.operations.services import (
    BATCH,
    INLINE_LIMIT,
    bulk_operation_run,
    bulk_operation_start,
    queue_empty,
    queue_set_paused,
    tasks_cancel,
    tasks_change_priority,
    tasks_requeue,
    tasks_retry_now,
)
from queues.services import TaskSpec, task_submit, tasks_publish, tasks_submit_many
from tests.conftest import respond, run_worker, subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)


def failed_task(http_server):
    task = task_submit(image_ref=http_server.route("/gone.png", respond(404, b"gone")))
    run_worker()
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED
    return task


def test_requeue_resets_retries_records_history_and_refuses_others(redis, http_server, png_bytes, media_image,
                                                                   admin_user):
    failed = failed_task(http_server)
    assert failed.job_id in FailedJobRegistry("normal", connection=redis).get_job_ids(cleanup=False)
    completed = task_submit(image_ref=media_image())
    run_worker()
    processing = task_submit(image_ref=media_image())
    CaptionTask.objects.filter(pk=processing.pk).update(status=TaskStatus.PROCESSING)

    http_server.route("/gone.png", respond(200, png_bytes(), "image/png"))  # the image is back
    result = tasks_requeue(task_ids=[failed.pk, completed.pk, processing.pk], user=admin_user, address="10.1.1.1")

    assert result.changed == 1 and dict(result.refused) == {"COMPLETED": 1, "PROCESSING": 1}
    assert "Refused 2 (1 completed, 1 processing): only failed, discarded or cancelled tasks can be requeued" in \
        result.describe()
    failed.refresh_from_db()
    assert (failed.status, failed.attempts, failed.published_at is not None) == (TaskStatus.QUEUED, 0, True)
    event = failed.events.get(kind=TaskEvent.Kind.REQUEUED)
    assert event.actor == admin_user
    assert failed.job_id not in FailedJobRegistry("normal", connection=redis).get_job_ids(cleanup=False)
    assert CaptionTask.objects.get(pk=completed.pk).status == TaskStatus.COMPLETED
    entry = AuditEntry.objects.get(action="tasks_requeue")
    assert (entry.user, entry.count, entry.address, entry.detail["refused"]) == (
        admin_user, 1, "10.1.1.1", {"COMPLETED": 1, "PROCESSING": 1})
    run_worker()
    failed.refresh_from_db()
    assert failed.status == TaskStatus.COMPLETED and failed.attempts == 1


def test_cancel_stops_queued_tasks_from_running(redis, media_image):
    tasks = [task_submit(image_ref=media_image()) for _ in range(3)]
    result = tasks_cancel(task_ids=[tasks[0].pk, tasks[1].pk])
    assert result.changed == 2
    run_worker()
    statuses = dict(CaptionTask.objects.values_list("pk", "status"))
    assert [statuses[task.pk] for task in tasks] == [TaskStatus.CANCELLED, TaskStatus.CANCELLED,
                                                     TaskStatus.COMPLETED]
    assert tasks_cancel(task_ids=[tasks[2].pk]).refused == {"COMPLETED": 1}


def test_retry_now_skips_the_backoff(redis, http_server, png_bytes, settings):
    settings.RQ_RETRY_BACKOFF = 3600
    answers = [respond(503, b"busy"), respond(200, png_bytes(), "image/png")]
    task = task_submit(image_ref=http_server.route("/x.png", lambda r, b: answers.pop(0)(r, b)))
    run_worker()
    task.refresh_from_db()
    assert task.waiting_to_retry
    assert tasks_retry_now(task_ids=[task.pk]).changed == 1
    run_worker()
    assert CaptionTask.objects.get(pk=task.pk).status == TaskStatus.COMPLETED
    assert tasks_retry_now(task_ids=[task.pk]).refused == {"COMPLETED": 1}


def test_priority_change_moves_jobs_without_losing_or_duplicating(redis, media_image):
    reference = media_image()
    created = tasks_submit_many(specs=[TaskSpec(reference, priority="low") for _ in range(300)]).created
    environment = subprocess_env()
    workers = [subprocess.Popen([sys.executable, "manage.py", "rqworker", "--verbosity", "0"],
                                cwd=settings.BASE_DIR, env=environment) for _ in range(2)]
    try:
        # Move them in slices while the two workers are already draining the queues.
        for start in range(0, 300, 50):
            result = tasks_change_priority(task_ids=created[start:start + 50], priority="urgent")
            assert result.changed + result.refused_count == 50
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and CaptionTask.objects.filter(status=TaskStatus.COMPLETED).count() < 300:
            time.sleep(0.2)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        stuck = []
        for worker in workers:
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()  # a worker left running would take the next tests' jobs
                worker.wait(10)
                stuck.append(worker.pid)
    assert not stuck, f"worker(s) {stuck} did not stop within 60 s of SIGTERM"
    assert CaptionTask.objects.filter(status=TaskStatus.COMPLETED).count() == 300
    completions = TaskEvent.objects.filter(kind=TaskEvent.Kind.COMPLETED)
    assert completions.count() == 300 and completions.values("task").distinct().count() == 300
    assert set(CaptionTask.objects.values_list("attempts", flat=True)) == {1}  # nothing ran twice


def test_priority_change_publishes_on_the_new_queue(redis, media_image):
    task = task_submit(image_ref=media_image(), priority="low")
    assert tasks_change_priority(task_ids=[task.pk], priority="urgent").changed == 1
    assert broker.queue_lengths()["urgent"] == 1
    assert task.events.get().detail == "low -> urgent"
    run_worker()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED and task.attempts == 1
    with pytest.raises(ValueError, match="Unknown priority 'asap'"):
        tasks_change_priority(task_ids=[task.pk], priority="asap")


def test_empty_queue_needs_its_name_and_cancels_everything_in_it(redis, media_image, admin_user):
    reference = media_image()
    tasks_submit_many(specs=[TaskSpec(reference, priority="high") for _ in range(20)])
    keep = task_submit(image_ref=reference, priority="low")
    with pytest.raises(ValueError, match=r"Type the queue's name \(high\)"):
        queue_empty(queue_name="high", confirm="hgh", user=admin_user)
    assert broker.queue_lengths()["high"] == 20
    result = queue_empty(queue_name="high", confirm="high", user=admin_user)
    assert result.changed == 20 and broker.queue_lengths()["high"] == 0
    assert CaptionTask.objects.filter(status=TaskStatus.CANCELLED).count() == 20
    assert CaptionTask.objects.get(pk=keep.pk).status == TaskStatus.QUEUED
    assert AuditEntry.objects.filter(action="queue_empty", target="high", count=20).exists()


def published_tasks(count: int, priority: str, reference: str) -> list[int]:
    """``count`` queued tasks with their jobs in Redis (the ORM's bulk insert, then one publishing pipeline)."""
    created = CaptionTask.objects.bulk_create(
        [CaptionTask(image_ref=reference, priority=priority, publish_after=timezone.now()) for _ in range(count)],
        batch_size=500)
    ids = [task.pk for task in created]
    assert tasks_publish(tasks=[(pk, priority) for pk in ids]) == count
    return ids


def run_urgent_worker():
    """A real worker on the urgent queue only (where bulk operations run), so other queues keep their jobs."""
    CaptionWorker([broker.get_queue("urgent")], connection=broker.get_connection()).work(
        burst=True, logging_level="WARNING", with_scheduler=False)


def test_empty_queue_with_many_tasks_cancels_them_in_the_background_then_drops_the_list(redis, media_image,
                                                                                       admin_user):
    reference = media_image()
    ids = published_tasks(INLINE_LIMIT + 500, "high", reference)
    other = published_tasks(1, "low", reference)

    operation = queue_empty(queue_name="high", confirm="high", user=admin_user)

    assert isinstance(operation, BulkOperation) and operation.kind == BulkOperation.Kind.EMPTY_QUEUE
    assert (operation.state, operation.total, operation.percent) == (BulkOperation.State.PENDING, len(ids), 0)
    # Nothing is dropped before the rows are cancelled: the request only recorded the operation.
    assert broker.queue_lengths()["high"] == len(ids)
    assert CaptionTask.objects.filter(status=TaskStatus.QUEUED, priority="high").count() == len(ids)

    run_urgent_worker()

    operation.refresh_from_db()
    assert (operation.state, operation.processed, operation.changed, operation.percent) == (
        BulkOperation.State.DONE, len(ids), len(ids), 100)
    assert CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.CANCELLED).count() == len(ids)
    events = TaskEvent.objects.filter(task_id__in=ids, kind=TaskEvent.Kind.CANCELLED)
    assert events.count() == len(ids) and events.values("task").distinct().count() == len(ids)
    assert set(events.values_list("detail", "actor")) == {("queue high emptied", admin_user.pk)}
    assert not redis.exists("rq:queue:high")
    pipe = redis.pipeline(transaction=False)
    for pk in ids:
        pipe.exists(f"rq:job:caption-{pk}")
    assert sum(pipe.execute()) == 0  # the cancelled tasks' job hashes are gone too
    assert CaptionTask.objects.get(pk=other[0]).status == TaskStatus.QUEUED
    assert broker.queue_lengths()["low"] == 1
    assert AuditEntry.objects.get(action="queue_empty", target="high").count == len(ids)


@contextmanager
def database_refuses_to_cancel(task_id: int):
    """A real database error: a trigger makes any UPDATE that cancels ``task_id`` fail (its batch rolls back)."""
    name = "test_refuse_cancel"
    if connection.vendor == "sqlite":
        create = (f"CREATE TRIGGER {name} BEFORE UPDATE ON queues_captiontask FOR EACH ROW "
                  f"WHEN OLD.id = {int(task_id)} AND NEW.status = 'CANCELLED' "
                  "BEGIN SELECT RAISE(ABORT, 'simulated failure half-way'); END")
    elif connection.vendor == "mysql":
        create = (f"CREATE TRIGGER {name} BEFORE UPDATE ON queues_captiontask FOR EACH ROW BEGIN "
                  f"IF OLD.id = {int(task_id)} AND NEW.status = 'CANCELLED' THEN "
                  "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'simulated failure half-way'; END IF; END")
    else:
        pytest.skip(f"no trigger written for {connection.vendor}")
    with connection.cursor() as cursor:
        cursor.execute(create)
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TRIGGER {name}")


def test_empty_queue_interrupted_half_way_leaves_no_queued_task_without_its_job(redis, media_image, admin_user):
    ids = published_tasks(BATCH + 500, "high", media_image())  # two batches, run inline
    with database_refuses_to_cancel(ids[BATCH + 10]):  # fails in the second batch
        with pytest.raises(DatabaseError):
            queue_empty(queue_name="high", confirm="high", user=admin_user)

    assert CaptionTask.objects.filter(status=TaskStatus.CANCELLED).count() == BATCH  # the first batch committed
    still_queued = set(CaptionTask.objects.filter(status=TaskStatus.QUEUED, published_at__isnull=False)
                       .values_list("pk", flat=True))
    assert len(still_queued) == 500
    # Every task still queued and published keeps its entry in the list and its job hash: nothing for the
    # reconciler to republish, nothing the emptying undid.
    assert still_queued <= broker.queued_task_ids("high")
    pipe = redis.pipeline(transaction=False)
    for pk in still_queued:
        pipe.exists(f"rq:job:caption-{pk}")
    assert all(pipe.execute())

    result = queue_empty(queue_name="high", confirm="high", user=admin_user)  # the operator tries again
    assert result.changed == 500 and not redis.exists("rq:queue:high")
    assert CaptionTask.objects.filter(status=TaskStatus.CANCELLED).count() == BATCH + 500


def test_empty_queue_republishes_tasks_that_reached_the_queue_while_it_was_emptied(redis, media_image):
    reference = media_image()
    ids = published_tasks(BATCH + 5, "high", reference)
    arrivals = []

    def submit_during_emptying(count, result):
        if not arrivals:  # after the first batch: a new task is submitted to the queue being emptied
            arrivals.extend(published_tasks(1, "high", reference))

    queue_empty(queue_name="high", confirm="high", on_batch=submit_during_emptying)

    assert CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.CANCELLED).count() == len(ids)
    newcomer = CaptionTask.objects.get(pk=arrivals[0])
    # It was not part of what the operator emptied; its entry went with the list, so it is published again.
    assert newcomer.status == TaskStatus.QUEUED and newcomer.published_at is not None
    assert broker.queued_task_ids("high") == {newcomer.pk}
    run_worker()
    assert CaptionTask.objects.get(pk=newcomer.pk).status == TaskStatus.COMPLETED


def test_paused_queue_keeps_its_tasks_until_resumed(redis, media_image):
    reference = media_image()
    paused_task = task_submit(image_ref=reference, priority="high")
    other = task_submit(image_ref=reference, priority="low")
    queue_set_paused(queue_name="high", paused=True)
    run_worker()
    assert CaptionTask.objects.get(pk=paused_task.pk).status == TaskStatus.QUEUED
    assert CaptionTask.objects.get(pk=other.pk).status == TaskStatus.COMPLETED
    assert broker.queue_lengths()["high"] == 1
    queue_set_paused(queue_name="high", paused=False)
    run_worker()
    assert CaptionTask.objects.get(pk=paused_task.pk).status == TaskStatus.COMPLETED


@pytest.mark.slow
def test_bulk_requeue_of_100000_tasks_in_the_background(redis, media_image, admin_user):
    reference = media_image()
    ids = CaptionTask.objects.insert_new([(reference, "normal", None)] * 100_000, publish_after=timezone.now())
    CaptionTask.objects.update(status=TaskStatus.FAILED, last_error_class="TransientCaptionError")
    operation = bulk_operation_start(kind=BulkOperation.Kind.REQUEUE, task_ids=ids, user=admin_user)
    assert broker.queue_lengths()["urgent"] == 1  # the operation's own job
    started = time.monotonic()
    operation = bulk_operation_run(operation_id=operation.pk)
    elapsed = time.monotonic() - started
    assert operation.state == BulkOperation.State.DONE and operation.changed == 100_000
    assert operation.processed == 100_000 and operation.percent == 100
    assert CaptionTask.objects.filter(status=TaskStatus.QUEUED, published_at__isnull=False).count() == 100_000
    assert broker.queue_lengths()["normal"] == 100_000
    assert TaskEvent.objects.filter(kind=TaskEvent.Kind.REQUEUED).count() == 100_000
    print(f"requeued 100,000 tasks in {elapsed:.1f} s")


def test_background_operation_runs_on_a_worker_with_progress(redis, media_image, admin_user):
    ids = tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(30)]).created
    CaptionTask.objects.update(status=TaskStatus.FAILED)
    redis.delete("rq:queue:normal")
    operation = bulk_operation_start(kind=BulkOperation.Kind.REQUEUE, task_ids=ids, user=admin_user)
    assert operation.state == BulkOperation.State.PENDING and operation.percent == 0
    run_worker()  # takes the operation's job from the urgent queue, then the 30 requeued tasks
    operation.refresh_from_db()
    assert (operation.state, operation.processed, operation.changed, operation.percent) == (
        BulkOperation.State.DONE, 30, 30, 100)
    assert operation.message == "Requeued 30 task(s)."
    assert CaptionTask.objects.filter(status=TaskStatus.COMPLETED).count() == 30
    assert AuditEntry.objects.get(action="tasks_requeue").user == admin_user
