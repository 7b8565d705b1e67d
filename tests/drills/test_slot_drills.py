"""Drills for caption slots: one real worker process running eight captions at once, against a slow captioning
server. SIGKILL with eight in flight, stop-job of one slot, SIGTERM (and a second one), a timeout in one slot."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
from django.conf import settings

from queues import broker
from queues.fleet.services import worker_runs_job, worker_stop_job
from queues.fleet.supervisor import SECOND_SIGNAL_AFTER
from queues.fleet.worker import FORCED_REPORT_AFTER
from queues.models import CaptionTask, TaskEvent, TaskStatus, WorkerPool
from queues.operations.services import queue_empty
from queues.services import TaskSpec, tasks_submit_many
from tests.conftest import respond, subprocess_env
from tests.processes import (
    Supervisors,
    dump_stacks,
    live_workers,
    log_text,
    slow_ollama,
    start_command,
    stop_process,
    wait_for,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SLOTS = 8


def submit(image: str, count: int = SLOTS) -> list[int]:
    return tasks_submit_many(specs=[TaskSpec(image) for _ in range(count)]).created


def all_processing(ids: list[int], timeout: float = 30) -> list[CaptionTask]:
    return wait_for(lambda: (lambda rows: rows if len(rows) == len(ids) else None)(
        list(CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.PROCESSING))), timeout,
        f"{len(ids)} tasks running at once")


def events(task_id: int) -> list[str]:
    return list(TaskEvent.objects.filter(task_id=task_id).order_by("id").values_list("kind", flat=True))


def slot_worker(http_server, *extra, **environment) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "manage.py", "rqworker", "--slots", str(SLOTS), "--verbosity", "0", *extra],
        cwd=settings.BASE_DIR, env=subprocess_env(CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url,
                                                  **environment),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen, *, running: bool = False) -> str:
    """Kills ``process`` if it is still running and returns its output; first, unless the test expects it to be
    ``running``, with its threads' stacks (where it was when it did not exit)."""
    if process.poll() is None:
        if not running:
            dump_stacks([process.pid])
        process.kill()
    return process.communicate(timeout=30)[0].decode(errors="replace")


def test_sigkill_with_eight_in_flight_recovers_all_eight_once(redis, pool, http_server, png_bytes):
    WorkerPool.objects.filter(pk=pool.pk).update(slots=SLOTS, desired=SLOTS, minimum=1, maximum=16)
    image = slow_ollama(http_server, png_bytes, delay=3)
    group = Supervisors(CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url)
    try:
        group.start()
        # Eight caption slots desired, eight per process: the supervisor runs one process.
        wait_for(lambda: [row for row in live_workers() if row.slots == SLOTS], 30, "one eight-slot worker")
        assert len(live_workers()) == 1
        ids = submit(image)
        running = all_processing(ids)
        assert len({task.worker_name for task in running}) == 1
        pid = broker.alive_states([running[0].worker_name])[running[0].worker_name]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.COMPLETED).count() == SLOTS, 60,
                 "all eight to complete after the kill")
        time.sleep(2)  # whatever would run one a second time has had its chance
        for task in CaptionTask.objects.filter(pk__in=ids):
            assert task.attempts == 2 and task.worker_name != running[0].worker_name
            assert events(task.pk) == [TaskEvent.Kind.WORKER_LOST, TaskEvent.Kind.COMPLETED]
        wait_for(lambda: len(live_workers()) == 1, 20, "the pool back at one eight-slot worker")
    finally:
        group.stop_all()


def test_stop_job_of_one_slot_leaves_the_other_seven_running(redis, http_server, png_bytes):
    image = slow_ollama(http_server, png_bytes, delay=6)
    process = slot_worker(http_server, "--name", "eight-slots")
    try:
        ids = submit(image)
        all_processing(ids)
        stopped = ids[3]
        # What the operator's page shows: the job started on the worker (a slot claims the task, then marks the job
        # started; a stop between the two is refused as "not running it").
        wait_for(lambda: worker_runs_job(next(w for w in broker.workers() if w.name == "eight-slots"),
                                         f"caption-{stopped}"), 10, "the worker reports the job started")
        started = time.monotonic()
        worker_stop_job(worker_name="eight-slots", job_id=f"caption-{stopped}")
        wait_for(lambda: CaptionTask.objects.filter(pk=stopped, status=TaskStatus.FAILED).exists(), 5,
                 "the stopped task to end")
        assert time.monotonic() - started < 4  # its caption was interrupted, not waited for (6 s)
        assert CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.PROCESSING).count() == SLOTS - 1
        wait_for(lambda: CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.COMPLETED).count() == SLOTS - 1,
                 30, "the other seven to complete")
        task = CaptionTask.objects.get(pk=stopped)
        assert task.last_error_class == "JobStopped" and task.attempts == 1
        assert events(stopped) == [TaskEvent.Kind.FAILED]
        assert broker.fetch_job(stopped).get_status() == "stopped"
        assert all(events(task_id) == [TaskEvent.Kind.COMPLETED] for task_id in ids if task_id != stopped)
        assert process.poll() is None  # the worker runs on
    finally:
        print(stop(process, running=True)[-5000:])


def test_sigterm_lets_all_eight_finish_then_a_second_one_gives_them_back(redis, http_server, png_bytes):
    image = slow_ollama(http_server, png_bytes, delay=3)
    process = slot_worker(http_server)
    try:
        ids = submit(image, 2 * SLOTS)  # eight run, eight wait in Redis
        wait_for(lambda: CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.PROCESSING).count() == SLOTS, 30,
                 "eight tasks running")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        done = CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.COMPLETED, attempts=1)
        assert done.count() == SLOTS
        # The other eight were never touched: still waiting in the queue, unclaimed.
        waiting = CaptionTask.objects.filter(pk__in=ids).exclude(pk__in=done.values("pk"))
        assert {(task.status, task.attempts) for task in waiting} == {(TaskStatus.QUEUED, 0)}
        assert sorted(broker.queued_task_ids("normal")) == sorted(task.pk for task in waiting)
    finally:
        print(stop(process)[-5000:])
    # Those eight would be the next worker's first eight (and at 20 s a caption, its eight new ones would wait
    # behind them): the queue is emptied, as an operator would, before the second stop is drilled.
    assert queue_empty(queue_name="normal", confirm="normal").changed == SLOTS

    image = slow_ollama(http_server, png_bytes, delay=20)
    process = slot_worker(http_server)
    try:
        ids = submit(image)
        all_processing(ids)
        process.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        # The second stop, resent every SECOND_SIGNAL_AFTER seconds until the worker exits, as its supervisor sends
        # it: the worker takes a second signal within a second of the first for one signal delivered twice, and
        # under load its first handler can run late enough for one resend to land in that second.
        started = time.monotonic()
        while process.poll() is None and time.monotonic() - started < 15:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(SECOND_SIGNAL_AFTER)
        assert process.wait(1) == 0
        assert time.monotonic() - started < 10  # the 20 s captions were interrupted
        for task in CaptionTask.objects.filter(pk__in=ids):
            # Given back without using an attempt: waiting to be published again, nothing recorded as failed.
            assert task.status == TaskStatus.QUEUED and task.attempts == 0
            assert events(task.pk) == [TaskEvent.Kind.RETRY_SCHEDULED]
    finally:
        print(stop(process)[-5000:])


def test_a_stop_at_once_held_up_by_a_frozen_redis_is_explained_in_the_log_then_ends(redis_server_factory, http_server,
                                                                                     png_bytes):
    server = redis_server_factory("frozen")
    image = slow_ollama(http_server, png_bytes, delay=20)
    process = start_command("rqworker", "--slots", "2", "--verbosity", "0", CAPTION_BACKEND="ollama",
                            OLLAMA_URL=http_server.url)
    redis_pid = server.running_pid()
    try:
        ids = submit(image, 2)
        all_processing(ids)
        # Both jobs started in Redis too (a slot writes that after its claim): what waits on Redis is their ends.
        wait_for(lambda: all(broker.fetch_job(task_id).get_status() == "started" for task_id in ids), 10,
                 "both jobs started")
        process.send_signal(signal.SIGTERM)  # the first stop: the captions would be let finish
        time.sleep(1.5)
        os.kill(redis_pid, signal.SIGSTOP)  # from here each slot's end of job waits for Redis
        try:
            # The stop at once, resent until the worker has taken it (a first handler run late under load takes a
            # resend within its second for the same signal): the captions end, their tasks are given back in the
            # database, and the ends of their jobs wait on the frozen Redis.
            started = time.monotonic()
            while "stopping at once" not in log_text(process.log) and time.monotonic() - started < 10:
                process.send_signal(signal.SIGTERM)
                time.sleep(SECOND_SIGNAL_AFTER)
            report = wait_for(lambda: "still running" in (text := log_text(process.log)) and text,
                              FORCED_REPORT_AFTER + 10, "the worker's report of where its threads are")
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        report = report[report.index("still running"):]
        assert "main thread:" in report and "in teardown" in report  # waiting for its slots
        assert "slot 0 with caption-" in report and "slot 1 with caption-" in report
        assert report.count("in _send_job_end") == 2  # each slot's end of job, waiting on Redis
        assert process.wait(30) == 0  # Redis answers again: the ends are written and the worker exits
        for task in CaptionTask.objects.filter(pk__in=ids):
            assert task.status == TaskStatus.QUEUED and task.attempts == 0
            assert events(task.pk) == [TaskEvent.Kind.RETRY_SCHEDULED]
    finally:
        stop_process(process)


def test_a_timeout_in_one_slot_ends_only_that_attempt(redis, http_server, png_bytes):
    slow_ollama(http_server, png_bytes, delay=1)
    fast = http_server.route("/fast.png", respond(200, png_bytes(), "image/png"))
    slow = http_server.route("/slow.png", respond(200, png_bytes(), "image/png", delay=15))
    ids = submit(fast, SLOTS - 1)
    [late] = submit(slow, 1)
    process = slot_worker(http_server, "--burst", RQ_DEFAULT_TIMEOUT="3", IMAGE_FETCH_TIMEOUT="3",
                          RQ_RETRY_BACKOFF="60")
    try:
        assert process.wait(60) == 0
        task = CaptionTask.objects.get(pk=late)
        assert task.status == TaskStatus.QUEUED and task.attempts == 1 and task.waiting_to_retry
        assert task.last_error_class == "CaptionTimeout"  # a TransientCaptionError: retried
        assert events(late) == [TaskEvent.Kind.RETRY_SCHEDULED]
        done = CaptionTask.objects.filter(pk__in=ids)
        assert {row.status for row in done} == {TaskStatus.COMPLETED} and {row.attempts for row in done} == {1}
        # The seven ran beside the slow one: they finished before its timeout did.
        assert max(row.finished_at for row in done) < task.updated_at
    finally:
        print(stop(process)[-5000:])


def test_the_supervisor_runs_desired_caption_slots_in_as_few_processes_and_follows_a_change(redis, pool):
    WorkerPool.objects.filter(pk=pool.pk).update(slots=2, desired=5, minimum=1, maximum=16)
    group = Supervisors()
    try:
        group.start()

        def shape():
            return sorted(row.slots for row in live_workers())

        # Five caption slots, two per process: three processes of 2, 2 and 1.
        wait_for(lambda: shape() == [1, 2, 2], 30, "processes of 2, 2 and 1 slots")
        WorkerPool.objects.filter(pk=pool.pk).update(slots=4)
        wait_for(lambda: shape() == [1, 4], 30, "processes of 4 and 1 slots")
        time.sleep(2)
        assert shape() == [1, 4]  # settled: nothing more started
    finally:
        group.stop_all()
