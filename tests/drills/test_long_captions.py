"""Drill: captions as long as the old system's tasks (90 s) through a scale-down, a hand-over to a second supervisor
and a supervisor's stop, all while they run.

Each of these retires a worker gracefully: it finishes its caption, then exits. Nothing on that path may wait on a
timeout meant for shorter work: the supervisor's stop timeout (RQ_DEFAULT_TIMEOUT + 40 s), rq's job limit
(RQ_DEFAULT_TIMEOUT + 30 s), the worker's key TTL while busy (job limit + 60 s), the task's database lease (renewed
every 2 s) and the supervisors' slot leases (renewed while a retiring worker finishes). A caption of up to 90 s
needs RQ_DEFAULT_TIMEOUT above 90 (the captioner's own HTTP timeout): the drill runs with 120, and deploy/'s grace
periods must then be at least RQ_DEFAULT_TIMEOUT + 60 s (README, "Stopping").
"""

from __future__ import annotations

import signal
import time

import pytest

from queues.fleet.services import pool_scale
from queues.models import CaptionTask, TaskEvent, TaskStatus
from queues.services import task_submit
from tests.processes import Supervisors, live_workers, parent_pid, slow_ollama, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CAPTION_SECONDS = 90
TIMEOUT = "120"  # RQ_DEFAULT_TIMEOUT for captions of up to 90 s


def stopping_workers(redis) -> int:
    """Registered workers told to stop (their liveness thread writes rq's shutdown date into their hash)."""
    return sum(1 for key in redis.smembers("rq:workers") if redis.hexists(key, "shutdown_requested_date"))


def test_ninety_second_captions_through_a_scale_down_a_hand_over_and_a_supervisor_stop_each_run_once(
        redis, pool, http_server, png_bytes, settings):
    settings.RQ_DEFAULT_TIMEOUT = int(TIMEOUT)
    image = slow_ollama(http_server, png_bytes, delay=CAPTION_SECONDS)
    group = Supervisors(CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url, RQ_DEFAULT_TIMEOUT=TIMEOUT)
    try:
        first = group.start()
        pool_scale(pool=pool, desired=3)
        wait_for(lambda: len(live_workers()) == 3, 60, "three workers")
        tasks = [task_submit(image_ref=image) for _ in range(3)]
        ids = [task.pk for task in tasks]
        wait_for(lambda: CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.PROCESSING).count() == 3, 30,
                 "three captions running")
        started = time.monotonic()

        pool_scale(pool=pool, desired=2)  # index 2 retires: its worker finishes its caption first
        wait_for(lambda: stopping_workers(redis) == 1, 20, "the scale-down to retire a worker")
        second = group.start()  # a second supervisor: the first hands one of its two slots over to it
        wait_for(lambda: stopping_workers(redis) == 2, 30, "the hand-over to retire a second worker")
        first.send_signal(signal.SIGTERM)  # and the first stops: its last worker finishes its caption too
        wait_for(lambda: stopping_workers(redis) == 3, 20, "the first supervisor's stop to retire the third")

        # While the captions run, nothing is re-driven, nothing is killed, the first supervisor waits.
        time.sleep(max(0.0, CAPTION_SECONDS - 20 - (time.monotonic() - started)))
        assert first.poll() is None
        assert CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.PROCESSING).count() == 3

        done = wait_for(lambda: CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.COMPLETED).count() == 3
                        and first.poll() is not None, 60, "the three captions to complete and the supervisor to exit")
        assert done and first.returncode == 0
        for task in CaptionTask.objects.filter(pk__in=ids):
            assert task.attempts == 1
            assert list(task.events.values_list("kind", flat=True)) == [TaskEvent.Kind.COMPLETED]
        output = group.output()
        assert "killed" not in output and "worker_crashed" not in output
        # The second supervisor takes over the slots the first let go of; the pool runs its two workers again.
        wait_for(lambda: len(live_workers()) == 2 and
                 {parent_pid(row.pid) for row in live_workers()} == {second.pid}, 60, "two workers on the second")
    finally:
        group.stop_all()
