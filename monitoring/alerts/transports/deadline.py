"""An overall deadline for one send, whatever the other side does.

urllib's and smtplib's timeouts bound each network wait, not the send: a receiver that answers one byte every few
seconds never trips them, and a send could outlast the notification's sending lease
(monitoring.alerts.notify.SENDING_LEASE_SECONDS), be taken back and go out twice. So a send runs inside a
``Deadline``: the connections it opens in its thread (the HTTP and SMTP connections of these transports, which call
``watch_socket``) are shut down by a timer when the deadline passes, the blocked read returns at once, and the
transport reports a timeout. The same object tells a send of several requests (PagerDuty's events) how much of its
time is left.
"""

from __future__ import annotations

import socket
import threading
import time


class Deadline:
    """``seconds`` from now. As a context manager, shuts down the sockets watched in this thread when it passes."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._cut = False
        self._timer: threading.Timer | None = None
        self._outer: Deadline | None = None

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def passed(self) -> bool:
        return self._cut or time.monotonic() >= self.at

    def __enter__(self) -> Deadline:
        self._outer = current()
        _current.deadline = self
        self._timer = threading.Timer(self.remaining(), self._cut_off)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()
        _current.deadline = self._outer
        with self._lock:
            self._sockets = []

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._cut:
                self._sockets.append(sock)
                return
        _shut(sock)  # the deadline passed while connecting

    def _cut_off(self) -> None:
        with self._lock:
            self._cut = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    # socket.socket's own shutdown, also for a TLS socket: ssl.SSLSocket.shutdown would drop its SSL object under the
    # thread that is reading, which then fails with a ValueError instead of seeing the connection end.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # closed already


_current = threading.local()


def current() -> Deadline | None:
    """The deadline of the send in progress in this thread, if any."""
    return getattr(_current, "deadline", None)


def watch_socket(sock: socket.socket) -> None:
    """Called by the transports' connections: the deadline of this thread's send shuts this socket down."""
    deadline = current()
    if deadline is not None:
        deadline.watch(sock)
