"""Drills: a task that a live worker is still running is never handed to another worker, whatever Redis does;
a worker that really died is recovered. Real supervisors, workers and Redis servers; a slow captioning server."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from queues.fleet.services import pool_scale
from queues.models import CaptionTask, FleetEvent, TaskEvent, TaskStatus
from queues.services import task_submit
from tests.processes import Supervisors, live_workers, parent_pid, slow_ollama, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def restart_empty(server, seconds: float) -> None:
    """Redis stopped, and back after ``seconds`` with nothing in it (its data lost: a restart without
    persistence, a failover to an empty replica)."""
    server.stop()
    for entry in server.directory.iterdir():
        if entry.name.startswith("appendonly") or entry.suffix in (".aof", ".rdb"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    time.sleep(seconds)
    server.start()


def freeze(server, seconds: float) -> None:
    """The Redis process frozen (SIGSTOP): connections hang instead of failing; its keys' TTLs run on."""
    pid = server.running_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("fault", [restart_empty, freeze], ids=["redis-restarted-empty", "redis-frozen"])
def test_running_task_survives_a_redis_fault_and_completes_once(fault, redis_server_factory, pool, http_server,
                                                                 png_bytes):
    server = redis_server_factory("drill")
    image = slow_ollama(http_server, png_bytes, delay=15)
    group = Supervisors(CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url)
    try:
        group.start()
        group.start()  # two supervisors: the other one's reconciler is watching too
        pool_scale(pool=pool, desired=2)
        # Settled: one worker under each supervisor, the same for 3 s. The first supervisor up may start both and
        # hand one over (a rebalance): a worker starting while Redis is away cannot register, exits and is restarted,
        # which is not what this drill is about.
        supervisors = {process.pid for process in group.processes}
        wait_for(lambda: sorted(parent_pid(row.pid) for row in live_workers()) == sorted(supervisors), 60,
                 "one worker under each supervisor")
        settled = {row.name for row in live_workers()}
        time.sleep(3)
        assert {row.name for row in live_workers()} == settled, "the fleet settled before the fault"
        task = task_submit(image_ref=image)
        running = wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.PROCESSING).first(),
                           20, "the task to start")
        started_workers = FleetEvent.objects.filter(kind__in=[FleetEvent.Kind.WORKER_STARTED,
                                                              FleetEvent.Kind.WORKER_RESTARTED]).count()
        fault(server, 12)
        done = wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.COMPLETED).first(), 40,
                        "the task to complete")
        time.sleep(3)  # anything that would run it a second time has had its chance
        done.refresh_from_db()
        assert done.attempts == 1 and done.worker_name == running.worker_name
        assert list(done.events.values_list("kind", "attempt")) == [(TaskEvent.Kind.COMPLETED, 1)]
        # The workers kept running through the fault: none was retired and replaced.
        assert FleetEvent.objects.filter(kind__in=[FleetEvent.Kind.WORKER_STARTED,
                                                   FleetEvent.Kind.WORKER_RESTARTED]).count() == started_workers
        wait_for(lambda: len(live_workers()) == 2, 20, "both workers listed again")
    finally:
        group.stop_all()


def test_task_of_a_worker_killed_with_its_supervisor_is_recovered_within_30_s(redis, pool, http_server,
                                                                               png_bytes):
    image = slow_ollama(http_server, png_bytes, delay=3)
    group = Supervisors(CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url)
    try:
        first, second = group.start(), group.start()
        pool_scale(pool=pool, desired=2)
        wait_for(lambda: {parent_pid(row.pid) for row in live_workers()} == {first.pid, second.pid}, 30,
                 "a worker under each supervisor")
        task = task_submit(image_ref=image)
        running = wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.PROCESSING).first(),
                           20, "the task to start")
        worker = next(row for row in live_workers() if row.name == running.worker_name)
        supervisor = first if parent_pid(worker.pid) == first.pid else second
        supervisor.kill()  # the whole host goes: supervisor and worker, no chance to tidy
        os.kill(worker.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        done = wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.COMPLETED).first(), 30,
                        "the task to be recovered and completed")
        assert time.monotonic() - killed_at < 30
        assert done.attempts == 2 and done.worker_name != running.worker_name
        assert list(done.events.order_by("id").values_list("kind", "attempt")) == [
            (TaskEvent.Kind.WORKER_LOST, 1), (TaskEvent.Kind.COMPLETED, 2)]
    finally:
        group.stop_all()


@pytest.mark.parametrize("slots", [1, 2])
def test_a_busy_worker_registers_again_after_redis_is_flushed(redis, media_image, slots):
    """Redis loses its data while a worker works a backlog: the worker's next write (its end-of-job pipeline, its
    heartbeat) makes a partial hash of its key before the liveness thread looks. The worker must still be in rq's
    registry again within a liveness period, or rq, the live workers page and rq_workers_active lose a live worker
    (and the no-active-workers alert fires while everything works)."""
    from queues import broker
    from queues.services import TaskSpec, tasks_submit_many
    from tests.processes import start_command, stop_process

    reference = media_image()
    tasks_submit_many(specs=[TaskSpec(reference) for _ in range(3000)])
    name = f"flushed-{slots}"
    worker = start_command("rqworker", "normal", "--name", name, "--slots", str(slots), "--verbosity", "0")
    try:
        wait_for(lambda: CaptionTask.objects.filter(status=TaskStatus.COMPLETED).count() >= 20, 60,
                 "20 tasks completed")
        redis.flushdb()
        time.sleep(6)  # three liveness refreshes
        assert redis.sismember("rq:workers", f"rq:worker:{name}")
        assert redis.hexists(f"rq:worker:{name}", "birth")
        assert name in [registered.name for registered in broker.workers()]
    finally:
        stop_process(worker)
    assert not redis.sismember("rq:workers", f"rq:worker:{name}")  # and its death is registered all the same


def test_a_caption_that_ends_while_redis_is_down_is_recorded_once_and_leaves_no_job_behind(redis_server_factory,
                                                                                            http_server, png_bytes):
    """Redis is stopped during a caption and back a few seconds after it ended: the task is COMPLETED in the
    database, and the end of the job reaches Redis once it is back. A one-slot worker used to quit on the error and
    leave the job's hash "started" and its started-registry entry, which rq's cleanup later filed as a dead letter
    of a completed task."""
    from rq.registry import StartedJobRegistry

    from queues import broker
    from tests.processes import start_command, stop_process

    server = redis_server_factory("ending")
    image = slow_ollama(http_server, png_bytes, delay=4)
    task = task_submit(image_ref=image)
    worker = start_command("rqworker", "normal", "--name", "ends-offline", "--verbosity", "1",
                           CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url)
    try:
        wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.PROCESSING).exists(), 30,
                 "the caption to start")
        time.sleep(1)
        server.stop()
        wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.COMPLETED).exists(), 20,
                 "the caption to be recorded")
        time.sleep(2)  # the end of the job fails against the stopped Redis
        server.start()
        broker.reset_connection()
        connection = broker.get_connection()
        wait_for(lambda: not connection.exists(f"rq:job:caption-{task.pk}"), 30, "the job's end to reach Redis")
        assert StartedJobRegistry("normal", connection=connection).get_job_count(cleanup=False) == 0
        assert worker.poll() is None  # still working
        assert connection.hget("rq:worker:ends-offline", "successful_job_count") == b"1"
    finally:
        stop_process(worker)
    task.refresh_from_db()
    assert task.attempts == 1 and list(task.events.values_list("kind", flat=True)) == [TaskEvent.Kind.COMPLETED]
