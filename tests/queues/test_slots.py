"""Caption slots: one worker process running several captions at once, each attempt claimed, recorded and stopped
on its own. In this process (the worker's main thread is the test's); the process-level drills are in
tests/drills/test_slot_drills.py."""

import threading
import time

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from queues import broker
from queues.fleet.worker import CaptionWorker
from queues.models import CaptionTask, TaskEvent, TaskStatus
from queues.services import TaskSpec, tasks_submit_many
from tests.processes import slow_ollama, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def slot_worker(slots: int, **kwargs) -> CaptionWorker:
    return CaptionWorker(broker.get_queues(), connection=broker.get_connection(), slots=slots, **kwargs)


def work_and_look(worker: CaptionWorker, ids: list[int], running: int, look) -> None:
    """Runs ``worker`` in burst mode here; from another thread, calls ``look()`` once ``running`` of ``ids`` are
    PROCESSING at the same time (within 10 s)."""
    def watch():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.PROCESSING).count() == running:
                look()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch)
    thread.start()
    worker.work(burst=True, logging_level="WARNING")
    thread.join()


def test_eight_slots_run_eight_waiting_captions_at_once_each_recorded_once(redis, settings, http_server, png_bytes):
    settings.CAPTION_BACKEND, settings.OLLAMA_URL = "ollama", http_server.url
    image = slow_ollama(http_server, png_bytes, delay=1.0)
    ids = tasks_submit_many(specs=[TaskSpec(image) for _ in range(8)]).created
    worker = slot_worker(8)
    worker.work(burst=True, logging_level="WARNING")
    tasks = list(CaptionTask.objects.filter(pk__in=ids))
    assert {task.status for task in tasks} == {TaskStatus.COMPLETED} and {task.attempts for task in tasks} == {1}
    # All eight were running at the same time: each started before any of them finished.
    assert max(task.started_at for task in tasks) < min(task.finished_at for task in tasks)
    assert {task.worker_name for task in tasks} == {worker.name}
    assert TaskEvent.objects.filter(task_id__in=ids, kind=TaskEvent.Kind.COMPLETED).count() == 8
    assert int(redis.hget(worker.key, "successful_job_count")) == 8
    assert not redis.exists(*[f"rq:job:caption-{task_id}" for task_id in ids])
    # The eight ended within milliseconds of each other; none left the worker naming a finished job or busy.
    assert redis.hget(worker.key, "current_job") is None and redis.hget(worker.key, "state") == b"idle"


def test_more_tasks_than_slots_never_pops_a_job_no_slot_can_take(redis, settings, http_server, png_bytes):
    settings.CAPTION_BACKEND, settings.OLLAMA_URL = "ollama", http_server.url
    image = slow_ollama(http_server, png_bytes, delay=1.0)
    ids = tasks_submit_many(specs=[TaskSpec(image) for _ in range(6)]).created
    waiting = []
    # While the first two run, the other four are still in Redis.
    work_and_look(slot_worker(2), ids, 2, lambda: waiting.append(redis.llen("rq:queue:normal")))
    assert waiting == [4]
    assert CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.COMPLETED).count() == 6


def test_the_liveness_key_lists_every_slot(redis, settings, http_server, png_bytes):
    import json

    settings.CAPTION_BACKEND, settings.OLLAMA_URL = "ollama", http_server.url
    image = slow_ollama(http_server, png_bytes, delay=1.5)
    ids = tasks_submit_many(specs=[TaskSpec(image) for _ in range(2)]).created
    worker = slot_worker(3, name="three-slots")
    seen = []

    def look():
        worker._refresh_alive()
        seen.append(json.loads(redis.get(broker.alive_key("three-slots"))))

    work_and_look(worker, ids, 2, look)
    payload = seen[0]
    assert payload["slots"] == 3
    running = sorted(entry["job"] or "" for entry in payload["running"])
    assert running == ["", *sorted(f"caption-{task_id}" for task_id in ids)]
    assert all(entry["since"] for entry in payload["running"] if entry["job"])


@pytest.mark.parametrize("slots", ["0", "65", "x"])
def test_rqworker_refuses_a_bad_slot_count(redis, slots):
    with pytest.raises((CommandError, SystemExit)):
        call_command("rqworker", "--burst", "--slots", slots)


def test_live_workers_page_and_metrics_show_each_slot(redis, settings, http_server, png_bytes, client, admin_user):
    from django.urls import reverse

    settings.CAPTION_BACKEND, settings.OLLAMA_URL = "ollama", http_server.url
    image = slow_ollama(http_server, png_bytes, delay=2.0)
    [task_id] = tasks_submit_many(specs=[TaskSpec(image)]).created
    worker = slot_worker(3, name="three-slot-page", pool="default")
    client.force_login(admin_user)
    seen = {}

    def look():
        worker._refresh_alive()
        seen["page"] = client.get(reverse("admin:queues_liveworker_changelist")).content.decode()
        seen["metrics"] = client.get(reverse("metrics")).content.decode()

    work_and_look(worker, [task_id], 1, look)
    page = seen["page"]
    assert "1 of 3 caption slots busy" in page
    assert page.count('class="caption-slot"') == 3 and page.count(">idle<") == 2
    assert f"task {task_id}</a>" in page and f"job_id=caption-{task_id}" in page  # its own Stop job button
    import re

    assert re.search(r'^rq_worker_slots\{host="[^"]*",pool="default"\} 3\.0$', seen["metrics"], re.M)
    assert re.search(r'^rq_worker_slots_busy\{host="[^"]*",pool="default"\} 1\.0$', seen["metrics"], re.M)


def test_a_stop_before_the_caption_begins_ends_it_as_it_begins_and_not_the_next_one():
    from queues import cancel

    scope = cancel.Scope()
    scope.begin("caption-1")
    assert scope.stop(RuntimeError("too late"), pending=False) is False  # nothing running, nothing marked
    assert scope.stop(RuntimeError("stop"), pending=True) is True
    with scope:
        assert str(scope.reason) == "stop"
    scope.end()
    scope.begin("caption-2")
    with scope:
        assert scope.reason is None
    assert scope.stop(RuntimeError("again"), pending=True) is True
    scope.end()  # the job ended before its caption began
    scope.begin("caption-3")
    with scope:
        assert scope.reason is None
    assert scope.stop(RuntimeError("for caption-2"), pending=True, job_id="caption-2") is False
    with scope:
        assert scope.reason is None


def test_a_stop_job_that_arrives_as_its_job_ends_never_stops_the_next_job_of_the_slot(redis):
    """The command listener checks that a slot runs X, then stops the slot. If the slot moves on from X to Y in
    between (X ended; a GIL switch or the heartbeat's round trip is enough), the stop must not land on Y."""
    from rq.serializers import JSONSerializer

    from queues.broker import CAPTION_CALLABLE, CaptionJob

    worker = CaptionWorker(broker.get_queues(), connection=broker.get_connection(), slots=2)
    worker.register_birth()
    slot = worker._slots[0]
    first, second = (CaptionJob.create(CAPTION_CALLABLE, args=(task_id,), id=f"caption-{task_id}", connection=redis,
                                       serializer=JSONSerializer) for task_id in (1, 2))

    class MovesOnAsTheStopIsMarked(set):
        """The listener descheduled between its check and its stop: meanwhile the slot ends X and takes Y."""

        def add(self, job_id):
            super().add(job_id)
            slot._done(first)
            with worker._slots_changed:
                slot.take(second)

    try:
        with worker._slots_changed:
            slot.take(first)
        worker._stopped_jobs = MovesOnAsTheStopIsMarked()
        worker.handle_payload({"data": b'{"command": "stop-job", "job_id": "caption-1"}'})
        with slot.scope:  # Y's caption begins
            assert slot.scope.reason is None
        assert worker._stopped_jobs == set()
    finally:
        worker._stopped_jobs = set()
        for each in worker._slots:
            each.close()
        worker.register_death()


def test_a_finished_run_deletes_the_job_hash_only_while_it_is_still_its_own(redis):
    from queues.fleet.worker import DELETE_IF_OURS_SCRIPT

    def run(**fields):
        redis.hset("rq:job:caption-1", mapping={"status": "started", "worker_name": "w", "started_at": "t1",
                                                **fields})
        redis.zadd("rq:executions:caption-1", {"x": 1})
        return redis.eval(DELETE_IF_OURS_SCRIPT, 2, "rq:job:caption-1", "rq:executions:caption-1", "w", "t1")

    assert run() == 2 and not redis.exists("rq:job:caption-1", "rq:executions:caption-1")
    assert run(status="queued") == 0 and redis.exists("rq:job:caption-1")  # published again meanwhile
    assert run(worker_name="other") == 0 and run(started_at="t2") == 0  # another worker or run has it


def test_rqs_time_limit_in_a_slot_stops_a_caption_blocked_on_a_socket():
    """SlotDeathPenalty: when the job's time runs out, the blocked read returns at once (its socket is shut down)
    and the caption ends with rq's timeout exception; an exception set on the thread would wait for the read."""
    import socket

    from rq.timeouts import JobTimeoutException

    from queues import cancel
    from queues.fleet.worker import SlotDeathPenalty

    server = socket.create_server(("127.0.0.1", 0))
    outcome = {}

    def slot_thread():
        scope = cancel.make_slot_thread_scope()
        client = socket.create_connection(server.getsockname())
        client.settimeout(30)
        started = time.monotonic()
        with SlotDeathPenalty(1, JobTimeoutException):
            with scope:
                cancel.watch_socket(client)
                try:
                    outcome["read"] = client.recv(10)  # the server never writes
                except OSError as error:
                    outcome["read"] = error
        outcome.update(seconds=time.monotonic() - started, reason=scope.reason)
        client.close()

    thread = threading.Thread(target=slot_thread)
    thread.start()
    accepted, _ = server.accept()
    thread.join(10)
    accepted.close()
    server.close()
    assert isinstance(outcome["reason"], JobTimeoutException)
    assert outcome["read"] in (b"",) or isinstance(outcome["read"], OSError)
    assert outcome["seconds"] < 5  # not the socket's own 30 s


def test_rqworker_registers_with_the_portal_worker_ttl_not_django_rqs(redis):
    """django-rq's command passes its own --worker-ttl default (420 s) to every worker: a worker that died idle
    stayed in rq's list for 8 minutes. The portal's is WORKER_TTL."""
    from queues.fleet.worker import WORKER_TTL
    from tests.processes import start_command, stop_process, wait_for

    worker = start_command("rqworker", "normal", "--name", "ttl-check", "--verbosity", "0")
    try:
        wait_for(lambda: redis.sismember("rq:workers", "rq:worker:ttl-check"), 30, "the worker to register")
        assert 0 < redis.ttl("rq:worker:ttl-check") <= WORKER_TTL + 60
    finally:
        stop_process(worker)


def test_a_late_timer_exception_in_an_idle_slot_neither_ends_the_slot_nor_loses_the_job_handed_to_it(redis,
                                                                                                      media_image):
    """rq's TimerDeathPenalty sets its exception on the thread (PyThreadState_SetAsyncExc) and it lands wherever the
    thread next runs Python: in an idle slot, as it wakes for the next job. The slot used to die there, dropping that
    job and staying "busy" for good."""
    import ctypes

    from rq.timeouts import JobTimeoutException

    from queues.services import task_submit

    task = task_submit(image_ref=media_image())
    worker = slot_worker(2)
    worker.register_birth()
    slot = worker._slots[0]
    try:
        assert ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(slot.thread.ident),
                                                          ctypes.py_object(JobTimeoutException)) == 1
        job, queue = worker.dequeue_job_and_maintain_ttl(1)
        worker.execute_job(job, queue)  # handed to slot 0, the first free one
        wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.COMPLETED).exists(), 10,
                 "the handed job to complete")
        wait_for(lambda: slot.free, 5, "the slot to be free again")
        assert slot.thread.is_alive()
    finally:
        for each in worker._slots:
            each.close()
        for each in worker._slots:
            each.thread.join(10)
        worker.register_death()


def test_a_stale_attempt_that_ends_leaves_a_newer_attempt_of_its_task_leased(redis, media_image):
    """Two slots of one process can hold two attempts of one task: a stale one (its lease lapsed, the task ran
    again) and the newer one. The stale one's end must not stop the renewal of the newer one's lease."""
    from queues import execution
    from queues.services import task_submit

    task = task_submit(image_ref=media_image())
    stale = execution.task_claim(task_id=task.pk, worker_name="w-1", queue="normal")
    execution.attempt_started(stale)
    CaptionTask.objects.filter(pk=task.pk).update(status=TaskStatus.QUEUED)  # re-driven after the lapse
    newer = execution.task_claim(task_id=task.pk, worker_name="w-1", queue="normal")
    assert newer is not None and newer.claim_token != stale.claim_token
    execution.attempt_started(newer)
    try:
        execution.attempt_finished(stale)
        assert execution.attempts_in_flight() == {task.pk: newer.claim_token}
    finally:
        execution.attempt_finished(newer)
    assert execution.attempts_in_flight() == {}


HANDLER_IN_POOL_LOCK = """
import os, signal, django
django.setup()
from rq.worker import WorkerStatus
from queues import broker
from queues.fleet.worker import CaptionWorker

worker = CaptionWorker(broker.get_queues(), connection=broker.get_connection(), name="handler-check", slots={slots})
worker._state = WorkerStatus.BUSY  # a job in hand
worker._install_handlers()
pool = broker.get_connection().connection_pool
with pool._counters():  # the main thread is inside the pool's bookkeeping, as on every Redis call
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(3):
        pass  # the handler runs here
print("stop requested:", worker._stop_requested, flush=True)
"""


@pytest.mark.parametrize("slots", [1, 2])
def test_a_stop_signal_landing_inside_the_redis_pools_lock_does_not_deadlock_the_worker(redis, slots):
    """Python runs a signal handler in the main thread between two bytecodes, also inside a non-reentrant lock the
    thread holds. The stop handlers used to write the shutdown date to Redis, which takes the connection pool's
    lock again: the main thread, and with it every thread's Redis use, hung until the supervisor's SIGKILL."""
    import subprocess
    import sys

    from django.conf import settings as django_settings

    from tests.conftest import subprocess_env

    try:
        result = subprocess.run([sys.executable, "-c", HANDLER_IN_POOL_LOCK.replace("{slots}", str(slots))],
                                cwd=django_settings.BASE_DIR, env=subprocess_env(), capture_output=True, text=True,
                                timeout=20)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the stop handler deadlocked: {expired.stderr}")
    assert "stop requested: True" in result.stdout, result.stderr


def test_a_one_slot_workers_stop_job_for_a_job_that_just_ended_does_not_stop_the_next_caption(redis):
    """rq's stop-job command checks the worker's current job in Redis, then signals the worker's main thread: when
    the named job ended in between and the next one's caption began, the signal used to stop that next caption."""
    import signal

    from queues import execution

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    worker = slot_worker(1, name="one-slot-stop")
    worker.register_birth()
    try:
        worker._install_handlers()
        worker.set_current_job_id("caption-1")  # what rq's command reads: the job the operator saw
        worker._captioning = "caption-2"  # the main thread has moved on to the next caption
        execution._captioning.set()
        try:
            worker.handle_payload({"data": b'{"command": "stop-job", "job_id": "caption-1"}'})
            for _ in range(3):
                pass  # the SIGUSR1 handler runs here, between two bytecodes
        finally:
            execution._captioning.clear()
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        worker.register_death()
