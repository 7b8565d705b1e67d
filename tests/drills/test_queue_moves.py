"""Drills: what a worker takes from the queues follows the database, not whatever copies Redis still holds."""

from __future__ import annotations

import pytest

from queues import broker
from queues import control
from queues.fleet.reconcile import tasks_reconcile
from queues.fleet.services import processing_set_suspended
from queues.models import CaptionTask, TaskEvent, TaskStatus
from queues.operations.services import queue_set_paused, tasks_change_priority
from queues.services import TaskSpec, tasks_relay_once, tasks_submit_many
from tests.conftest import run_worker

pytestmark = pytest.mark.django_db(transaction=True)


def test_tasks_moved_into_a_paused_queue_wait_there_however_their_old_entries_are_popped(redis, media_image):
    created = tasks_submit_many(specs=[TaskSpec(media_image(), priority="urgent") for _ in range(20)]).created
    queue_set_paused(queue_name="low", paused=True)
    result = tasks_change_priority(task_ids=created, priority="low")
    assert result.changed == 20
    assert broker.queue_lengths()["urgent"] == 20  # the old entries are still there...

    run_worker()  # ...and a worker on all four queues pops every one of them
    assert broker.queue_lengths() == {"urgent": 0, "high": 0, "normal": 0, "low": 20}
    assert set(CaptionTask.objects.values_list("status", "attempts")) == {(TaskStatus.QUEUED, 0)}
    assert not TaskEvent.objects.exclude(kind=TaskEvent.Kind.PRIORITY_CHANGED).exists()

    queue_set_paused(queue_name="low", paused=False)
    run_worker()
    assert set(CaptionTask.objects.values_list("status", "attempts")) == {(TaskStatus.COMPLETED, 1)}


def test_pauses_and_suspension_survive_a_redis_flush(redis, media_image):
    tasks_submit_many(specs=[TaskSpec(media_image(), priority="normal") for _ in range(3)])
    queue_set_paused(queue_name="normal", paused=True)
    processing_set_suspended(suspended=True)
    redis.flushdb()  # a restart without persistence, or a failover to a replica that lacked the keys
    assert control.paused_queues() == {"normal"} and control.processing_suspended()
    CaptionTask.objects.update(published_at=None)  # their jobs went with the flush: the relay publishes them again
    tasks_relay_once()
    run_worker()  # burst: a suspended worker exits without taking anything
    processing_set_suspended(suspended=False)
    run_worker()  # normal is still paused
    assert CaptionTask.objects.filter(status=TaskStatus.QUEUED).count() == 3
    queue_set_paused(queue_name="normal", paused=False)
    run_worker()
    assert CaptionTask.objects.filter(status=TaskStatus.COMPLETED).count() == 3
    assert tasks_reconcile().republished == []


def test_one_active_queue_left_leaves_nothing_in_an_intermediate_list(redis, media_image):
    tasks_submit_many(specs=[TaskSpec(media_image(), priority="high") for _ in range(5)])
    for name in ("urgent", "normal", "low"):
        queue_set_paused(queue_name=name, paused=True)
    run_worker()  # only "high" is active: rq would pop it with LMOVE into rq:queue:high:intermediate
    assert CaptionTask.objects.filter(status=TaskStatus.COMPLETED).count() == 5
    assert redis.llen("rq:queue:high:intermediate") == 0
    assert redis.zcard("rq:failed:high") == 0
