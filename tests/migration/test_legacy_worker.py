"""The database poller: claims only database tasks, once, with the RQ worker's attempt rules; stops gracefully."""

import signal

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from migration.legacy import LegacyPoller, task_claim_polled
from migration.models import LegacyWorker
from monitoring.metrics.snapshot import take_snapshot
from queues import broker
from queues.models import CaptionTask, Dispatch, TaskEvent, TaskStatus
from tests.processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_burst_runs_every_database_task_once_and_leaves_rq_tasks_alone(redis, database_tasks, media_image):
    ids = database_tasks(6)
    [rq_task] = CaptionTask.objects.insert_new([(media_image(), "normal", None)], publish_after=timezone.now())
    result = LegacyPoller(name="poller.test", interval=0.01).work(burst=True)
    assert (result.processed, result.completed) == (6, 6)
    assert set(CaptionTask.objects.filter(pk__in=ids).values_list("status", flat=True)) == {TaskStatus.COMPLETED}
    assert TaskEvent.objects.filter(task_id__in=ids, kind="completed", worker_name="poller.test").count() == 6
    assert CaptionTask.objects.get(pk=rq_task).status == TaskStatus.QUEUED
    poller = LegacyWorker.objects.get(name="poller.test")
    assert poller.stopped_at is not None and poller.processed == 6


def test_max_tasks_stops_after_n(redis, database_tasks):
    database_tasks(5)
    result = LegacyPoller(interval=0.01).work(max_tasks=2)
    assert result.processed == 2
    assert CaptionTask.objects.filter(status=TaskStatus.COMPLETED).count() == 2


def test_a_transient_error_is_retried_with_backoff_then_dead_lettered(redis, database_tasks, settings):
    settings.RQ_MAX_RETRIES, settings.RQ_RETRY_BACKOFF = 1, 0.0
    [task_id] = database_tasks(1)
    task = CaptionTask.objects.get(pk=task_id)
    CaptionTask.objects.filter(pk=task.pk).update(image_ref="https://127.0.0.1:1/missing.png",
                                                  correlation_id="submitted-by-request")
    settings.IMAGE_FETCH_ALLOW_PRIVATE = True
    LegacyPoller(interval=0.01).work(burst=True)
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED and task.attempts == 2
    assert list(task.events.values_list("kind", flat=True)) == ["retry_scheduled", "failed"]
    assert task.dispatch == Dispatch.DATABASE  # a retry stays with the poller
    # Its dead letter is where an RQ worker's would be: counted, alerted on, listed, requeued like any other.
    assert broker.dead_letter_job_ids("normal") == [task.job_id]
    job = broker.fetch_job(task_id)
    assert job.get_status() == "failed" and job.args == [task_id]
    assert job.meta["correlation_id"] == "submitted-by-request"
    assert take_snapshot().dead_letters["normal"] == 1


def test_a_claim_takes_a_candidate_only_if_it_is_still_queued_and_due(redis, database_tasks):
    """The claim is conditional: a candidate read as due that another poller has put back into a retry's backoff
    since (SQLite reads candidates, then claims), or that another poller has claimed, is not taken. The real race
    between claimants is the two-poller test below."""
    from datetime import timedelta

    from migration.legacy import _take

    [task_id] = database_tasks(1)
    CaptionTask.objects.filter(pk=task_id).update(publish_after=timezone.now() + timedelta(seconds=60))
    assert _take(task_id, Dispatch.DATABASE, "poller.a") is None
    CaptionTask.objects.filter(pk=task_id).update(publish_after=timezone.now())
    first = _take(task_id, Dispatch.DATABASE, "poller.a")
    assert first is not None and first.worker_name == "poller.a"
    assert _take(task_id, Dispatch.DATABASE, "poller.b") is None
    assert task_claim_polled(worker_name="poller.b") is None


def test_two_pollers_at_once_run_every_task_exactly_once(redis, database_tasks, settings):
    """Two pollers in threads, each with its own database connection (SKIP LOCKED on MariaDB, conditional updates
    over candidates on SQLite)."""
    import threading

    from django.db import connection
    from django.db.models import Count

    settings.CAPTION_BACKEND = "noop"
    ids = database_tasks(300)
    pollers = [LegacyPoller(name=f"poller.thread.{index}", interval=0.01) for index in range(2)]

    def work(poller):
        try:
            poller.work(burst=True)
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(poller,)) for poller in pollers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    completions = dict(TaskEvent.objects.filter(kind="completed").values("task_id").annotate(n=Count("id"))
                       .values_list("task_id", "n"))
    assert {completions.get(pk) for pk in ids} == {1}
    assert sum(poller.result.completed for poller in pollers) == 300
    assert all(poller.result.completed > 0 for poller in pollers)  # both worked: neither waited the other out


def test_sigterm_finishes_the_task_in_hand_then_exits(redis, slow_poller):
    process, ids = slow_poller("poller.sig", 3, 1.5)
    try:
        wait_for(lambda: CaptionTask.objects.filter(status=TaskStatus.PROCESSING).exists(), 20, "a task started")
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    statuses = sorted(CaptionTask.objects.filter(pk__in=ids).values_list("status", flat=True))
    assert statuses == [TaskStatus.COMPLETED, TaskStatus.QUEUED, TaskStatus.QUEUED]
    assert LegacyWorker.objects.get(name="poller.sig").stopped_at is not None


def test_the_command_refuses_bad_arguments(db):
    with pytest.raises(CommandError, match="--max-tasks"):
        call_command("run_legacy_worker", "--max-tasks", "0")
    with pytest.raises(CommandError, match="--interval"):
        call_command("run_legacy_worker", "--interval", "-1")


def test_registers_while_running(redis):
    poller = LegacyPoller(name="poller.reg", interval=0.05)
    import threading

    thread = threading.Thread(target=poller.work)
    thread.start()
    try:
        wait_for(lambda: LegacyWorker.objects.filter(name="poller.reg", stopped_at__isnull=True).exists(), 10,
                 "registered")
    finally:
        poller.stopping = True
        thread.join(10)
    assert LegacyWorker.objects.get(name="poller.reg").stopped_at is not None


def test_the_poller_takes_the_highest_priority_first_across_database_and_fallback(redis, database_tasks):
    """As RQ workers listen to urgent, high, normal, low: an older normal task waits for a newer urgent one, and an
    urgent fallback task goes before a normal database one."""
    from datetime import timedelta

    old_normal = database_tasks(1, priority="normal")[0]
    urgent_fallback = database_tasks(1, priority="urgent")[0]
    high = database_tasks(1, priority="high")[0]
    CaptionTask.objects.filter(pk=old_normal).update(publish_after=timezone.now() - timedelta(hours=1))
    CaptionTask.objects.filter(pk=urgent_fallback).update(dispatch=Dispatch.FALLBACK)
    taken = [task_claim_polled(worker_name="poller.order").pk for _ in range(3)]
    assert taken == [urgent_fallback, high, old_normal]


def test_a_poller_judges_leases_only_on_a_look_that_follows_a_recent_one(redis, database_tasks):
    """After an outage every lease looks expired while their pollers' renewals are still on their way: a poller
    re-drives a dead poller's attempt only on a look that follows one a few seconds before, as the reconciler does."""
    import time
    from datetime import timedelta

    from migration.legacy import RECOVER_EVERY

    [task_id] = database_tasks(1)
    assert task_claim_polled(worker_name="poller.dead") is not None
    CaptionTask.objects.filter(pk=task_id).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    poller = LegacyPoller(name="poller.alive")

    poller._recover()  # its first look (just started, or just back from an outage): judges nothing
    assert CaptionTask.objects.get(pk=task_id).status == TaskStatus.PROCESSING
    poller._recovered_at = time.monotonic() - 60  # the previous look was long ago: the database was away
    poller._recover()
    assert CaptionTask.objects.get(pk=task_id).status == TaskStatus.PROCESSING
    poller._recovered_at = time.monotonic() - RECOVER_EVERY - 0.1  # a look a few seconds ago reached the database
    poller._recover()
    task = CaptionTask.objects.get(pk=task_id)
    assert task.status == TaskStatus.QUEUED and task.last_error_class == "WorkerLost"
