"""Stopping one caption among several running in one process (a worker with several caption slots).

A worker with one slot runs its caption in the main thread and interrupts it with a signal (``queues.fleet.worker``):
the handler raises in the main thread, and a blocking socket call returns with EINTR first. A slot thread cannot
be reached that way: Python runs signal handlers in the main thread only, and an exception set on another thread
(``PyThreadState_SetAsyncExc``) waits until that thread runs Python code again, which a thread blocked in
``recv`` on a captioning server may not do for minutes.

So each slot thread captions inside a ``Scope``. Stopping it records the reason, then shuts down the sockets the
captioner opened in that thread (the HTTP connections of ``queues.captioners``, which call ``watch_socket``): the
blocked call returns at once, the captioner raises, and the attempt ends with the recorded reason instead of the
captioner's error. A captioner that opens no socket is stopped when it returns. The reason is only ever recorded
while the scope is active, under its lock, and read after it ends, so a stop never lands in the bookkeeping
around a caption.
"""

from __future__ import annotations

import socket
import threading


class Scope:
    def __init__(self):
        self._lock = threading.Lock()
        self._active = False
        self._sockets: list[socket.socket] = []
        self._pending: BaseException | None = None
        self.reason: BaseException | None = None
        self.job_id: str | None = None  # the job this scope's thread has in hand (``begin``/``end``)

    def begin(self, job_id: str) -> None:
        """The slot has been handed ``job_id``: from now on a stop meant for it can land, and none meant for an
        earlier job can."""
        with self._lock:
            self.job_id, self._pending = job_id, None

    def end(self) -> None:
        """The job is over: a stop meant for it must not end the next one (also a pending stop: cleared)."""
        with self._lock:
            self.job_id, self._pending = None, None

    def __enter__(self) -> Scope:
        """A stop asked for before the caption began (``stop(..., pending=True)``) is its reason at once: the
        caller checks ``reason`` and does not start the caption."""
        with self._lock:
            self._active, self.reason, self._sockets = True, self._pending, []
            self._pending = None
        _current.scope = self
        return self

    def __exit__(self, *exc_info) -> None:
        _current.scope = None
        with self._lock:
            self._active = False
            self._sockets = []

    @property
    def active(self) -> bool:
        return self._active

    def stop(self, reason: BaseException, *, pending: bool = False, job_id: str | None = None) -> bool:
        """Ends the caption in progress with ``reason``. With ``pending``, a caption that has not begun yet ends
        with it as it begins (until ``end``). With ``job_id``, only while that job is the one in hand: an
        operator's stop of a job that ended as the stop arrived must not end the next job of the same slot (the
        check and the mark are under the lock that ``begin`` and ``end`` take). False if nothing was stopped or
        marked."""
        with self._lock:
            if job_id is not None and job_id != self.job_id:
                return False
            if not self._active:
                if pending and self._pending is None:
                    self._pending = reason
                    return True
                return False
            if self.reason is not None:
                return False
            self.reason = reason
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)
        return True

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._active:
                return
            if self.reason is None:
                self._sockets.append(sock)
                return
        _shut(sock)  # stopped while connecting


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # closed already


_current = threading.local()


def current() -> Scope | None:
    """The scope of the caption in progress in this thread, if any."""
    return getattr(_current, "scope", None)


def current_slot_scope() -> Scope | None:
    """The scope a caption slot thread captions in (set by the worker when it starts the thread), or None in a
    thread that is not a slot (the main thread of a one-slot worker, a test, the database poller)."""
    return getattr(_current, "slot_scope", None)


def make_slot_thread_scope(scope: Scope | None = None) -> Scope:
    """Called in a slot thread once: its captions run in ``scope`` (a new one by default), which it returns."""
    _current.slot_scope = scope or Scope()
    return _current.slot_scope


def watch_socket(sock: socket.socket) -> None:
    """Called by the captioners' HTTP connections: a stop of this thread's caption shuts this socket down."""
    scope = current()
    if scope is not None:
        scope.watch(sock)
