"""Drills: stop signals never abandon the task in flight."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from rq.registry import FailedJobRegistry

from queues.fleet import worker_restart
from queues.models import CaptionTask, TaskEvent, TaskStatus
from queues.services import task_submit
from queues.supervisor import Slot, Supervisor
from tests.processes import Supervisors, live_workers, slow_ollama, wait_for

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


def test_a_worker_signalled_twice_on_the_last_attempt_gives_the_task_back(redis, pool, http_server, png_bytes,
                                                                          settings):
    import os
    import signal

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
