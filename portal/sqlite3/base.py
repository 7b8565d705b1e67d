"""SQLite for several processes that write: writers wait their turn on a lock file, woken as soon as it is free.

SQLite lets one writer in at a time. Another one that finds the database locked gets SQLITE_BUSY, and the busy
handler Python's driver installs sleeps 1, 2, 5, 10, 15... ms between looks. Worker processes write twice per task
(the claim, the outcome), each for about 0.1 ms, so with two of them most collisions cost a sleep ten times longer
than the write they waited for, and a second process added almost nothing (bench/RESULTS.md, issue 29).

Here every write takes an exclusive ``flock`` on ``<database>-writers.lock`` first: a transaction from its BEGIN
(IMMEDIATE, so it takes SQLite's write lock at once anyway) to its COMMIT or ROLLBACK, a writing statement in
autocommit mode for that statement. The wait polls every 50 µs at first, backing off to 1 ms. SQLite's own locking is
unchanged underneath: a process that does not use this lock (the sqlite3 shell, another program) is still kept out
by SQLite, and after the database's ``timeout`` the write goes ahead without the lock file and SQLite's busy handler
decides, as before (so a stopped process holding the lock file delays writers by that timeout at most, like a
stopped process holding SQLite's lock did). The lock is only ever taken before SQLite's write lock, never while
waiting for the lock file with SQLite's held, so the two cannot wait on each other.

Databases in memory have no file to lock and get Django's behaviour.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

from django_prometheus.db.backends.sqlite3.base import DatabaseFeatures  # noqa: F401  (Django loads it from here)
from django_prometheus.db.backends.sqlite3.base import DatabaseWrapper as PrometheusSQLiteWrapper

WRITING = ("INSERT", "UPDATE", "DELETE", "REPLACE")


def _writes(sql: str) -> bool:
    return sql.lstrip()[:7].upper().startswith(WRITING)


class DatabaseWrapper(PrometheusSQLiteWrapper):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A file object, not a bare descriptor: a wrapper dropped without being closed (Django keeps one per thread,
        # and an ASGI server may run each request in a new thread) closes it when it is collected.
        self._lock_file = None
        self._lock_pid: int | None = None
        self._lock_held = False
        self.execute_wrappers.append(self._autocommit_write_in_turn)

    # --- the lock file ---------------------------------------------------------------------------------------------
    def _lock_path(self) -> str | None:
        name = str(self.settings_dict["NAME"])
        if self.is_in_memory_db() or not name:
            return None
        return name + "-writers.lock"

    def _writers_lock_acquire(self) -> None:
        if self._lock_held:
            return
        path = self._lock_path()
        if path is None:
            return
        if self._lock_file is None or self._lock_pid != os.getpid():  # opened again in a forked child
            self._lock_file = open(path, "a+b")  # noqa: SIM115 (kept open with the connection; closed in _close)
            self._lock_pid = os.getpid()
        deadline = time.monotonic() + float(self.settings_dict["OPTIONS"].get("timeout", 5))
        pause = 0.00005
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock_held = True
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return  # SQLite's own busy handler decides from here
                time.sleep(pause)
                pause = min(pause * 2, 0.001)

    def _writers_lock_release(self) -> None:
        if self._lock_held:
            self._lock_held = False
            if self._lock_pid == os.getpid():  # a forked child must not unlock its parent's open file
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def writers_turn(self):
        """The writers' lock around a write whose statement ends after ``execute`` returns: an ``UPDATE ... RETURNING``
        or ``INSERT ... RETURNING`` in autocommit mode commits once its rows are fetched, so the caller fetches
        inside this block. Inside a transaction (which holds the lock already) it does nothing."""
        if self._lock_held or not self.get_autocommit():
            yield
            return
        try:
            self._writers_lock_acquire()
            yield
        finally:
            self._writers_lock_release()

    # --- where writes begin and end --------------------------------------------------------------------------------
    def _start_transaction_under_autocommit(self):
        try:
            self._writers_lock_acquire()
            super()._start_transaction_under_autocommit()
        except BaseException:
            self._writers_lock_release()
            raise

    def _commit(self):
        try:
            return super()._commit()
        finally:
            self._writers_lock_release()

    def _rollback(self):
        try:
            return super()._rollback()
        finally:
            self._writers_lock_release()

    def _set_autocommit(self, autocommit):
        super()._set_autocommit(autocommit)
        if autocommit:
            self._writers_lock_release()  # the transaction is over however it ended

    def _close(self):
        try:
            super()._close()
        finally:
            self._writers_lock_release()
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    def _autocommit_write_in_turn(self, execute, sql, params, many, context):
        if self.in_atomic_block or self._lock_held or not self.get_autocommit() or not _writes(sql):
            return execute(sql, params, many, context)
        try:
            self._writers_lock_acquire()
            return execute(sql, params, many, context)
        finally:
            self._writers_lock_release()
