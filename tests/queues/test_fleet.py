"""The worker fleet with real processes: supervisors and workers against a real Redis and the test database."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from django.db import close_old_connections
from rq.registry import FailedJobRegistry

from queues import broker
from queues.fleet.services import pool_scale
from queues.models import CaptionTask, FleetEvent, TaskEvent, TaskStatus, WorkerPool
from queues.services import task_submit
from tests.processes import Supervisors, live_workers, parent_pid, slow_ollama, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def supervisors(redis, settings):
    group = Supervisors()
    yield group
    group.stop_all()


@pytest.fixture
def pool(db):
    pool, _ = WorkerPool.objects.update_or_create(
        name="default", defaults={"queues": "urgent high normal low", "desired": 1, "minimum": 1, "maximum": 6})
    return pool


def test_supervisor_follows_desired_count_1_3_1(supervisors, pool):
    supervisor = supervisors.start()
    wait_for(lambda: len(live_workers()) == 1, 20, "one worker")
    pool_scale(pool=pool, desired=3)
    scaled_at = time.monotonic()
    wait_for(lambda: len(live_workers()) == 3, 10, "three workers")
    assert time.monotonic() - scaled_at < 5
    assert all(parent_pid(row.pid) == supervisor.pid for row in live_workers())
    pool_scale(pool=pool, desired=1)
    wait_for(lambda: len(live_workers()) == 1, 15, "back to one worker")

    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(60) == 0
    assert live_workers() == []
    kinds = list(FleetEvent.objects.values_list("kind", flat=True))
    assert kinds.count(FleetEvent.Kind.WORKER_STARTED) == 3
    assert kinds.count(FleetEvent.Kind.WORKER_STOPPED) == 3  # two scaled down, one at shutdown
    assert kinds.count(FleetEvent.Kind.POOL_SCALED) == 2
    assert FleetEvent.Kind.SUPERVISOR_STOPPED in kinds


def test_sigkilled_worker_task_runs_again_and_completes_once(redis, pool, http_server, png_bytes):
    image = slow_ollama(http_server, png_bytes, delay=2)
    group = Supervisors(CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url)
    try:
        group.start()
        wait_for(lambda: len(live_workers()) == 1, 20, "one worker")
        task = task_submit(image_ref=image)
        processing = wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.PROCESSING).first(),
                              20, "the task to start")
        victim = broker.alive_states([processing.worker_name])[processing.worker_name]["pid"]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        done = wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.COMPLETED).first(), 60,
                        "the task to complete after the kill")
        assert time.monotonic() - killed_at < 60
        assert done.attempts == 2 and done.caption == "A slow caption."
        assert list(done.events.order_by("id").values_list("kind", "attempt")) == [
            (TaskEvent.Kind.WORKER_LOST, 1), (TaskEvent.Kind.COMPLETED, 2)]
        assert done.events.get(kind=TaskEvent.Kind.COMPLETED).worker_name != processing.worker_name
        crash = FleetEvent.objects.get(kind=FleetEvent.Kind.WORKER_CRASHED)
        assert crash.worker_name == processing.worker_name and "signal 9" in crash.reason
        assert FleetEvent.objects.filter(kind=FleetEvent.Kind.WORKER_RESTARTED).exists()
        assert processing.worker_name not in [worker.name for worker in broker.workers()]  # registration tidied
    finally:
        group.stop_all()


def test_two_supervisors_share_a_pool_and_survive_one_dying(supervisors, pool):
    pool_scale(pool=pool, desired=4)
    first, second = supervisors.start(), supervisors.start()
    wait_for(lambda: len(live_workers()) == 4, 30, "four workers across two supervisors")
    wait_for(lambda: {parent_pid(row.pid) for row in live_workers()} == {first.pid, second.pid}, 20,
             "both supervisors running workers")

    highest = []
    watching = threading.Event()

    def watch():
        while not watching.is_set():
            close_old_connections()
            highest.append(len(live_workers()))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    second.kill()  # the host dies: its workers get SIGTERM from the kernel (parent-death signal) and leave
    died_at = time.monotonic()
    wait_for(lambda: len(live_workers()) == 4 and all(parent_pid(row.pid) == first.pid for row in live_workers()),
             30, "the surviving supervisor running all four")
    assert time.monotonic() - died_at < 30
    watching.set()
    watcher.join()
    assert max(highest) <= 4  # never more than desired


def test_sigterm_waits_for_the_task_in_flight(redis, pool, http_server, png_bytes):
    image = slow_ollama(http_server, png_bytes, delay=2)
    group = Supervisors(CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url)
    try:
        supervisor = group.start()
        wait_for(lambda: len(live_workers()) == 1, 20, "one worker")
        task = task_submit(image_ref=image)
        wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.PROCESSING).exists(), 20,
                 "the task to start")
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(60) == 0
        task.refresh_from_db()
        assert task.status == TaskStatus.COMPLETED and task.attempts == 1
        assert not CaptionTask.objects.filter(status=TaskStatus.PROCESSING).exists()
        assert live_workers() == []
    finally:
        group.stop_all()


def test_poison_pill_ends_in_dead_letters_not_a_crash_loop(redis, pool, http_server, settings):
    killed = []

    def kill_the_worker(request, _body):
        # Whatever worker fetches this image dies, as if the image crashed the decoder.
        close_old_connections()
        for _ in range(50):
            task = CaptionTask.objects.filter(status=TaskStatus.PROCESSING).first()
            state = broker.alive_states([task.worker_name]).get(task.worker_name) if task else None
            if state:
                killed.append(state["pid"])
                os.kill(state["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    image = http_server.route("/poison.png", kill_the_worker)
    group = Supervisors(RQ_MAX_RETRIES="2", RQ_RETRY_BACKOFF="0.1")
    try:
        group.start()
        wait_for(lambda: len(live_workers()) == 1, 20, "one worker")
        settings.RQ_MAX_RETRIES = 2
        task = task_submit(image_ref=image)
        failed = wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.FAILED).first(), 60,
                          "the poison pill to be dead-lettered")
        assert failed.attempts == 3 and failed.last_error_class == "WorkerLost"
        assert len(killed) == 3
        assert list(failed.events.order_by("id").values_list("kind", flat=True)) == [
            TaskEvent.Kind.WORKER_LOST, TaskEvent.Kind.WORKER_LOST, TaskEvent.Kind.FAILED]
        # The row is FAILED first (committed); the supervisor's duties thread files the job in Redis right after.
        wait_for(lambda: task.job_id in FailedJobRegistry("normal", connection=redis).get_job_ids(cleanup=False), 10,
                 "the job in the dead letters")
        wait_for(lambda: len(live_workers()) == 1, 30, "the pool back at its desired size")
        time.sleep(1)
        assert len(killed) == 3  # nothing ran it again
    finally:
        group.stop_all()


def test_operator_stops_a_running_job(redis, pool, http_server, png_bytes, admin_user):
    from queues.fleet.services import worker_stop_job

    image = slow_ollama(http_server, png_bytes, delay=8)
    group = Supervisors(CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url)
    try:
        group.start()
        wait_for(lambda: len(live_workers()) == 1, 20, "one worker")
        task = task_submit(image_ref=image)
        running = wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.PROCESSING).first(), 20,
                           "the task to start")
        time.sleep(0.5)  # let the worker reach the captioner's HTTP call
        asked_at = time.monotonic()
        assert worker_stop_job(worker_name=running.worker_name, job_id=task.job_id, user=admin_user) == task.job_id
        stopped = wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.FAILED).first(), 20,
                           "the task to stop")
        assert time.monotonic() - asked_at < 5  # interrupted, not waited out
        assert stopped.last_error_class == "JobStopped" and stopped.attempts == 1
        assert stopped.events.get().detail == "stopped by an operator"
        assert len(live_workers()) == 1  # the worker itself carries on
    finally:
        group.stop_all()


def test_pool_restart_replaces_every_worker(supervisors, pool, admin_user):
    from queues.fleet.services import pool_restart

    pool_scale(pool=pool, desired=2)
    supervisors.start()
    before = {row.name for row in wait_for(lambda: len(live_workers()) == 2 and live_workers(), 20, "two workers")}
    assert pool_restart(pool=pool, user=admin_user) == 2
    after = wait_for(lambda: (names := {row.name for row in live_workers()}) and len(names) == 2
                     and not names & before and names, 20, "two fresh workers")
    assert len(after) == 2
    assert FleetEvent.objects.filter(kind=FleetEvent.Kind.WORKER_RESTARTED).count() == 2
    assert not FleetEvent.objects.filter(kind=FleetEvent.Kind.WORKER_CRASHED).exists()


def test_a_restart_published_while_the_worker_was_not_listening_is_still_carried_out(supervisors, pool, admin_user,
                                                                                       redis):
    """rq's shutdown command is a PUBLISH, lost for a worker not subscribed at that moment: one that has registered
    but not yet subscribed (a pool restart right after a start: in CI one worker of two never restarted), or whose
    command connection is being re-established. Here the worker is frozen, its command connection cut, the restart
    sent to nobody, and the worker thawed: it subscribes again after the message went by, and restarts anyway."""
    from rq.command import PUBSUB_CHANNEL_TEMPLATE

    from queues.fleet.services import pool_restart

    supervisors.start()
    rows = wait_for(lambda: len(live_workers()) == 1 and live_workers(), 20, "one worker")
    name = rows[0].name
    pid = broker.alive_states([name])[name]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        assert redis.client_kill_filter(_type="pubsub") >= 1
        assert pool_restart(pool=pool, user=admin_user) == 1
        assert redis.pubsub_numsub(PUBSUB_CHANNEL_TEMPLATE % name)[0][1] == 0  # nobody heard it
    finally:
        os.kill(pid, signal.SIGCONT)
    fresh = wait_for(lambda: (names := {row.name for row in live_workers()}) and name not in names and names, 20,
                     "a fresh worker in its place")
    assert len(fresh) == 1
    assert FleetEvent.objects.filter(kind=FleetEvent.Kind.WORKER_RESTARTED).count() == 1


def test_supervisor_autoscales_up_with_a_backlog_and_back_down(supervisors, pool, media_image, settings):
    from queues.fleet.services import processing_set_suspended
    from queues.services import TaskSpec, tasks_submit_many

    WorkerPool.objects.filter(pk=pool.pk).update(
        autoscale=True, minimum=1, maximum=3, desired=1, scale_up_threshold=5, scale_down_threshold=1,
        scale_up_cooldown=1, scale_down_cooldown=1)
    processing_set_suspended(suspended=True)  # let a backlog build
    tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(30)])
    supervisors.environment["MEDIA_ROOT"] = str(settings.MEDIA_ROOT)
    supervisors.start()
    wait_for(lambda: WorkerPool.objects.get(pk=pool.pk).desired == 3, 30, "scaled up to the maximum")
    wait_for(lambda: len(live_workers()) == 3, 20, "three workers")
    processing_set_suspended(suspended=False)
    wait_for(lambda: CaptionTask.objects.filter(status=TaskStatus.COMPLETED).count() == 30, 60, "backlog done")
    wait_for(lambda: WorkerPool.objects.get(pk=pool.pk).desired == 1, 30, "scaled back down to the minimum")
    steps = [(event.figures["from"], event.figures["to"])
             for event in FleetEvent.objects.filter(kind=FleetEvent.Kind.AUTOSCALE).order_by("at", "id")]
    assert steps == [(1, 2), (2, 3), (3, 2), (2, 1)]


def test_a_supervisor_without_workers_keeps_the_duties_while_the_cluster_runs_the_workers(supervisors, pool,
                                                                                         redis_server_factory):
    """``runworkers --no-workers`` (deploy/kubernetes' duties Deployment): it starts no worker whatever the
    pool's desired count, yet the relay publishes a task Redis never got, and a worker started by someone else
    (a cluster's rqworker pod) runs it."""
    from tests.conftest import run_worker

    supervisor = supervisors.start("--no-workers")
    task = CaptionTask.objects.create(image_ref="relay-probe.png", priority="high", published_at=None)
    CaptionTask.objects.filter(pk=task.pk).update(publish_after=task.created_at)  # due at once
    wait_for(lambda: broker.get_connection().llen("rq:queue:high") == 1, 20, "the relay to publish the task")
    time.sleep(1.5)  # a few supervisor steps: long enough for a supervisor that runs workers to start one
    assert live_workers() == [] and supervisor.poll() is None
    assert not FleetEvent.objects.filter(kind=FleetEvent.Kind.WORKER_STARTED).exists()
    run_worker()  # the cluster's worker
    assert CaptionTask.objects.get(pk=task.pk).status in (TaskStatus.COMPLETED, TaskStatus.FAILED)
