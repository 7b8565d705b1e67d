"""Drills: stop signals never abandon the task in flight."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
from rq.registry import FailedJobRegistry

from queues.fleet.services import worker_restart
from queues.fleet.supervisor import FORCED_GRACE, Slot, Supervisor
from queues.models import CaptionTask, TaskEvent, TaskStatus
from queues.services import task_submit
from tests.processes import Supervisors, live_workers, slow_ollama, start_command, stop_process, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_double_restart_click_gives_the_task_back_instead_of_abandoning_it(redis, pool, http_server, png_bytes,
                                                                          admin_user):
    image = slow_ollama(http_server, png_bytes, delay=6)
    group = Supervisors(CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url)
    try:
        group.start()
        wait_for(lambda: len(live_workers()) == 1, 20, "one worker")
        task = task_submit(image_ref=image)
        running = wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.PROCESSING).first(), 20,
                           "the task to start")
        time.sleep(0.5)
        worker_restart(worker_name=running.worker_name, user=admin_user)
        time.sleep(1.5)  # rq ignores a second signal within a second of the first; a second click comes later
        worker_restart(worker_name=running.worker_name, user=admin_user)
        done = wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.COMPLETED).first(), 40,
                        "the task to complete on the restarted worker")
        kinds = list(done.events.order_by("id").values_list("kind", flat=True))
        assert kinds[-1] == TaskEvent.Kind.COMPLETED and TaskEvent.Kind.FAILED not in kinds
        assert done.attempts == len(kinds)
        assert redis.zcard(FailedJobRegistry("normal", connection=redis).key) == 0  # no phantom dead letter
    finally:
        group.stop_all()


COUNTER = """
import signal, sys, time
count = 0
def handler(signum, frame):
    global count
    count += 1
    open(sys.argv[1], "w").write(str(count))
signal.signal(signal.SIGTERM, handler)
while True:
    time.sleep(0.05)
"""


def test_retiring_a_slot_twice_signals_its_worker_once(tmp_path, db):
    counter = tmp_path / "signals"
    process = subprocess.Popen([sys.executable, "-c", COUNTER, str(counter)])
    try:
        time.sleep(0.5)
        supervisor = Supervisor(pool_names=["default"], stop_timeout=30)
        slot = Slot(pool="default", index=0, queues=["normal"], process=process, worker_name="default.test.0")
        supervisor._retire(slot, "rebalancing: handing the slot to a supervisor with fewer workers")
        supervisor._retire(slot, "supervisor stopping")  # shutdown during the hand-over
        time.sleep(0.5)
        assert counter.read_text() == "1"
        assert supervisor.retiring == [slot]
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("change", ["queues", "caption slots"])
def test_a_pool_change_while_the_slots_worker_waits_for_its_restart_lets_the_slot_go(redis, db, change):
    """A hand-off waits for the slot's worker to exit; a slot whose worker had crashed and waited for its restart has
    none to wait for, and used to stay retiring, leased and empty until the supervisor restarted."""
    from queues.fleet.supervisor import PoolSettings, slot_key

    supervisor = Supervisor(pool_names=["default"], stop_timeout=30)
    slot = Slot(pool="default", index=0, queues=["normal"], worker_name="default.test.0")  # no process running
    supervisor.slots[("default", 0)] = slot
    redis.set(slot_key("default", 0), supervisor.id)
    pool = PoolSettings("default", 2, ["urgent", "normal"] if change == "queues" else ["normal"],
                        1 if change == "queues" else 2)
    supervisor._renew_or_release(redis, {"default": pool})
    assert ("default", 0) not in supervisor.slots and not redis.exists(slot_key("default", 0))
    assert supervisor.retiring == []


def test_a_worker_signalled_twice_on_the_last_attempt_gives_the_task_back(redis, pool, http_server, png_bytes,
                                                                          settings):

    from queues import broker

    image = slow_ollama(http_server, png_bytes, delay=6)
    group = Supervisors(CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url, RQ_MAX_RETRIES="0")
    settings.RQ_MAX_RETRIES = 0  # one attempt: rq's cold shutdown would dead-letter it
    try:
        group.start()
        wait_for(lambda: len(live_workers()) == 1, 20, "one worker")
        task = task_submit(image_ref=image)
        running = wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.PROCESSING).first(), 20,
                           "the task to start")
        time.sleep(0.5)
        pid = broker.alive_states([running.worker_name])[running.worker_name]["pid"]
        os.kill(pid, signal.SIGTERM)  # e.g. an operator's kill, or a unit without KillMode=mixed
        time.sleep(1.5)
        os.kill(pid, signal.SIGTERM)
        done = wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status__in=[TaskStatus.COMPLETED,
                                                                                    TaskStatus.FAILED]).first(),
                        40, "the task to end")
        assert done.status == TaskStatus.COMPLETED and done.attempts == 1
        assert list(done.events.order_by("id").values_list("kind", flat=True)) == [
            TaskEvent.Kind.RETRY_SCHEDULED, TaskEvent.Kind.COMPLETED]
        assert redis.zcard(FailedJobRegistry("normal", connection=redis).key) == 0
    finally:
        group.stop_all()


@contextlib.contextmanager
def row_held(task_id: int):
    """Another connection holds the task's row, so a worker's claim of it waits (a slow claim: a busy database, a
    network round trip). SQLite: the database's write lock (reads go on). MariaDB: the row's lock."""
    import sqlite3

    from django.db import connection, connections

    if connection.vendor == "sqlite":
        holder = sqlite3.connect(connection.settings_dict["NAME"], timeout=30, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    holder = connections.create_connection("default")
    holder.set_autocommit(False)
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT id FROM queues_captiontask WHERE id = %s FOR UPDATE", [task_id])
        yield
    finally:
        holder.rollback()
        holder.close()


@contextlib.contextmanager
def both_stops_during_a_claim(redis, supervisor: subprocess.Popen, image: str):
    """A task whose row another connection holds (``row_held``), so the one worker's claim of it waits; the
    supervisor's two stops (1.5 s apart) sent while it does. Yields the task's id, the row still held."""
    from django.utils import timezone

    from queues import broker

    task_id = CaptionTask.objects.insert_new([(image, "normal", None)], publish_after=timezone.now())[0]
    CaptionTask.objects.filter(pk=task_id).update(published_at=timezone.now())
    with row_held(task_id):
        broker.publish([(task_id, "normal")], fresh=True)
        wait_for(lambda: redis.llen("rq:queue:normal") == 0, 20, "the worker to pop the job")
        time.sleep(0.5)  # in its claim
        supervisor.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        supervisor.send_signal(signal.SIGTERM)
        yield task_id


def test_a_first_sigterm_while_a_one_slot_worker_claims_lets_it_run_the_task_once(redis, media_image):
    """A first stop lets the task in hand run to its end, also when it lands between the pop and the caption (the
    default one-slot worker used to raise there: the popped job was dropped, or the claimed task abandoned and
    re-driven with a retry, a dead letter on its last attempt)."""
    task = task_submit(image_ref=media_image())
    assert redis.llen("rq:queue:normal") == 1
    worker = None
    try:
        with row_held(task.pk):
            worker = start_command("rqworker", "normal", "--name", "claim-drill", "--verbosity", "0")
            wait_for(lambda: redis.llen("rq:queue:normal") == 0, 60, "the worker to pop the job")
            time.sleep(0.5)  # in its claim, waiting for the row
            worker.send_signal(signal.SIGTERM)
            time.sleep(0.5)
        assert worker.wait(30) == 0
    finally:
        if worker is not None:
            stop_process(worker)
    task.refresh_from_db()
    assert (task.status, task.attempts) == (TaskStatus.COMPLETED, 1)
    assert list(task.events.values_list("kind", flat=True)) == [TaskEvent.Kind.COMPLETED]
    assert redis.zcard(FailedJobRegistry("normal", connection=redis).key) == 0
    assert not redis.sismember("rq:workers", "rq:worker:claim-drill")


def test_a_second_stop_before_the_caption_gives_the_claimed_attempt_back(redis, media_image):
    """What a one-slot worker's second stop signal does between its claim and its caption (a signal handler cannot
    be made to run there from outside: it runs when the claim's database call returns)."""
    from queues import execution
    from queues.services import tasks_relay_once
    from tests.conftest import run_worker

    task = task_submit(image_ref=media_image())
    claimed = execution.task_claim(task_id=task.pk, worker_name="w-1", queue="normal")
    execution.interrupt_next_caption()
    outcome = execution.task_execute(task_id=task.pk, worker_name="w-1", claimed=claimed)
    task.refresh_from_db()
    assert outcome.status == "retry"
    assert (task.status, task.attempts) == (TaskStatus.QUEUED, 0)
    assert list(task.events.values_list("kind", flat=True)) == [TaskEvent.Kind.RETRY_SCHEDULED]
    assert tasks_relay_once() == 1
    run_worker()  # the interruption was for one caption, not for good
    task.refresh_from_db()
    assert (task.status, task.attempts) == (TaskStatus.COMPLETED, 1)


@pytest.mark.parametrize("worker_state", ["answering", "frozen"])
def test_a_second_stop_to_the_supervisor_gives_the_task_in_flight_back_on_its_last_attempt(
        redis, pool, http_server, png_bytes, settings, worker_state):
    """Operators, ``dev.py run``, systemd and Kubernetes signal the supervisor, not its workers: its second stop is
    the workers' second stop (the attempt given back, never a dead letter), not a SIGKILL of them. A worker that
    cannot answer (frozen here) is killed FORCED_GRACE seconds later, and its task still goes back without using a
    retry."""

    from queues import broker

    image = slow_ollama(http_server, png_bytes, delay=30)
    group = Supervisors(CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url, RQ_MAX_RETRIES="0")
    settings.RQ_MAX_RETRIES = 0  # one attempt: a worker lost would be a dead letter
    try:
        supervisor = group.start()
        wait_for(lambda: len(live_workers()) == 1, 20, "one worker")
        task = task_submit(image_ref=image)
        running = wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.PROCESSING).first(), 20,
                           "the task to start")
        time.sleep(0.5)
        if worker_state == "frozen":
            os.kill(broker.alive_states([running.worker_name])[running.worker_name]["pid"], signal.SIGSTOP)
        supervisor.send_signal(signal.SIGTERM)
        time.sleep(2)  # the first stop lets the caption run on
        assert supervisor.poll() is None
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(25) == 0
        task.refresh_from_db()
        assert (task.status, task.attempts) == (TaskStatus.QUEUED, 0)
        # given back by the worker itself, or by its supervisor's recovery after the kill
        given_back = TaskEvent.Kind.WORKER_LOST if worker_state == "frozen" else TaskEvent.Kind.RETRY_SCHEDULED
        assert list(task.events.values_list("kind", flat=True)) == [given_back]
        assert redis.zcard(FailedJobRegistry("normal", connection=redis).key) == 0
        killed = "killed after not stopping in time" in group.output()
        assert killed == (worker_state == "frozen")
    finally:
        group.stop_all()


def test_a_second_stop_to_the_supervisor_reaches_a_worker_whose_handlers_ran_late(redis, pool, http_server,
                                                                                  png_bytes, settings):
    """The worker's main thread is in a claim that waits on the database when both of the supervisor's signals
    arrive: its handlers run only when the claim returns, both at once, and it takes the second for the first one
    delivered twice. The supervisor sends its second stop again until the worker exits, so the attempt is still
    given back (and were the worker killed after all, its task would go back without using a retry)."""
    image = slow_ollama(http_server, png_bytes, delay=30)
    group = Supervisors(CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url, RQ_MAX_RETRIES="0")
    settings.RQ_MAX_RETRIES = 0
    try:
        supervisor = group.start()
        wait_for(lambda: len(live_workers()) == 1, 20, "one worker")
        with both_stops_during_a_claim(redis, supervisor, image) as task_id:
            time.sleep(1.0)
        assert supervisor.wait(20) == 0
        task = CaptionTask.objects.get(pk=task_id)
        assert (task.status, task.attempts) == (TaskStatus.QUEUED, 0)
        assert list(task.events.values_list("kind", flat=True)) == [TaskEvent.Kind.RETRY_SCHEDULED]
        assert redis.zcard(FailedJobRegistry("normal", connection=redis).key) == 0
        assert "killed after not stopping in time" not in group.output()
    finally:
        group.stop_all()


def test_a_worker_killed_for_not_stopping_in_time_shows_where_its_main_thread_was(redis, pool, http_server,
                                                                                   png_bytes):
    """A worker whose main thread is held in a C call (here a claim waiting on the database for longer than the
    supervisor's FORCED_GRACE) runs no signal handler, so neither its stop at once nor its own report can run, and
    its supervisor kills it. Before the kill the supervisor asks it for its threads' stacks (SIGUSR2, which
    manage.py's faulthandler answers even then): the log says where it was instead of nothing."""
    image = slow_ollama(http_server, png_bytes, delay=30)
    group = Supervisors(CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url)

    try:
        supervisor = group.start()
        wait_for(lambda: len(live_workers()) == 1, 20, "one worker")
        with both_stops_during_a_claim(redis, supervisor, image):  # the second: killed FORCED_GRACE seconds later
            wait_for(lambda: "killed after not stopping in time" in group.output(), FORCED_GRACE + 15,
                     "the supervisor to kill its worker")
        assert supervisor.wait(20) == 0
        output = group.output()
        assert "not stopped in time; its threads' stacks follow in its output" in output
        report = output[output.index("not stopped in time"):]
        assert "most recent call first" in report and " in _claim" in report  # where its main thread was held
    finally:
        group.stop_all()


@pytest.mark.parametrize("slots", [1, 8])
def test_stop_signals_that_keep_coming_while_a_worker_exits_never_kill_it(redis, db, slots):
    """The supervisor resends a forced stop every SECOND_SIGNAL_AFTER seconds until the worker exits, and systemd or
    Kubernetes may signal again. A stop signal that reached a worker after its work loop had ended (while Python shut
    down, which puts back the default handlers) killed it by SIGTERM: exit -15, a crash in the fleet's books."""
    codes = []
    for _ in range(3):
        process = start_command("rqworker", "--slots", str(slots), "--verbosity", "0")
        try:
            wait_for(lambda: redis.scard("rq:workers") == 1, 30, "the worker to register")
            while process.poll() is None:
                process.send_signal(signal.SIGTERM)
                time.sleep(0.005)
            codes.append(process.returncode)
        finally:
            stop_process(process, grace=10)
        assert redis.scard("rq:workers") == 0
    assert codes == [0, 0, 0]
