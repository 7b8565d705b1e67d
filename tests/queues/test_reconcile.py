"""The reconciler against real Redis state: dead workers' tasks re-driven, lost jobs published again."""

import json
from datetime import timedelta

import pytest
from django.utils import timezone
from rq.registry import FailedJobRegistry

from queues import broker
from queues.execution import task_claim
from queues.models import CaptionTask, FleetEvent, TaskEvent, TaskStatus
from queues.reconcile import tasks_reconcile
from queues.services import TaskSpec, task_submit, tasks_submit_many
from queues.worker import alive_key

pytestmark = pytest.mark.django_db(transaction=True)


def claimed_task(reference, worker="worker-a", seconds_ago=60):
    task = task_submit(image_ref=reference)
    task_claim(task_id=task.pk, worker_name=worker)
    CaptionTask.objects.filter(pk=task.pk).update(started_at=timezone.now() - timedelta(seconds=seconds_ago))
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


def test_task_of_a_live_worker_running_it_is_left_alone(redis, media_image):
    task = claimed_task(media_image())
    redis.set(alive_key("worker-a"), json.dumps({"pid": 1, "job": task.job_id}), ex=10)
    assert not tasks_reconcile().changed
    assert CaptionTask.objects.get(pk=task.pk).status == TaskStatus.PROCESSING


def test_task_whose_live_worker_moved_on_is_redriven(redis, media_image):
    task = claimed_task(media_image())
    redis.set(alive_key("worker-a"), json.dumps({"pid": 1, "job": "caption-999999"}), ex=10)
    assert tasks_reconcile().redriven == [task.pk]


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


def test_jobs_lost_from_redis_are_published_again_once(redis, media_image):
    reference = media_image()
    created = tasks_submit_many(specs=[TaskSpec(reference) for _ in range(30)]).created
    CaptionTask.objects.update(published_at=timezone.now() - timedelta(minutes=5))
    redis.ltrim("rq:queue:normal", 0, 19)  # ten jobs popped by a worker that died before claiming them
    lost = set(created[20:])
    result = tasks_reconcile()
    assert set(result.republished) == lost
    ids = [int(raw.decode().split("-")[1]) for raw in redis.lrange("rq:queue:normal", 0, -1)]
    assert sorted(ids) == sorted(created)
    assert TaskEvent.objects.filter(kind=TaskEvent.Kind.REPUBLISHED).count() == 10
    CaptionTask.objects.filter(published_at__gt=timezone.now() - timedelta(minutes=1)).update(
        published_at=timezone.now() - timedelta(minutes=5))
    assert tasks_reconcile().republished == []


def test_redis_losing_everything_loses_no_task(redis, media_image):
    created = tasks_submit_many(specs=[TaskSpec(media_image(), priority=priority)
                                       for priority in ("urgent", "low") * 5]).created
    CaptionTask.objects.update(published_at=timezone.now() - timedelta(minutes=5))
    redis.flushdb()
    assert sorted(tasks_reconcile().republished) == sorted(created)
    assert broker.queue_lengths() == {"urgent": 5, "high": 0, "normal": 0, "low": 5}


def test_freshly_published_tasks_are_not_mistaken_for_lost(redis, media_image):
    tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(3)])
    redis.delete("rq:queue:normal")  # popped a moment ago: a worker is about to claim them
    assert tasks_reconcile().republished == []
