"""The reconciler against real Redis state: dead workers' tasks re-driven, lost jobs published again."""

import time
from datetime import timedelta
from datetime import timezone as dt_timezone

import pytest
from django.utils import timezone
from rq.registry import FailedJobRegistry

from queues import broker
from queues.execution import task_claim
from queues.fleet.reconcile import CONFIRM_AFTER, TASK_LEASE_SECONDS, tasks_reconcile
from queues.models import CaptionTask, FleetEvent, TaskEvent, TaskStatus
from queues.services import TaskSpec, task_submit, tasks_submit_many

pytestmark = pytest.mark.django_db(transaction=True)


def claimed_task(reference, worker="worker-a", seconds_ago=60):
    """A task claimed by ``worker`` whose last heartbeat was ``seconds_ago``."""
    task = task_submit(image_ref=reference)
    task_claim(task_id=task.pk, worker_name=worker)
    at = timezone.now() - timedelta(seconds=seconds_ago)
    CaptionTask.objects.filter(pk=task.pk).update(started_at=at, heartbeat_at=at)
    return CaptionTask.objects.get(pk=task.pk)


def test_task_of_a_dead_worker_is_redriven_with_backoff(redis, media_image, settings):
    settings.RQ_RETRY_BACKOFF = 5
    task = claimed_task(media_image())
    result = tasks_reconcile()
    task.refresh_from_db()
    assert result.redriven == [task.pk]
    assert task.status == TaskStatus.QUEUED and task.published_at is None and task.last_error_class == "WorkerLost"
    assert task.publish_after > timezone.now() + timedelta(seconds=3)
    event = task.events.get()
    assert (event.kind, event.attempt, event.worker_name) == (TaskEvent.Kind.WORKER_LOST, 1, "worker-a")
    assert FleetEvent.objects.get(kind=FleetEvent.Kind.TASKS_RECOVERED).figures["redriven"] == 1
    assert tasks_reconcile().redriven == []  # done once


def test_task_whose_worker_keeps_its_lease_is_left_alone_with_nothing_in_redis(redis, media_image):
    task = claimed_task(media_image(), seconds_ago=TASK_LEASE_SECONDS - 5)
    redis.flushdb()  # a Redis restart or flush: every key the worker kept there is gone
    assert attempts_heartbeat_for(task) == 1
    CaptionTask.objects.filter(pk=task.pk).update(started_at=timezone.now() - timedelta(minutes=10))
    assert not tasks_reconcile().changed
    assert CaptionTask.objects.get(pk=task.pk).status == TaskStatus.PROCESSING


def attempts_heartbeat_for(task) -> int:
    from queues import execution

    execution._in_flight[task.pk] = task.claim_token
    try:
        return execution.attempts_heartbeat()
    finally:
        execution._in_flight.pop(task.pk, None)


def test_lease_is_judged_on_the_database_clock(redis, media_image):
    task = claimed_task(media_image(), seconds_ago=TASK_LEASE_SECONDS + 5)
    assert attempts_heartbeat_for(task) == 1  # the worker beats: heartbeat_at is the database's now
    assert not tasks_reconcile().changed
    assert attempts_heartbeat_for(CaptionTask.objects.get(pk=task.pk)) == 1


def test_late_worker_cannot_end_a_newer_attempt_after_a_requeue(redis, media_image):
    from queues.execution import _record_success
    from queues.operations.services import tasks_requeue

    task = claimed_task(media_image())
    old_attempt = CaptionTask.objects.get(pk=task.pk)
    tasks_reconcile()  # the reconciler gave up on the old worker (its lease expired)...
    CaptionTask.objects.filter(pk=task.pk).update(status=TaskStatus.FAILED)
    tasks_requeue(task_ids=[task.pk])  # ...an operator requeued the task: attempts start again from 0
    newer = task_claim(task_id=task.pk, worker_name="worker-b")
    assert newer is not None and newer.attempts == old_attempt.attempts == 1
    outcome = _record_success(old_attempt, "a caption from the old run", started=0.0)  # the old worker wakes up
    assert outcome.status == "skipped"
    task.refresh_from_db()
    assert task.status == TaskStatus.PROCESSING and task.worker_name == "worker-b" and task.caption == ""


def test_recently_claimed_task_is_not_judged_yet(redis, media_image):
    claimed_task(media_image(), seconds_ago=1)
    assert not tasks_reconcile().changed


def test_task_out_of_retries_goes_to_dead_letters(redis, media_image, settings):
    settings.RQ_MAX_RETRIES = 0
    task = claimed_task(media_image())
    result = tasks_reconcile()
    task.refresh_from_db()
    assert result.dead_lettered == [task.pk]
    assert task.status == TaskStatus.FAILED and task.last_error_class == "WorkerLost"
    assert task.job_id in FailedJobRegistry("normal", connection=redis).get_job_ids(cleanup=False)


def age_jobs(redis, task_ids, *, minutes_ago_first: int):
    """Gives the tasks' jobs enqueue times one minute apart, oldest first (as if submitted over time)."""
    now = timezone.now()
    for offset, task_id in enumerate(task_ids):
        stamp = (now - timedelta(minutes=minutes_ago_first - offset)).astimezone(dt_timezone.utc)
        redis.hset(f"rq:job:caption-{task_id}", "enqueued_at", stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


def test_jobs_popped_by_a_worker_that_died_are_published_again_once(redis, media_image):
    reference = media_image()
    created = tasks_submit_many(specs=[TaskSpec(reference) for _ in range(30)]).created
    age_jobs(redis, created, minutes_ago_first=40)
    CaptionTask.objects.update(published_at=timezone.now() - timedelta(minutes=5))
    redis.ltrim("rq:queue:normal", 10, -1)  # ten jobs popped by a worker that died before claiming them
    lost = set(created[:10])
    first = tasks_reconcile()
    assert set(first.suspected) == lost and first.republished == []  # a suspicion, not yet a verdict
    time.sleep(CONFIRM_AFTER)
    second = tasks_reconcile()
    assert set(second.republished) == lost
    ids = [int(raw.decode().split("-")[1]) for raw in redis.lrange("rq:queue:normal", 0, -1)]
    assert sorted(ids) == sorted(created)
    assert TaskEvent.objects.filter(kind=TaskEvent.Kind.REPUBLISHED).count() == 10
    CaptionTask.objects.filter(published_at__gt=timezone.now() - timedelta(minutes=1)).update(
        published_at=timezone.now() - timedelta(minutes=5))
    assert tasks_reconcile().republished == [] and tasks_reconcile().suspected == []


def test_redis_losing_everything_loses_no_task(redis, media_image):
    created = tasks_submit_many(specs=[TaskSpec(media_image(), priority=priority)
                                       for priority in ("urgent", "low") * 5]).created
    CaptionTask.objects.update(published_at=timezone.now() - timedelta(minutes=5))
    redis.flushdb()
    assert sorted(tasks_reconcile().suspected) == sorted(created)
    time.sleep(CONFIRM_AFTER)
    assert sorted(tasks_reconcile().republished) == sorted(created)
    assert broker.queue_lengths() == {"urgent": 5, "high": 0, "normal": 0, "low": 5}


def test_a_pass_reads_no_list_whatever_the_backlog(redis, media_image):
    tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(3000)])
    CaptionTask.objects.update(published_at=timezone.now() - timedelta(minutes=5))
    redis.config_resetstat()
    result = tasks_reconcile()
    stats = redis.info("commandstats")
    assert result.checked == 3000 and not result.suspected
    assert "cmdstat_lrange" not in stats
    assert stats["cmdstat_lindex"]["calls"] == len(broker.QUEUE_NAMES)


def test_freshly_published_tasks_are_not_mistaken_for_lost(redis, media_image):
    tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(3)])
    redis.delete("rq:queue:normal")  # popped a moment ago: a worker is about to claim them
    assert tasks_reconcile().republished == []
