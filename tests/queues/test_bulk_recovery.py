"""A background bulk operation whose worker dies is taken over and finishes: real worker processes, real Redis."""

import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from queues import broker
from queues.models import AuditEntry, BulkOperation, CaptionTask, TaskEvent, TaskStatus
from queues.operations.services import BATCH, BULK_MAX_RUNS, bulk_operation_start, bulk_operations_recover
from tests.conftest import run_worker, subprocess_env
from tests.processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def start_urgent_worker() -> subprocess.Popen:
    """``manage.py rqworker urgent --burst``: the queue bulk operations run on. Output goes to a file (a pipe nobody
    reads would block it)."""
    log = tempfile.TemporaryFile()
    worker = subprocess.Popen([sys.executable, "manage.py", "rqworker", "urgent", "--burst", "--verbosity", "0"],
                              cwd=settings.BASE_DIR, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return worker


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["matching the filter", "selected ids"])
def test_operation_left_running_by_a_killed_worker_is_resumed_and_completes(redis, media_image, admin_user,
                                                                            selection):
    count = 12 * BATCH
    created = CaptionTask.objects.bulk_create(
        [CaptionTask(image_ref=media_image(), status=TaskStatus.FAILED, last_error_class="TransientCaptionError")
         for _ in range(count)], batch_size=1000)
    failed = CaptionTask.objects.filter(status=TaskStatus.FAILED)
    operation = bulk_operation_start(kind=BulkOperation.Kind.REQUEUE, user=admin_user,
                                     **({"matching": failed} if selection == "matching the filter"
                                        else {"task_ids": [task.pk for task in created]}))
    worker = start_urgent_worker()
    try:
        wait_for(lambda: BulkOperation.objects.get(pk=operation.pk).processed >= 2 * BATCH, 60,
                 "the first worker to get through two batches", interval=0.02)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)

    operation.refresh_from_db()
    assert operation.state == BulkOperation.State.RUNNING and 0 < operation.processed < count  # killed half-way
    assert operation.runs == 1 and operation.worker_name
    # Its heartbeat is fresh: for all we know its worker is alive, so it is not taken from it.
    assert bulk_operations_recover().resumed == []

    time.sleep(1.2)
    recovery = bulk_operations_recover(lease=timedelta(seconds=1))
    assert recovery.resumed == [operation.pk]
    assert bulk_operations_recover(lease=timedelta(seconds=1)).resumed == []  # once: it is PENDING, just enqueued

    second = start_urgent_worker()
    assert second.wait(120) == 0

    operation.refresh_from_db()
    assert (operation.state, operation.runs) == (BulkOperation.State.DONE, 2)
    # Each batch committed with its checkpoint, so the second run went on from there: every task exactly once.
    assert (operation.processed, operation.changed, operation.refused, operation.percent) == (count, count, 0, 100)
    assert operation.message == f"Requeued {count} task(s)."
    assert CaptionTask.objects.filter(status=TaskStatus.QUEUED, attempts=0).count() == count
    requeues = TaskEvent.objects.filter(kind=TaskEvent.Kind.REQUEUED)
    assert requeues.count() == count and requeues.values("task").distinct().count() == count
    assert AuditEntry.objects.get(action="tasks_requeue").count == count
    assert AuditEntry.objects.get(action="bulk_operation_resumed").detail["was"] == "running"


def test_pending_operation_whose_job_redis_lost_is_enqueued_again(redis, media_image, admin_user):
    ids = [task.pk for task in CaptionTask.objects.bulk_create(
        [CaptionTask(image_ref=media_image(), status=TaskStatus.FAILED) for _ in range(5)])]
    operation = bulk_operation_start(kind=BulkOperation.Kind.REQUEUE, task_ids=ids, user=admin_user)
    redis.flushdb()  # Redis lost its data: the operation's job is gone, the row still says PENDING

    assert bulk_operations_recover().resumed == []  # not before the lease has passed
    time.sleep(1.2)
    assert bulk_operations_recover(lease=timedelta(seconds=1)).resumed == [operation.pk]
    assert broker.queue_lengths()["urgent"] == 1
    run_worker()

    operation.refresh_from_db()
    assert (operation.state, operation.changed) == (BulkOperation.State.DONE, 5)
    assert CaptionTask.objects.filter(status=TaskStatus.COMPLETED).count() == 5


def test_pending_operation_waiting_behind_other_work_is_left_alone(redis, media_image, admin_user):
    from queues.operations.services import queue_set_paused

    ids = [task.pk for task in CaptionTask.objects.bulk_create(
        [CaptionTask(image_ref=media_image(), status=TaskStatus.FAILED) for _ in range(5)])]
    queue_set_paused(queue_name="urgent", paused=True)  # its job waits, as behind a long stretch of urgent work
    operation = bulk_operation_start(kind=BulkOperation.Kind.REQUEUE, task_ids=ids, user=admin_user)
    time.sleep(1.2)
    assert bulk_operations_recover(lease=timedelta(seconds=1)).resumed == []
    assert broker.queue_lengths()["urgent"] == 1  # no second job
    assert not AuditEntry.objects.filter(action="bulk_operation_resumed").exists()
    queue_set_paused(queue_name="urgent", paused=False)
    run_worker()
    operation.refresh_from_db()
    assert (operation.state, operation.changed) == (BulkOperation.State.DONE, 5)


def test_operation_whose_runs_keep_dying_is_given_up(redis, admin_user):
    operation = BulkOperation.objects.create(kind=BulkOperation.Kind.CANCEL, task_ids="1,2,3", total=3,
                                             state=BulkOperation.State.RUNNING, runs=BULK_MAX_RUNS, checkpoint=2,
                                             heartbeat_at=timezone.now() - timedelta(minutes=5))

    recovery = bulk_operations_recover()

    assert (recovery.resumed, recovery.given_up) == ([], [operation.pk])
    operation.refresh_from_db()
    assert operation.state == BulkOperation.State.FAILED and f"stopped {BULK_MAX_RUNS} times" in operation.message
    assert broker.queue_lengths()["urgent"] == 0
    assert AuditEntry.objects.filter(action="bulk_operation_given_up", target=f"bulk operation {operation.pk}").exists()
