"""The worker class every caption worker uses (settings.RQ['WORKER_CLASS'], and ``manage.py rqworker``).

It runs jobs in its own process like rq's SimpleWorker: forking a work horse per job costs about 4x the
throughput here, and the supervisor isolates failures at the process level instead. It always dequeues with the
JSON serializer and ``CaptionJob`` whatever it is given, so pickled or forged jobs fail without running.

Additions to rq's worker, relied on by the fleet (queues.fleet, queues.reconcile, queues.supervisor):

- A liveness thread. Every couple of seconds it renews the database lease of the attempt in hand
  (``execution.attempts_heartbeat``: the only liveness the reconciler trusts) and refreshes a key in Redis,
  ``portal:fleet:alive:<worker name>``, that the live workers page shows (pid, rss, current job). The key may vanish
  with a Redis restart or flush; nothing decides on its absence.
- ``stop-job`` works without a work horse: rq's command sets the stopped job and calls ``kill_horse``; here that
  raises ``JobStopped`` inside the running job, which records the task as stopped by an operator.
- A second stop signal (rq's "cold shutdown") never abandons the task in hand: during the caption it raises
  ``WorkerInterrupted``, which gives the attempt back as a retry; during rq's own bookkeeping of a job it is
  ignored (that takes milliseconds); only an idle worker exits at once.
- A job entry popped from a queue that is no longer the job's queue (its task's priority changed, so the job was
  published on another queue) is dropped without running and without touching the job.
- Queue pauses and suspension come from the database through ``queues.control`` (Redis only caches them).
- rq's per-job bookkeeping is trimmed for caption jobs (``_perform_caption``): the task row holds the outcome, so
  a successful caption job keeps no result, no finished-registry entry and no job hash; the worker's and the job's
  state go out in one pipeline when the job starts and one when it ends (rq spends about 12 round trips). What
  operators see stays: the started-job registry and the worker's current job while it runs (django-rq's views),
  rq's own failure path and failed-job registry for a job that raises, and the worker's counts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import traceback

from datetime import timedelta

from django.db import DatabaseError, close_old_connections, connection as database_connection
from rq.executions import Execution
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import now as rq_now, utcformat
from rq.exceptions import StopRequested
from rq.worker import SimpleWorker, WorkerStatus

from queues import control, correlation, execution
from queues.broker import CAPTION_CALLABLE, CaptionJob, CaptionQueue, alive_key  # noqa: F401 (alive_key: re-exported)
from queues.errors import JobStopped, WorkerInterrupted

ALIVE_TTL = 10  # seconds a liveness key outlives its last refresh
ALIVE_INTERVAL = 2.0
# rq's idle heartbeat TTL for our workers: a worker that died idle leaves the list within this many seconds.
WORKER_TTL = 30
# rq renews the worker's key (TTL WORKER_TTL + 60 s) before and after every dequeue and after every job, two round
# trips each time; between jobs once in this many seconds is plenty.
HEARTBEAT_EVERY = 5.0


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
        self._job_in_hand = False
        self._idle_written = False  # the end-of-job pipeline has just written state=idle

    # --- liveness --------------------------------------------------------------------------------------------
    def _alive_payload(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "pool": self.pool_name,
                           "rss": resident_memory_bytes(), "job": self.get_current_job_id()})

    def _refresh_alive(self) -> None:
        try:
            pipe = self.connection.pipeline(transaction=False)
            pipe.exists(self.key)
            pipe.set(alive_key(self.name), self._alive_payload(), ex=ALIVE_TTL)
            registered = pipe.execute()[0]
            if not registered and not self._stop_requested:
                # Redis restarted empty or was flushed: register again so the fleet pages and rq see this worker.
                SimpleWorker.register_birth(self)
        except Exception:  # Redis briefly unreachable: the next refresh tries again
            self.log.debug("could not refresh liveness key", exc_info=True)

    def _alive_loop(self) -> None:
        while not self._alive_stop.wait(ALIVE_INTERVAL):
            self._refresh_alive()

    def _lease_loop(self) -> None:
        """Renews the database lease of the attempt in hand. A thread of its own, so a Redis that hangs (frozen,
        unreachable: a call then waits for its socket timeout) never delays the renewal."""
        try:
            while not self._alive_stop.wait(ALIVE_INTERVAL):
                execution.attempts_heartbeat()
        finally:
            database_connection.close()  # this thread's own connection

    def register_birth(self, *args, **kwargs):
        super().register_birth(*args, **kwargs)
        self._refresh_alive()
        for target, name in ((self._alive_loop, "liveness"), (self._lease_loop, "task-lease")):
            threading.Thread(target=target, name=name, daemon=True).start()

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

    def request_stop(self, signum, frame):
        """The first SIGTERM/SIGINT. rq records the request only when a job runs; idle, it raises StopRequested
        wherever the main thread is, and a handler that catches broadly on that path (rq's own job error handling
        is a bare ``except``) would swallow it and the worker would go on taking jobs. The flag is set first, so the
        work loop stops at its next turn whatever happens to the exception."""
        self._stop_requested = True
        return super().request_stop(signum, frame)

    def request_force_stop(self, signum, frame):
        """A second SIGTERM/SIGINT. rq would raise SystemExit wherever the job is, file a dead letter for it and
        exit 0 with its task still PROCESSING; here the task in hand is always given back first."""
        requested = getattr(self, "_shutdown_requested_date", None)
        if requested is not None and (rq_now() - requested) < timedelta(seconds=1):
            return  # one signal delivered twice (to the process group and by the supervisor): rq's own rule
        if execution.captioning_now():
            self.log.warning("Worker %s: stopping at once; the task in hand goes back to its queue", self.name)
            raise WorkerInterrupted("the worker was told to stop at once")
        if self._job_in_hand:
            self.log.warning("Worker %s: second stop signal; exiting as soon as the job's outcome is recorded",
                             self.name)
            return
        super().request_force_stop(signum, frame)

    def check_for_suspension(self, burst: bool):
        """Suspension lives in the database (queues.control), so a Redis flush cannot resume processing."""
        notified = False
        while not self._stop_requested and control.processing_suspended_cached():
            if burst:
                self.log.info("Worker %s: suspended in burst mode, exiting", self.name)
                raise StopRequested
            if not notified:
                self.log.info("Worker %s: processing is suspended; waiting", self.name)
                before, notified = self.get_state(), True
                self.set_state(WorkerStatus.SUSPENDED)  # what rq's own check shows on the live workers page
            time.sleep(1)
        if notified:
            self.set_state(before)

    def handle_payload(self, message):
        """rq's commands. A shutdown asked for twice (a double click on "restart") must not become "stop at once":
        rq answers each with a SIGINT, and the second one would interrupt the task in hand."""
        from rq.command import parse_payload

        payload = parse_payload(message)
        if payload.get("command") == "shutdown" and self._stop_requested:
            self.log.info("Worker %s: already stopping after its job; shutdown request ignored", self.name)
            return
        return super().handle_payload(message)

    def execute_job(self, job, queue):
        if job.origin and job.origin != queue.name:
            # Left behind in this queue when the task's job was published on another one (a priority change):
            # the job belongs to that queue now. Running it here would skip the other queue's pause and order.
            self.log.info("Worker %s: %s was moved to %s; dropping its old entry in %s", self.name, job.id,
                          job.origin, queue.name)
            return
        try:
            is_caption = job.func_name == CAPTION_CALLABLE
        except Exception:
            is_caption = False  # not our JSON: rq runs it through CaptionJob, which refuses it without running it
        # Log lines about this job carry its task, this worker, the queue and the submitting request's correlation
        # id (from the job's meta; then from the claimed row, which also has it for jobs the relay published).
        task_id = job.args[0] if is_caption and job.args else None
        meta_id = (job.meta or {}).get("correlation_id") if is_caption else None
        with correlation.bound(meta_id or "", task_id=task_id, worker=self.name, queue=queue.name):
            return self._execute_caption_job(job, queue, is_caption)

    def _execute_caption_job(self, job, queue, is_caption: bool):
        claimed = None
        if is_caption:
            # Claim before rq's bookkeeping touches the job: a refused claim (the task ran already, was cancelled,
            # moved, or is waiting for a retry) then leaves the job hash as it is, which a live publication of the
            # same job id may share.
            claimed = self._claim(job, queue)
            if claimed is None:
                return
            job.claimed_task = claimed  # read by queues.jobs.caption_task
        self._job_in_hand = True
        try:
            if claimed is None:
                return super().execute_job(job, queue)  # not a caption job: rq's own path, results and all
            with correlation.bound(claimed.correlation_id or None):
                return self._perform_caption(job, queue)
        finally:
            self._job_in_hand = False
            if claimed is not None:
                execution.attempt_finished(claimed)

    def _perform_caption(self, job, queue) -> bool:
        """rq's ``prepare_execution``, ``prepare_job_execution``, ``perform_job`` and ``handle_job_success`` for a
        claimed caption job, in two pipelines. A job that raises goes through rq's own failure handling."""
        heartbeat_ttl = self.get_heartbeat_ttl(job)
        with self.connection.pipeline() as pipe:
            # What rq writes when a job starts: the execution (in the started-job registry, which django-rq's
            # "started" view and rq's abandoned-job cleanup read), the worker's state and current job, the job's.
            self.execution = Execution.create(job, heartbeat_ttl, pipeline=pipe, worker_name=self.name)
            self._state = WorkerStatus.BUSY
            self.last_heartbeat = rq_now()
            self.current_job_working_time = 0
            pipe.hset(self.key, mapping={"state": WorkerStatus.BUSY, "current_job": job.id,
                                         "current_job_working_time": 0,
                                         "last_heartbeat": utcformat(self.last_heartbeat)})
            pipe.expire(self.key, heartbeat_ttl)
            job.prepare_for_execution(self.name, pipeline=pipe)
            pipe.persist(job.key)  # rq's Job.perform does this on its own round trip
            if len(self.queues) == 1:  # popped with BLMOVE into the queue's intermediate list
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            pipe.execute()
        job.persisted = True
        job.started_at = rq_now()
        try:
            with self.death_penalty_class(job.timeout or self.queue_class.DEFAULT_TIMEOUT, JobTimeoutException,
                                          job_id=job.id):
                job.perform()
            job.ended_at = rq_now()
        except:  # noqa: E722 (rq's own perform_job catches everything here too)
            # rq's failure path, as its perform_job runs it: status, failed-job registry, result, counts.
            job._status = JobStatus.FAILED
            self.handle_execution_ended(job, queue, job.failure_callback_timeout)
            exc_info = sys.exc_info()
            self.handle_exception(job, *exc_info)
            self.handle_job_failure(job=job, exc_string="".join(traceback.format_exception(*exc_info)), queue=queue,
                                    started_job_registry=queue.started_job_registry)
            self.set_state(WorkerStatus.IDLE)
            return False
        job._status = JobStatus.FINISHED
        with self.connection.pipeline() as pipe:
            # The task row has the outcome: the job, its executions and its result go (rq's result_ttl=0), and the
            # worker is idle again with its counts up.
            pipe.hincrby(self.key, "successful_job_count", 1)
            pipe.hincrbyfloat(self.key, "total_working_time", (job.ended_at - job.started_at).total_seconds())
            pipe.hdel(self.key, "current_job")
            pipe.hset(self.key, "state", WorkerStatus.IDLE)
            self.execution.delete(job=job, pipeline=pipe)
            self.execution = None
            pipe.delete(job.key, job.execution_registry.key)
            pipe.execute()
        self._state, self._idle_written = WorkerStatus.IDLE, True
        self.log.info("Worker %s: %s: Job OK (%s)", self.name, queue.name, job.id)  # rq's line
        return True

    def set_state(self, state, pipeline=None):
        if pipeline is None and state == WorkerStatus.IDLE and self._idle_written:
            # rq's dequeue loop writes "idle" again right after the end-of-job pipeline did
            self._idle_written = False
            self._state = state
            return
        self._idle_written = False
        return super().set_state(state, pipeline)

    def heartbeat(self, timeout=None, pipeline=None):
        if pipeline is not None or timeout is not None:
            return super().heartbeat(timeout, pipeline)
        if self.last_heartbeat is not None and (rq_now() - self.last_heartbeat).total_seconds() < HEARTBEAT_EVERY:
            return None
        with self.connection.pipeline(transaction=False) as pipe:
            super().heartbeat(None, pipeline=pipe)
            pipe.execute()

    def _claim(self, job, queue):
        close_old_connections()
        try:
            task_id = int(job.args[0])
        except (IndexError, TypeError, ValueError):
            return None  # not one of ours: rq files it as failed through CaptionJob's checks when it runs
        try:
            claimed = execution.task_claim(task_id=task_id, worker_name=self.name, queue=queue.name)
        except DatabaseError:
            # The database is away: put the job back at the front of its queue and wait, rather than burn through
            # the queue filing every job as failed.
            self.log.warning("Worker %s: database unreachable; %s goes back to the front of %s", self.name, job.id,
                             queue.name, exc_info=True)
            try:
                database_connection.close()
            except Exception:
                pass
            self.connection.lpush(queue.key, job.id)
            time.sleep(1)
            return None
        if claimed is None:
            self.log.info("Worker %s: %s is not claimable (done, cancelled, moved or not due); skipped", self.name,
                          job.id)
            return None
        execution.attempt_started(claimed)
        return claimed

    def kill_horse(self, sig=None):
        """rq's stop-job command lands here (from the command thread); interrupt the job in the main thread."""
        if execution.captioning_now():
            os.kill(os.getpid(), signal.SIGUSR1)

    def perform_job(self, job, queue):
        # rq's path (jobs other than captions). The database may have closed an idle connection while we waited for
        # this job (MySQL wait_timeout): drop stale connections before the job and after it, as Django does around
        # each request. Caption jobs do it once, before their claim.
        close_old_connections()
        try:
            return super().perform_job(job, queue)
        finally:
            close_old_connections()
