"""The worker class every caption worker uses (settings.RQ['WORKER_CLASS'], and ``manage.py rqworker``).

It runs jobs in its own process like rq's SimpleWorker: forking a work horse per job costs about 4x the
throughput here, and the supervisor isolates failures at the process level instead. It always dequeues with the
JSON serializer and ``CaptionJob`` whatever it is given, so pickled or forged jobs fail without running.

Two additions to rq's worker, both relied on by the fleet (queues.fleet, queues.reconcile):

- A liveness key, ``portal:fleet:alive:<worker name>``, refreshed every couple of seconds by a daemon thread and
  expiring soon after the process dies (SIGKILL included). rq's own worker key can outlive a dead SimpleWorker for
  minutes (its TTL covers the whole job timeout), which is far too slow to notice a crash.
- ``stop-job`` works without a work horse: rq's command sets the stopped job and calls ``kill_horse``; here that
  raises ``JobStopped`` inside the running job, which records the task as stopped by an operator.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

from django.db import close_old_connections
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from queues import execution
from queues.broker import CaptionJob, CaptionQueue
from queues.errors import JobStopped

ALIVE_PREFIX = "portal:fleet:alive:"
ALIVE_TTL = 10  # seconds a liveness key outlives its last refresh
ALIVE_INTERVAL = 2.0
# rq's idle heartbeat TTL for our workers: a worker that died idle leaves the list within this many seconds.
WORKER_TTL = 30


def alive_key(worker_name: str) -> str:
    return ALIVE_PREFIX + worker_name


def resident_memory_bytes(pid: int | None = None) -> int | None:
    try:
        with open(f"/proc/{pid or 'self'}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class CaptionWorker(SimpleWorker):
    job_class = CaptionJob
    queue_class = CaptionQueue

    def __init__(self, queues, *args, pool: str = "", **kwargs):
        kwargs["serializer"] = JSONSerializer
        kwargs["job_class"] = CaptionJob
        kwargs["queue_class"] = CaptionQueue  # pausing queues works through its dequeue
        kwargs.setdefault("worker_ttl", WORKER_TTL)
        super().__init__(queues, *args, **kwargs)
        self.pool_name = pool or os.environ.get("PORTAL_WORKER_POOL", "")
        self._alive_stop = threading.Event()
        self._alive_thread: threading.Thread | None = None

    # --- liveness --------------------------------------------------------------------------------------------
    def _alive_payload(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "pool": self.pool_name,
                           "rss": resident_memory_bytes(), "job": self.get_current_job_id()})

    def _refresh_alive(self) -> None:
        try:
            self.connection.set(alive_key(self.name), self._alive_payload(), ex=ALIVE_TTL)
        except Exception:  # Redis briefly unreachable: the next refresh tries again
            self.log.debug("could not refresh liveness key", exc_info=True)

    def _alive_loop(self) -> None:
        while not self._alive_stop.wait(ALIVE_INTERVAL):
            self._refresh_alive()

    def register_birth(self, *args, **kwargs):
        super().register_birth(*args, **kwargs)
        self._refresh_alive()
        self._alive_thread = threading.Thread(target=self._alive_loop, name="liveness", daemon=True)
        self._alive_thread.start()

    def register_death(self, *args, **kwargs):
        self._alive_stop.set()
        try:
            self.connection.delete(alive_key(self.name))
        except Exception:
            pass
        return super().register_death(*args, **kwargs)

    # --- jobs --------------------------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        super()._install_signal_handlers()
        signal.signal(signal.SIGUSR1, self._stop_current_job)

    def _stop_current_job(self, signum, frame):
        # Only while the captioner runs: raising inside rq's own bookkeeping would leave its registries half-updated.
        if execution.captioning_now():
            raise JobStopped("stopped by an operator")

    def kill_horse(self, sig=None):
        """rq's stop-job command lands here (from the command thread); interrupt the job in the main thread."""
        if execution.captioning_now():
            os.kill(os.getpid(), signal.SIGUSR1)

    def perform_job(self, job, queue):
        # The database may have closed an idle connection while we waited for this job (MySQL wait_timeout):
        # drop stale connections before the job and after it, as Django does around each request.
        close_old_connections()
        try:
            return super().perform_job(job, queue)
        finally:
            close_old_connections()
