"""SQLite writers take turns on a lock file beside the database (portal/sqlite3): a write transaction holds it from
its BEGIN to its end, however it ends; a write in autocommit mode for its statement; a read never. A holder that
never lets go (a stopped process) delays a writer by the database's timeout at most, then SQLite decides."""

import fcntl
import os
import subprocess
import sys

import pytest
from django.db import connection, transaction

from queues.models import CaptionTask, TaskStatus

pytestmark = [pytest.mark.django_db(transaction=True),
              pytest.mark.skipif(connection.vendor != "sqlite", reason="the writers' lock file is SQLite's")]


def _lock_file() -> str:
    return connection.settings_dict["NAME"] + "-writers.lock"


def _held_elsewhere() -> bool:
    """Whether another open file description could not take the lock now (as another process would see it)."""
    with open(_lock_file(), "a") as other:
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(other, fcntl.LOCK_UN)
        return False


def _task() -> CaptionTask:
    return CaptionTask.objects.create(image_ref="samples/red.png")


def test_a_write_transaction_holds_the_lock_from_begin_to_commit_and_rollback():
    task = _task()
    assert not _held_elsewhere()
    with transaction.atomic():
        assert _held_elsewhere()  # BEGIN IMMEDIATE: taken before SQLite's own write lock
        CaptionTask.objects.filter(pk=task.pk).update(attempts=1)
        assert _held_elsewhere()
    assert not _held_elsewhere()
    with pytest.raises(RuntimeError), transaction.atomic():
        CaptionTask.objects.filter(pk=task.pk).update(attempts=2)
        raise RuntimeError("rolled back")
    assert not _held_elsewhere()
    assert CaptionTask.objects.get(pk=task.pk).attempts == 1


def test_an_autocommit_write_takes_the_lock_for_its_statement_and_a_read_not_at_all():
    task = _task()
    seen = []

    def watch(execute, sql, params, many, context):
        seen.append((sql.split()[0].upper(), _held_elsewhere()))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(watch):  # runs inside the backend's own wrapper, which it registered first
        CaptionTask.objects.filter(pk=task.pk).update(status=TaskStatus.FAILED)
        list(CaptionTask.objects.filter(pk=task.pk))
    assert seen == [("UPDATE", True), ("SELECT", False)]
    assert not _held_elsewhere()


def test_a_holder_that_never_lets_go_delays_a_writer_by_the_timeout_then_sqlite_decides(settings):
    """A process stopped while holding the lock file (SIGSTOP between its flock and its BEGIN) must not block every
    writer for ever: after OPTIONS["timeout"] the write goes ahead, and SQLite's lock (free here) lets it in."""
    task = _task()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
         _lock_file()], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        options = connection.settings_dict["OPTIONS"]
        saved, options["timeout"] = options["timeout"], 0.3
        try:
            assert CaptionTask.objects.filter(pk=task.pk).update(attempts=5) == 1
        finally:
            options["timeout"] = saved
        assert CaptionTask.objects.get(pk=task.pk).attempts == 5
        assert _held_elsewhere()  # still the other process'
    finally:
        holder.kill()
        holder.wait(10)
    assert not _held_elsewhere()


def test_a_closed_connection_keeps_no_descriptor_of_the_lock_file():
    """Django keeps a connection per thread, and an ASGI server may run each request in a new thread: a connection
    that is closed (or dropped) must not leave the lock file open, or a long-running web process runs out of files."""
    task = _task()
    CaptionTask.objects.filter(pk=task.pk).update(attempts=1)  # opens the lock file

    def open_lock_files() -> int:
        target = os.path.realpath(_lock_file())
        return sum(1 for fd in os.listdir("/proc/self/fd")
                   if os.path.realpath(f"/proc/self/fd/{fd}") == target)

    assert open_lock_files() == 1
    connection.close()
    assert open_lock_files() == 0
    assert CaptionTask.objects.get(pk=task.pk).attempts == 1  # and the next query opens what it needs again
