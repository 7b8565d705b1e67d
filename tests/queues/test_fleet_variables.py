"""The old system's fleet variables with real supervisors: seed 000's emergency step (``export RQ_WORKER_COUNT=8``,
restart) gives 8 workers, and RQ_CLEANUP_INTERVAL runs what ``tasks cleanup`` does, once per interval across the
fleet."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from queues import broker
from queues.fleet import supervisor as supervisor_module
from queues.fleet.supervisor import CLEANUP_KEY, Supervisor
from queues.models import CaptionTask, FleetEvent, TaskStatus, WorkerPool
from queues.operations.services import tasks_cleanup
from queues.services import TaskSpec, tasks_submit_many
from tests.processes import Supervisors, live_workers, wait_for

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture
def pool(db):
    pool, _ = WorkerPool.objects.update_or_create(
        name="default", defaults={"queues": "urgent high normal low", "desired": 2, "minimum": 1, "maximum": 6})
    return pool


@pytest.mark.slow
def test_export_rq_worker_count_8_and_a_restart_give_8_workers(redis, pool):
    first = Supervisors()
    try:
        first.start()
        wait_for(lambda: len(live_workers()) == 2, 30, "the pool's two workers")
    finally:
        first.stop_all()
    assert live_workers() == []

    second = Supervisors(RQ_WORKER_COUNT="8")  # the runbook's emergency step, then the restart
    try:
        second.start()
        wait_for(lambda: len(live_workers()) == 8, 90, "eight workers after the restart")
        assert "RQ_WORKER_COUNT=8: pool 'default' set from 2 to 8 worker(s)" in second.output()
    finally:
        second.stop_all()
    pool.refresh_from_db()
    assert (pool.desired, pool.minimum, pool.maximum) == (8, 1, 8)  # the bounds widened to hold it
    scaled = FleetEvent.objects.get(kind=FleetEvent.Kind.POOL_SCALED)
    assert scaled.reason == "RQ_WORKER_COUNT at supervisor start" and scaled.figures == {"from": 2, "to": 8}


def _tasks(media_image, count: int, status: str, finished_days_ago: float) -> list[int]:
    ids = tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(count)]).created
    CaptionTask.objects.filter(pk__in=ids).update(status=status,
                                                  finished_at=timezone.now() - timedelta(days=finished_days_ago))
    return ids


def test_the_supervisor_cleans_up_on_the_interval(redis, pool, media_image):
    old = _tasks(media_image, 3, TaskStatus.COMPLETED, 2) + _tasks(media_image, 1, TaskStatus.CANCELLED, 2)
    kept = _tasks(media_image, 1, TaskStatus.FAILED, 2) + _tasks(media_image, 2, TaskStatus.COMPLETED, 0.5)
    group = Supervisors(RQ_CLEANUP_INTERVAL="2", TASK_RETENTION_DAYS="1")
    try:
        group.start("--no-workers")
        wait_for(lambda: not CaptionTask.objects.filter(pk__in=old).exists(), 30, "the first cleanup")
        assert sorted(CaptionTask.objects.values_list("pk", flat=True)) == sorted(kept)  # dead letters, recent
        wait_for(lambda: "cleanup (every 2 s): deleted 4 task row(s) finished more than 1 day(s) ago" in
                 group.output(), 10, "the cleanup's log line")
        later = _tasks(media_image, 2, TaskStatus.COMPLETED, 3)  # grown old since: the next pass takes them
        wait_for(lambda: not CaptionTask.objects.filter(pk__in=later).exists(), 30, "the next cleanup")
    finally:
        group.stop_all()
    assert sorted(CaptionTask.objects.values_list("pk", flat=True)) == sorted(kept)


def test_without_the_interval_nothing_is_cleaned_up(redis, pool, media_image, settings):
    old = _tasks(media_image, 2, TaskStatus.COMPLETED, 40)
    settings.RQ_CLEANUP_INTERVAL = 0
    Supervisor(run_workers=False)._periodic()
    assert CaptionTask.objects.filter(pk__in=old).count() == 2 and redis.get(CLEANUP_KEY) is None


def test_a_cleanup_longer_than_its_budget_goes_on_at_the_next_pass_and_runs_once_in_the_fleet(
        redis, pool, media_image, monkeypatch, settings):
    settings.RQ_CLEANUP_INTERVAL, settings.TASK_RETENTION_DAYS = 3600, 30
    old = _tasks(media_image, 3, TaskStatus.COMPLETED, 40)
    first, second = Supervisor(run_workers=False), Supervisor(run_workers=False)
    connection = broker.get_connection()

    monkeypatch.setattr(supervisor_module, "CLEANUP_BUDGET", 0.0)  # spent before the first batch
    first._cleanup(connection, time.monotonic())
    assert CaptionTask.objects.filter(pk__in=old).count() == 3
    assert redis.get(CLEANUP_KEY) == f"{first.id}:continuing".encode() and first._next_cleanup <= time.monotonic()
    # A dead holder lets it go after a minute, when another supervisor starts afresh.
    assert 0 < redis.pttl(CLEANUP_KEY) <= supervisor_module.CLEANUP_CONTINUING_TTL * 1000

    second._cleanup(connection, time.monotonic())  # another supervisor's pass: not its turn
    assert CaptionTask.objects.filter(pk__in=old).count() == 3

    monkeypatch.setattr(supervisor_module, "CLEANUP_BUDGET", 5.0)
    first._cleanup(connection, time.monotonic())
    assert not CaptionTask.objects.filter(pk__in=old).exists()
    assert redis.get(CLEANUP_KEY) == first.id.encode() and redis.pttl(CLEANUP_KEY) > 3500 * 1000  # next in an hour
    again = _tasks(media_image, 1, TaskStatus.COMPLETED, 40)
    second._cleanup(connection, time.monotonic())
    first._cleanup(connection, time.monotonic())
    assert CaptionTask.objects.filter(pk__in=again).count() == 1  # an hour has not passed


def test_tasks_cleanup_stops_when_its_budget_is_spent_and_goes_on_when_called_again(redis, media_image):
    old = _tasks(media_image, 3, TaskStatus.COMPLETED, 40)
    cutoff = timezone.now() - timedelta(days=30)
    assert tasks_cleanup(cutoff=cutoff, budget=0.0) == {"rows": 0, "jobs": 0, "finished": False, "kept": 0,
                                                        "why_kept": ""}
    done = tasks_cleanup(cutoff=cutoff, budget=30.0)
    assert done["rows"] == 3 and done["finished"] and not CaptionTask.objects.filter(pk__in=old).exists()


def test_a_database_error_stops_the_cleanup_with_a_log_line_and_gives_its_turn_back(redis, pool, media_image,
                                                                                   settings, caplog):
    from django.db import connection

    settings.RQ_CLEANUP_INTERVAL, settings.TASK_RETENTION_DAYS = 3600, 30
    old = _tasks(media_image, 2, TaskStatus.COMPLETED, 40)
    supervisor = Supervisor(run_workers=False)
    with connection.cursor() as cursor:  # a real error from the database: the events' table is away
        cursor.execute("ALTER TABLE queues_taskevent RENAME TO queues_taskevent_away")
    try:
        with caplog.at_level("WARNING", logger="queues.supervisor"):
            supervisor._cleanup(broker.get_connection(), time.monotonic())
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE queues_taskevent_away RENAME TO queues_taskevent")
    assert "cleanup stopped by a database error" in caplog.text
    assert CaptionTask.objects.filter(pk__in=old).count() == 2  # the batch rolled back whole
    assert redis.get(CLEANUP_KEY) is None  # its turn is given back: tried again at the next check
    supervisor._cleanup(broker.get_connection(), time.monotonic())
    assert not CaptionTask.objects.filter(pk__in=old).exists()
