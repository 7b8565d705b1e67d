"""Drills: nothing the fleet-wide duties meet (a database outage, a huge relay pass) stops the lease renewals, so
every worker keeps running and never more than the desired number run."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import close_old_connections, connection
from django.utils import timezone

from queues.fleet.services import pool_scale, processing_set_suspended
from queues.models import CaptionTask, FleetEvent
from tests.processes import Supervisors, parent_pid, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def worker_pids(supervisors) -> set[int]:
    """The caption worker processes the supervisors run right now, read from /proc (no Redis, no database)."""
    return set().union(*(worker_pids_of(process) for process in supervisors.processes))


def worker_pids_of(supervisor) -> set[int]:
    """The caption worker processes one supervisor runs right now."""
    parents = {supervisor.pid} if supervisor.poll() is None else set()
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and parent_pid(int(entry.name)) in parents:
            try:
                if b"rqworker" in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                pass
    return pids


def fleet_settled(supervisors, each: int, timeout: float = 60) -> set[int]:
    """Wait until every supervisor runs ``each`` workers and the same processes have run for 3 s, and return them.

    The first supervisor up may start the whole fleet and then hand some over to the next one: a rebalance replaces
    workers, which the drills would count as a fault's doing if it happened during the fault."""
    deadline = time.monotonic() + timeout
    shape, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = [worker_pids_of(process) for process in supervisors.processes]
        if now != shape:
            shape, since = now, time.monotonic()
        elif all(len(pids) == each for pids in shape) and time.monotonic() - since >= 3:
            return set().union(*shape)
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s: {each} workers under each supervisor, unchanged for 3 s "
                         f"(last seen: {shape})")


class Watch:
    """Samples the running workers every 0.1 s while the drill runs."""

    def __init__(self, supervisors):
        self.supervisors, self.highest, self.seen = supervisors, 0, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            pids = worker_pids(self.supervisors)
            self.highest = max(self.highest, len(pids))
            self.seen |= pids
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def database_outage():
    """The database stops answering. SQLite (in WAL mode): another connection holds the write lock, so every write
    elsewhere waits (up to the 30 s busy timeout) while reads still work. MySQL/MariaDB on this host: the server
    process is frozen (SIGSTOP), so every statement hangs."""
    if connection.vendor == "sqlite":
        blocker = sqlite3.connect(connection.settings_dict["NAME"], timeout=30, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT @@pid_file")
        pid = int(Path(cursor.fetchone()[0]).read_text().split()[0])
    connection.close()
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_database_outage_leaves_every_worker_running(redis, pool, media_image):
    reference = media_image()
    group = Supervisors()
    try:
        group.start(), group.start()
        pool_scale(pool=pool, desired=4)
        before = fleet_settled(group, each=2)
        started = FleetEvent.objects.filter(kind__in=[FleetEvent.Kind.WORKER_STARTED,
                                                      FleetEvent.Kind.WORKER_RESTARTED]).count()
        # Work for the duties during the outage: retries whose backoff ends a few seconds into it.
        due = timezone.now() + timedelta(seconds=3)
        CaptionTask.objects.bulk_create([CaptionTask(image_ref=reference, attempts=1, publish_after=due)
                                         for _ in range(10)])
        with Watch(group) as watch, database_outage():
            time.sleep(15)
        wait_for(lambda: CaptionTask.objects.filter(status="COMPLETED").count() == 10, 60,
                 "the retries to complete once the database is back")
        close_old_connections()
        assert worker_pids(group) == before and watch.seen == before
        assert watch.highest <= 4
        assert FleetEvent.objects.filter(kind__in=[FleetEvent.Kind.WORKER_STARTED,
                                                   FleetEvent.Kind.WORKER_RESTARTED]).count() == started
    finally:
        group.stop_all()


def test_a_relay_pass_over_100000_tasks_leaves_every_worker_running(redis, pool, media_image):
    processing_set_suspended(suspended=True)  # the workers idle: only the relay and the leases are at work
    group = Supervisors()
    try:
        group.start(), group.start()
        pool_scale(pool=pool, desired=4)
        before = fleet_settled(group, each=2)
        reference = media_image()
        now = timezone.now()
        CaptionTask.objects.bulk_create([CaptionTask(image_ref=reference, publish_after=now)
                                         for _ in range(100_000)], batch_size=5000)
        with Watch(group) as watch:
            wait_for(lambda: redis.llen("rq:queue:normal") == 100_000, 240, "the relay to publish 100,000 tasks",
                     interval=1)
        assert not CaptionTask.objects.filter(published_at__isnull=True).exists()
        assert worker_pids(group) == before and watch.seen == before
        assert watch.highest <= 4
    finally:
        group.stop_all()


def test_a_task_running_through_a_database_outage_runs_once(redis, pool, http_server, png_bytes):
    from queues.models import TaskEvent, TaskStatus
    from queues.services import task_submit
    from tests.processes import slow_ollama

    image = slow_ollama(http_server, png_bytes, delay=28)
    group = Supervisors(CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url)
    try:
        group.start(), group.start()  # the reconciler runs on either
        pool_scale(pool=pool, desired=2)
        fleet_settled(group, each=1)
        task = task_submit(image_ref=image)
        running = wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.PROCESSING).first(), 20,
                           "the task to start")
        with database_outage():
            time.sleep(20)  # longer than the 15 s lease: every lease looks expired when the database is back
        done = wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.COMPLETED).first(), 60,
                        "the task to complete")
        time.sleep(3)
        done.refresh_from_db()
        assert done.attempts == 1 and done.worker_name == running.worker_name
        assert list(done.events.values_list("kind", flat=True)) == [TaskEvent.Kind.COMPLETED]
    finally:
        group.stop_all()


def test_a_queue_change_never_runs_a_second_worker_beside_the_one_finishing_its_caption(redis, pool, http_server,
                                                                                         png_bytes):
    """A pool of one whose queues change while its worker runs a caption: the worker finishes it, then one with the
    new queues starts in its slot. The slot's lease used to be released at once and taken again in the same step, so
    two processes ran for the length of the caption."""
    from queues.services import task_submit
    from tests.processes import slow_ollama

    image = slow_ollama(http_server, png_bytes, delay=6)
    supervisors = Supervisors(CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url)
    try:
        supervisors.start()
        first = wait_for(lambda: worker_pids(supervisors) if len(worker_pids(supervisors)) == 1 else None, 30,
                         "one worker")
        task = task_submit(image_ref=image)
        wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status="PROCESSING").exists(), 20, "the caption")
        pool.queues = "urgent high normal"
        pool.save()
        most = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pids = worker_pids(supervisors)
            most = max(most, len(pids))
            if pids and pids != first:
                break
            time.sleep(0.05)
        assert most == 1
        assert CaptionTask.objects.get(pk=task.pk).status == "COMPLETED"
        assert FleetEvent.objects.filter(reason="pool queues changed").exists()
    finally:
        supervisors.stop_all()
