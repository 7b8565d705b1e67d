"""Drills: the reconciler's check for jobs lost from Redis never mistakes live jobs for lost ones, whatever the
workers are doing while it looks, and Redis refusing writes loses nothing."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db.models import Count
from django.utils import timezone
from redis import exceptions as redis_errors

from queues.fleet.reconcile import tasks_reconcile
from queues.models import CaptionTask, TaskEvent, TaskStatus
from queues.services import TaskSpec, tasks_relay_once, tasks_submit_many
from tests.conftest import run_worker, subprocess_env

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_reconciling_while_workers_drain_a_backlog_publishes_nothing_twice(redis, media_image):
    created = tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(3000)]).created
    CaptionTask.objects.update(published_at=timezone.now() - timedelta(minutes=5))  # all past the grace
    environment = subprocess_env()
    workers = [subprocess.Popen([sys.executable, "manage.py", "rqworker", "urgent", "high", "normal", "low",
                                 "--burst", "--verbosity", "0"], cwd=settings.BASE_DIR, env=environment)
               for _ in range(2)]
    passes = 0
    try:
        while any(worker.poll() is None for worker in workers):
            tasks_reconcile()
            passes += 1
            time.sleep(0.05)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
    assert passes > 5
    assert not TaskEvent.objects.filter(kind=TaskEvent.Kind.REPUBLISHED).exists()
    assert CaptionTask.objects.filter(pk__in=created, status=TaskStatus.COMPLETED, attempts=1).count() == 3000
    runs = TaskEvent.objects.filter(kind=TaskEvent.Kind.COMPLETED).values("task").annotate(n=Count("id"))
    assert {row["n"] for row in runs} == {1}
    assert redis.llen("rq:queue:normal") == 0  # nothing pushed twice is left over


def test_redis_out_of_memory_loses_no_submission_and_runs_everything_once_memory_is_freed(
        redis_server_factory, media_image, capsys):
    server = redis_server_factory("full")
    client = server.client()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(client.info("memory")["used_memory"] + 2_000_000))
    filler = 0
    for size in (100_000, 1000, 50):  # fill Redis to its limit; smaller values fill what the client buffers free
        with pytest.raises(redis_errors.OutOfMemoryError):
            while True:
                client.set(f"filler:{filler}", b"x" * size)
                filler += 1

    reference = media_image()
    call_command("submit_tasks", "--count", "20", "--image", reference)  # exits 0: submission does not need Redis
    assert "20" in capsys.readouterr().out
    assert CaptionTask.objects.filter(status=TaskStatus.QUEUED, published_at__isnull=True).count() == 20
    assert tasks_relay_once() == 0  # Redis still refuses: nothing is marked published
    for _ in range(3):  # the reconciler finds nothing "published" without a job, and writes nothing
        assert tasks_reconcile().republished == []
    assert not TaskEvent.objects.exists()

    client.delete(*[f"filler:{index}" for index in range(filler)])  # memory freed
    assert tasks_relay_once() == 20
    run_worker()
    assert CaptionTask.objects.filter(status=TaskStatus.COMPLETED, attempts=1).count() == 20
