"""The worker class every caption worker uses (settings.RQ['WORKER_CLASS'], and ``manage.py rqworker``).

It runs jobs in its own process like rq's SimpleWorker: forking a work horse per job costs about 4x the
throughput here, and the supervisor isolates failures at the process level instead. It always dequeues with the
JSON serializer and ``CaptionJob`` whatever it is given, so pickled or forged jobs fail without running.

Additions to rq's worker, relied on by the fleet (its services, reconcile and supervisor):

- A liveness thread. Every couple of seconds it renews the database lease of the attempt in hand
  (``execution.attempts_heartbeat``: the only liveness the reconciler trusts) and refreshes a key in Redis,
  ``portal:fleet:alive:<worker name>``, that the live workers page shows (pid, rss, current job). The key may vanish
  with a Redis restart or flush; nothing decides on its absence.
- ``stop-job`` works without a work horse: rq's command sets the stopped job and calls ``kill_horse``; here that
  raises ``JobStopped`` inside the running job, which records the task as stopped by an operator.
- A first stop signal never raises: the handler sets a flag (and does no I/O), the worker pops for at most
  SLOTS_POP seconds at a time and reads the flag between pops, a job popped as the stop came goes back to the front
  of its queue, and a job in hand (being claimed or captioned) runs to its end. rq raised StopRequested wherever the
  main thread was unless the caption had begun, which dropped a popped job or abandoned a claimed one.
- A second stop signal (rq's "cold shutdown") never abandons the task in hand: during the caption it raises
  ``WorkerInterrupted``, which gives the attempt back as a retry; between the claim and the caption it marks the
  caption to be given back as it begins; during rq's own bookkeeping of a job it waits for it (milliseconds); an
  idle worker leaves its pop at once.
- Registration survives Redis losing its data: the liveness thread registers the worker again when it is missing
  from rq's worker set or its hash has no birth.
- A job entry popped from a queue that is no longer the job's queue (its task's priority changed, so the job was
  published on another queue) is dropped without running and without touching the job.
- Queue pauses and suspension come from the database through ``queues.control`` (Redis only caches them).
- rq's per-job bookkeeping is trimmed for caption jobs (``_perform_caption``): the task row holds the outcome, so
  a successful caption job keeps no result, no finished-registry entry and no job hash; the worker's and the job's
  state go out in one pipeline when the job starts and one when it ends (rq spends about 12 round trips). What
  operators see stays: the started-job registry and the worker's current job while it runs (django-rq's views),
  rq's own failure path and failed-job registry for a job that raises, and the worker's counts.
- Caption slots (``slots`` > 1, ``manage.py rqworker --slots N``): N jobs at once in one process, for captioners
  that mostly wait on a server. The main thread dequeues only while a slot is free and hands each job to a slot
  thread, which claims, captions and records it exactly as a one-slot worker does (each with its own claim, its
  own database connection, rq execution and timeout). Stop-job and a second stop signal reach one slot's caption
  through its ``queues.cancel`` scope; a first stop signal lets every slot finish. One rq worker registration per
  process: its current job is one of those running; the liveness key lists every slot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue as queue_module
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta

import redis
from django.db import Error as DatabaseDriverError
from django.db import close_old_connections
from django.db import connection as database_connection
from rq import worker_registration
from rq.exceptions import DequeueTimeout, StopRequested
from rq.executions import Execution
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException, TimerDeathPenalty
from rq.utils import now as rq_now
from rq.utils import utcformat
from rq.worker import SimpleWorker, WorkerStatus

from queues import broker, correlation, execution
from queues.broker import CAPTION_CALLABLE, CaptionJob, CaptionQueue, alive_key, job_timeout  # noqa: F401 (alive_key: re-exported)
from queues.errors import JobStopped, WorkerInterrupted
from queues import cancel, control
from queues.models import MAX_SLOTS

ALIVE_TTL = 10  # seconds a liveness key outlives its last refresh
ALIVE_INTERVAL = 2.0
# rq's idle heartbeat TTL for our workers: a worker that died idle leaves the list within this many seconds.
WORKER_TTL = 30
# rq renews the worker's key (TTL WORKER_TTL + 60 s) before and after every dequeue and after every job, two round
# trips each time; between jobs once in this many seconds is plenty.
HEARTBEAT_EVERY = 5.0
# Seconds the command listener's thread waits per poll (a local select on its subscribed connection, no round trip):
# the longest an idle worker's exit can wait for it if Redis does not answer UNSUBSCRIBE.
COMMAND_POLL = 0.5
# Seconds a worker with slots blocks in one pop before it reads its stop flag again (BLPOP takes fractions since
# Redis 6): how long an idle one waits to leave after a stop signal.
SLOTS_POP = 0.5
# Seconds a worker keeps sending the end of a successful job to a Redis that does not answer (a restart, a failover).
END_RETRY_SECONDS = 60
# Seconds after a stop at once (the second stop signal) after which a worker that is still running logs where its
# threads are: before its supervisor's SIGKILL (queues.fleet.supervisor.FORCED_GRACE, 10 s) ends it unexplained.
FORCED_REPORT_AFTER = 5.0
# The innermost frames of each thread that report shows.
FORCED_REPORT_FRAMES = 20
# Seconds between the report thread's looks at whether a stop at once came.
REPORT_POLL = 0.5


def resident_memory_bytes(pid: int | None = None) -> int | None:
    try:
        with open(f"/proc/{pid or 'self'}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _is_caption(job) -> bool:
    try:
        return job.func_name == CAPTION_CALLABLE
    except Exception:
        return False  # not our JSON: rq runs it through CaptionJob, which refuses it without running it


class _RqDequeueLine(logging.Filter):
    """Drops rq's own "queue: job" line at dequeue: CaptionWorker writes it instead, with the task, the worker,
    the queue and the correlation id on the record (which rq's line lacks: ``extra`` puts ``worker`` there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.funcName == "dequeue_job_and_maintain_ttl" and record.levelno == logging.INFO
                    and not hasattr(record, "worker"))


logging.getLogger("rq.worker").addFilter(_RqDequeueLine())


class CaptionWorker(SimpleWorker):
    job_class = CaptionJob
    queue_class = CaptionQueue

    def __init__(self, queues, *args, pool: str = "", slots: int = 1, **kwargs):
        kwargs["serializer"] = JSONSerializer
        kwargs["job_class"] = CaptionJob
        kwargs["queue_class"] = CaptionQueue  # pausing queues works through its dequeue
        kwargs.setdefault("worker_ttl", WORKER_TTL)
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots must be between 1 and {MAX_SLOTS}, not {slots}")
        self.slot_count = slots
        self._local = threading.local()  # per slot thread: rq's execution, the slot
        self._stopped_jobs: set[str] = set()  # with slots: jobs an operator stopped
        super().__init__(queues, *args, **kwargs)
        self.pool_name = pool or os.environ.get("PORTAL_WORKER_POOL", "")
        self._alive_stop = threading.Event()
        self._starting = False  # in bootstrap: a stop signal is recorded, not raised
        self._idle_written = False  # the end-of-job pipeline has just written state=idle
        self._slots: list[CaptionSlot] = []
        self._slots_changed = threading.Condition()
        self._main_waiting = False  # the main thread waits for a free slot (a stop signal may interrupt it there)
        self._popping = False  # the main thread pops (only a second stop signal interrupts it there)
        self._shutdown_date_written = False
        self._stop_target: str | None = None  # one slot: the job the last stop-job named
        self._captioning: str | None = None  # one slot: the job whose caption the main thread runs
        self._registration_lock = threading.Lock()  # _register_again against register_death
        self._death_registered = False
        self._forced_at: float | None = None  # monotonic time of the first stop at once: the report thread's cue
        self._shutdown_asked = False  # a shutdown command or key was acted on (_shutdown_commanded)
        # With slots: the worker hash's state and current job are computed from the slots and written under this
        # lock, so two slots starting or ending at once never leave it naming a finished job or "idle" while one runs.
        self._state_lock = threading.Lock() if slots > 1 else contextlib.nullcontext()
        if slots > 1:
            self.death_penalty_class = SlotDeathPenalty  # SIGALRM reaches the main thread only

    # --- rq's per-job attributes, per slot thread ---------------------------------------------------------------
    @property
    def execution(self):
        return getattr(self._local, "execution", None)

    @execution.setter
    def execution(self, value):
        self._local.execution = value

    @property
    def _stopped_job_id(self):
        """rq's "this job was stopped by stop-job" mark, read when it files the failure. With slots, per slot."""
        if self.slot_count == 1:
            return self.__dict__.get("_stopped_one")
        slot = getattr(self._local, "slot", None)
        return slot.job_id if slot is not None and slot.job_id in self._stopped_jobs else None

    @_stopped_job_id.setter
    def _stopped_job_id(self, value):
        if self.slot_count == 1:
            self.__dict__["_stopped_one"] = value
            return
        slot = getattr(self._local, "slot", None)
        if value is None and slot is not None:
            self._stopped_jobs.discard(slot.job_id)
        elif value is not None:
            self._stopped_jobs.add(value)

    # --- liveness --------------------------------------------------------------------------------------------
    def _alive_payload(self) -> str:
        payload = {"pid": os.getpid(), "host": socket.gethostname(), "pool": self.pool_name,
                   "rss": resident_memory_bytes(), "job": self.get_current_job_id(), "slots": self.slot_count}
        if self.slot_count > 1:
            payload["running"] = [slot.describe() for slot in self._slots]
        return json.dumps(payload)

    def _refresh_alive(self) -> None:
        try:
            pipe = self.connection.pipeline(transaction=False)
            pipe.sismember(worker_registration.REDIS_WORKER_KEYS, self.key)
            pipe.hexists(self.key, "birth")
            pipe.set(alive_key(self.name), self._alive_payload(), ex=ALIVE_TTL)
            pipe.exists(broker.restart_key(self.name))
            requested = getattr(self, "_shutdown_requested_date", None)
            if requested is not None and not self._shutdown_date_written:
                # rq's signal handler writes it; ours does no I/O (``_shutdown``)
                pipe.hset(self.key, "shutdown_requested_date", utcformat(requested))
            listed, born, _, restart = pipe.execute()[:4]
            self._shutdown_date_written = requested is not None
            if not (listed and born):
                self._register_again()
            if restart:
                self._shutdown_commanded("read from its key: the command came while it was not listening")
        except Exception:  # Redis briefly unreachable: the next refresh tries again
            self.log.debug("could not refresh liveness key", exc_info=True)

    def _register_again(self) -> None:
        """Redis restarted empty, was flushed or failed over: this worker is registered again, so rq, the live
        workers page and rq_workers_active see it. Not by key existence: a busy worker's next write (its end-of-job
        pipeline, its heartbeat) makes a partial hash of its key, without its birth and outside rq's worker set,
        before this thread looks (tests/drills/test_liveness.py). What that hash holds (state, current job, counts)
        is kept. Never after ``register_death``: the lock orders the two."""
        with self._registration_lock:
            if self._death_registered:
                return
            self.birth_date = self.birth_date or rq_now()
            self.last_heartbeat = self.last_heartbeat or rq_now()
            with self._state_lock, self.connection.pipeline() as pipe:  # slots write the state under it too
                pipe.hset(self.key, mapping={**self.serialize(), "state": self._state})
                worker_registration.register(self, pipe)
                # A busy one-slot worker writes its key only between jobs: it must outlive a whole caption.
                pipe.expire(self.key, max(self.worker_ttl, job_timeout()) + 60)
                pipe.execute()
        self.log.warning("Worker %s: registered again (Redis had lost its registration)", self.name)

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
        if self.slot_count > 1 and not self._slots:
            self._slots = [CaptionSlot(self, index) for index in range(self.slot_count)]
        self._refresh_alive()
        for target, name in ((self._alive_loop, "liveness"), (self._lease_loop, "task-lease"),
                             (self._report_loop, "stop-report")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def teardown(self):
        # With slots: every slot finishes its job (a stop signal lets them) before the worker says it is gone.
        for slot in self._slots:
            slot.close()
        for slot in self._slots:
            slot.thread.join()
        return super().teardown()

    # --- the command listener (stop-job, shutdown, kill-horse over Redis pub/sub) -------------------------------
    # rq's listener is redis-py's PubSubWorkerThread polling every 60 s, and rq's unsubscribe() sends UNSUBSCRIBE
    # before it clears the thread's run flag: when the thread reads the reply first, it waits out a whole poll
    # unsubscribed, and redis-py 8.2's stop() joins it without a limit, so an idle worker took 60 s to exit (every
    # retire, scale-down, hand-over and deploy waited for it; tests/drills/test_exit_drill.py). This listener is a
    # thread of our own: its stop flag is set before UNSUBSCRIBE is sent, so the reply that wakes it also ends it, and
    # it polls every COMMAND_POLL seconds in any case. No private attribute of redis-py is touched.
    def subscribe(self):
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self._commands_stop = threading.Event()
        self.pubsub_thread = threading.Thread(target=self._listen, args=(self.pubsub, self._commands_stop),
                                              name="commands", daemon=True)
        self.pubsub_thread.start()

    def _listen(self, pubsub, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    pubsub.get_message(ignore_subscribe_messages=True, timeout=COMMAND_POLL)
                except Exception as error:
                    if stop.is_set():
                        break
                    if isinstance(error, redis.exceptions.ConnectionError):  # redis-py subscribes again on reconnect
                        self.log.error("Worker %s: command listener cannot reach Redis: %s; retrying in 2 s",
                                       self.name, error)
                    else:
                        self.log.exception("Worker %s: command listener failed; it goes on", self.name)
                    stop.wait(2.0)
        finally:
            pubsub.close()  # here, not in unsubscribe(): never under a read still in progress

    def unsubscribe(self):
        thread = self.pubsub_thread
        if thread is None:
            return
        self._commands_stop.set()
        try:
            self.pubsub.unsubscribe()  # its reply wakes the thread, which then sees the flag
        except Exception:  # Redis gone (the attempt costs a connect timeout): the thread ends at its next poll
            pass
        thread.join(timeout=COMMAND_POLL + 1)
        self.pubsub_thread = None

    def register_death(self, *args, **kwargs):
        """The last step of the exit (teardown, after every slot gave back or finished its task). From here a stop
        signal has nothing left to stop, so it is ignored: Python puts back the default handlers as it shuts down,
        and the supervisor's resent forced stop (or systemd's, Kubernetes') landing then killed the worker by
        SIGTERM, which the fleet's books count as a crash (tests/drills/test_stop_signals.py). SIG_IGN is the one
        disposition Python keeps through its shutdown. A worker that hangs past here is still killed (SIGKILL) by
        its supervisor's stop timeout."""
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_IGN)
        self._alive_stop.set()
        with self._registration_lock:
            self._death_registered = True
        try:
            self.connection.delete(alive_key(self.name))
        except Exception:
            pass
        return super().register_death(*args, **kwargs)

    def bootstrap(self, *args, **kwargs):
        """rq installs its stop-signal handlers only after bootstrap has registered the worker and subscribed it, and
        its work loop catches a stop only inside its ``try``: a SIGTERM before (a scale-down or deploy just after a
        start) ended the process outright and left it in ``rq:workers`` with its key for minutes
        (tests/drills/test_exit_drill.py). Here the handlers come first, and until rq installs them again just
        before its loop (``_install_signal_handlers``) a stop is only recorded, never raised: the loop ends at its
        first turn, through teardown, like any stop."""
        self._starting = True
        self._install_handlers()
        return super().bootstrap(*args, **kwargs)

    # --- jobs --------------------------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        """Called by rq's ``work()`` right before its loop's ``try``: from here on a stop may raise."""
        self._starting = False
        if self._stop_requested:
            return  # stopped during start-up: the handlers are already the second stop's (request_force_stop)
        self._install_handlers()

    def _install_handlers(self):
        super()._install_signal_handlers()
        signal.signal(signal.SIGUSR1, self._stop_current_job)

    def _stop_current_job(self, signum, frame):
        # Only while the captioner runs (raising inside rq's own bookkeeping would leave its registries half-updated),
        # and only the job the stop names: rq's command checked the worker's current job in Redis, and the signal
        # arrives a moment later, when the next job's caption may have begun.
        if execution.captioning_now() and self._stop_target is not None and self._stop_target == self._captioning:
            raise JobStopped("stopped by an operator")

    def request_stop(self, signum, frame):
        """The first SIGTERM/SIGINT: the flag is set first, then rq's handler records the date, installs the second
        stop's handler and calls ``_shutdown`` (which raises only while a slotted worker waits for a free slot)."""
        self._stop_requested = True
        return super().request_stop(signum, frame)

    def _shutdown(self):
        """After the first stop signal (``request_stop`` has set the flag and the date). rq raises StopRequested
        wherever the main thread is unless the worker's state is busy, which it becomes only as the caption starts:
        a stop between the pop and the caption dropped the popped job or abandoned the claimed task, whose recovery
        then used a retry (tests/drills/test_stop_signals.py). Here nothing raises outside a wait: the dequeue loop
        pops for at most SLOTS_POP seconds and reads the flag between pops, a job popped as the stop came goes back
        to the front of its queue, and a job in hand runs to its end. With slots the main thread is interrupted
        while it waits for a free slot. No Redis here: a handler that does I/O can land inside the connection pool's
        lock on the same thread (the liveness thread writes the date, ``_refresh_alive``)."""
        if self._starting:
            return  # the flag is set: the work loop stops at its first turn
        if self.scheduler:
            self.stop_scheduler()
        if self._main_waiting:
            raise StopRequested()

    def request_force_stop(self, signum, frame):
        """A second SIGTERM/SIGINT. rq would raise SystemExit wherever the job is, file a dead letter for it and
        exit 0 with its task still PROCESSING; here the task in hand is always given back first."""
        requested = getattr(self, "_shutdown_requested_date", None)
        if requested is not None and (rq_now() - requested) < timedelta(seconds=1):
            return  # one signal delivered twice (to the process group and by the supervisor): rq's own rule
        if self._starting:  # nothing in hand yet; raising here would skip teardown (outside rq's try)
            self.log.warning("Worker %s: told again to stop; stopping as soon as start-up ends", self.name)
            return
        if self._forced_at is None:  # no lock taken and no thread started: this handler may interrupt anything,
            self._forced_at = time.monotonic()  # even itself (a signal storm)
        if self.slot_count > 1:
            # Every slot's caption, in progress or about to start (claimed, not begun), ends at once and its task
            # goes back to its queue; what is being recorded is recorded.
            stopped = sum(slot.scope.stop(WorkerInterrupted("the worker was told to stop at once"), pending=True)
                          for slot in self._slots if slot.job_id)
            self.log.warning("Worker %s: stopping at once; %d task(s) in hand go back to their queues", self.name,
                             stopped)
        elif execution.captioning_now():
            self.log.warning("Worker %s: stopping at once; the task in hand goes back to its queue", self.name)
            raise WorkerInterrupted("the worker was told to stop at once")
        else:
            # Between the pop and the caption (the claim, rq's bookkeeping): the caption about to start is given back
            # instead of run; a job's outcome being recorded is recorded.
            execution.interrupt_next_caption()
            self.log.warning("Worker %s: second stop signal; the task in hand, if any, goes back to its queue",
                             self.name)
        if self._main_waiting or self._popping:
            raise StopRequested()  # a Redis that does not answer the pop must not hold the worker

    def _report_loop(self) -> None:
        """FORCED_REPORT_AFTER seconds after the first stop at once, in a worker still running: where its main thread
        and each slot that still holds a job are. A stop held up (a slot's end of job on a database or a Redis that
        does not answer) is then explained in the worker's log before its supervisor kills it. A thread of its own,
        started with the worker, that reads when the stop came (the liveness thread may itself wait on that Redis)."""
        while not self._alive_stop.wait(REPORT_POLL):  # set as the worker registers its death
            if self._forced_at is not None and time.monotonic() - self._forced_at >= FORCED_REPORT_AFTER:
                self._report_threads()
                return

    def _report_threads(self) -> None:
        frames = sys._current_frames()
        threads = [("main thread", threading.main_thread(), None)]
        threads += [(f"slot {slot.index}", slot.thread, slot.job_id) for slot in self._slots
                    if slot.job_id and slot.thread.is_alive()]
        parts = []
        for label, thread, job_id in threads:
            frame = frames.get(thread.ident)
            stack = "".join(traceback.format_stack(frame, limit=FORCED_REPORT_FRAMES)) if frame else "  (ended)\n"
            parts.append(f"{label}{f' with {job_id}' if job_id else ''}:\n{stack}")
        self.log.warning("Worker %s: still running %g s after it was told to stop at once; where its threads are:\n%s",
                         self.name, FORCED_REPORT_AFTER, "".join(parts).rstrip())

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
        if payload.get("command") == "stop-job" and self.slot_count == 1:
            self._stop_target = payload.get("job_id")  # read by the SIGUSR1 handler rq's kill_horse leads to
        if payload.get("command") == "shutdown":
            self._shutdown_commanded("rq's shutdown command")
            return
        if payload.get("command") == "stop-job" and self.slot_count > 1:
            job_id = payload.get("job_id")
            for slot in self._slots:
                if slot.job_id == job_id:
                    # Stopped now if captioning, or as its caption begins if the job is still being claimed; a job
                    # whose caption is over is recorded as it ended (the mark is dropped with the job). The scope
                    # refuses a stop for a job that is no longer the slot's (it ended since the check above).
                    self._stopped_jobs.add(job_id)
                    if not slot.scope.stop(JobStopped("stopped by an operator"), pending=True, job_id=job_id):
                        self._stopped_jobs.discard(job_id)
                        self.log.info("Worker %s: stop-job for %s, which has just ended; ignored", self.name, job_id)
                    return
            self.log.info("Worker %s: stop-job for %s, which no slot runs; ignored", self.name, job_id)
            return
        return super().handle_payload(message)

    def _shutdown_commanded(self, how: str) -> None:
        """A restart or shutdown asked through rq's command or its key (broker.send_worker_shutdown), whichever the
        command listener or the liveness thread sees first: one SIGINT, the first stop, as rq's own command sends. A
        shutdown asked for twice (a double click on "restart", or the command and its key) must not become the
        stop at once: a second SIGINT would interrupt the task in hand."""
        with self._registration_lock:
            if self._stop_requested or self._shutdown_asked or self._death_registered:
                self.log.info("Worker %s: already stopping after its job; shutdown request (%s) ignored", self.name,
                              how)
                return
            self._shutdown_asked = True
        self.log.info("Worker %s: shutdown requested (%s); stopping after its job", self.name, how)
        os.kill(os.getpid(), signal.SIGINT)

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        """rq's loop, with pops of at most SLOTS_POP seconds and the stop flag read between them: a first stop signal
        never raises in here, so a popped job is never dropped (``_shutdown``). With slots, it pops only while a slot
        is free."""
        if self.slot_count > 1:
            with self._slots_changed:
                # Never pop a job no slot can take: it would exist only in this process' memory.
                self._main_waiting = True
                try:
                    while not self._stop_requested and self._free_slot() is None:
                        self._slots_changed.wait(1.0)
                        with contextlib.suppress(redis.exceptions.ConnectionError):  # the pop loop reports it
                            self.heartbeat()
                finally:
                    self._main_waiting = False
        self.set_state(WorkerStatus.IDLE)
        self.procline("Listening on " + ",".join(self.queue_names()))
        idle_since, wait = time.monotonic(), 1.0
        while not self._stop_requested:
            try:
                self.heartbeat()
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                self._popping = True
                try:
                    result = self.queue_class.dequeue_any(
                        self._ordered_queues, None if timeout is None else SLOTS_POP, connection=self.connection,
                        job_class=self.job_class, serializer=self.serializer,
                        death_penalty_class=self.death_penalty_class)
                finally:
                    self._popping = False
            except DequeueTimeout:
                if max_idle_time is not None and time.monotonic() - idle_since >= max_idle_time:
                    return None
                continue
            except redis.exceptions.ConnectionError as error:
                self.log.error("Worker %s: could not connect to Redis: %s; retrying in %g s", self.name, error, wait)
                self._sleep_unless_stopped(wait)
                wait = min(wait * 2, 60)
                continue
            if result is not None:
                job, queue = result
                self.reorder_queues(reference_queue=queue)
                self._log_dequeued(job, queue)  # rq's own line is dropped (_RqDequeueLine): this one names the task
            return result
        return None

    def _sleep_unless_stopped(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop_requested and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _free_slot(self) -> CaptionSlot | None:
        return next((slot for slot in self._slots if slot.free), None)

    def execute_job(self, job, queue):
        if self._stop_requested:  # popped as the stop came: back to the front of its queue, untouched
            self.connection.lpush(queue.key, job.id)
            return
        if self.slot_count > 1:
            with self._slots_changed:
                slot = self._free_slot()
                slot.take(job)
            slot.hand(job, queue)
            return
        return self._execute_one(job, queue)

    def _execute_one(self, job, queue):
        if job.origin and job.origin != queue.name:
            # Left behind in this queue when the task's job was published on another one (a priority change):
            # the job belongs to that queue now. Running it here would skip the other queue's pause and order.
            self.log.info("Worker %s: %s was moved to %s; dropping its old entry in %s", self.name, job.id,
                          job.origin, queue.name)
            return
        fields = self._job_log_fields(job, queue)
        # Log lines about this job carry its task, this worker, the queue and the submitting request's correlation
        # id (from the job's meta; then from the claimed row, which also has it for jobs the relay published).
        with correlation.bound(fields.pop("correlation_id") or "", **fields):
            return self._execute_caption_job(job, queue, _is_caption(job))

    def _log_dequeued(self, job, queue) -> None:
        """rq's "queue: job" line (its own is dropped by _RqDequeueLine), with the job's task, worker, queue and id."""
        self.log.info("Worker %s: %s: %s", self.name, queue.name, job.id, extra=self._job_log_fields(job, queue))

    def _job_log_fields(self, job, queue) -> dict:
        """What a log line about ``job`` carries: its task, the correlation id in its meta, this worker, the queue."""
        is_caption = _is_caption(job)
        return {"correlation_id": (job.meta or {}).get("correlation_id") if is_caption else None,
                "task_id": job.args[0] if is_caption and job.args else None, "worker": self.name,
                "queue": queue.name}

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
        try:
            if claimed is None:
                return super().execute_job(job, queue)  # not a caption job: rq's own path, results and all
            with correlation.bound(claimed.correlation_id or None):
                return self._perform_caption(job, queue)
        finally:
            if claimed is not None:
                execution.attempt_finished(claimed)

    def _perform_caption(self, job, queue) -> bool:
        """rq's ``prepare_execution``, ``prepare_job_execution``, ``perform_job`` and ``handle_job_success`` for a
        claimed caption job, in two pipelines. A job that raises goes through rq's own failure handling."""
        heartbeat_ttl = self.get_heartbeat_ttl(job)
        with self._state_lock, self.connection.pipeline() as pipe:
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
            started_text = utcformat(job.started_at)  # what the end compares, to delete only this run's hash
            pipe.persist(job.key)  # rq's Job.perform does this on its own round trip
            # (no LREM of rq's intermediate list: CaptionQueue pops without one, whatever the number of queues)
            pipe.execute()
        job.persisted = True
        job.started_at = rq_now()
        if self.slot_count == 1:
            self._captioning = job.id
        try:
            with self.death_penalty_class(job.timeout or self.queue_class.DEFAULT_TIMEOUT, JobTimeoutException,
                                          job_id=job.id):
                job.perform()
            job.ended_at = rq_now()
        except:  # noqa: E722 (rq's own perform_job catches everything here too)
            self._captioning = None
            # rq's failure path, as its perform_job runs it: status, failed-job registry, result, counts.
            job._status = JobStatus.FAILED
            self.handle_execution_ended(job, queue, job.failure_callback_timeout)
            exc_info = sys.exc_info()
            self.handle_exception(job, *exc_info)
            with self._state_lock:
                self._slot_ending()
                self.handle_job_failure(job=job, exc_string="".join(traceback.format_exception(*exc_info)),
                                        queue=queue, started_job_registry=queue.started_job_registry)
                self.set_state(WorkerStatus.IDLE)
            return False
        self._captioning = None
        job._status = JobStatus.FINISHED
        # The task row already says COMPLETED. If Redis is away now, the job's hash (persisted, "started") and its
        # entry in the started-job registry would stay, and rq's abandoned-job cleanup would file a dead letter for
        # a completed task a few minutes later; a one-slot worker would also quit (rq's loop exits on an error it
        # does not know). So the pipeline is sent again until Redis takes it (for about END_RETRY_SECONDS). Should
        # an attempt have run with its reply lost, the counts go up twice; the deletions are the same either way.
        deadline, wait = time.monotonic() + END_RETRY_SECONDS, 0.5
        while True:
            try:
                other = self._send_job_end(job, started_text)
                break
            except redis.exceptions.RedisError as error:
                if time.monotonic() >= deadline:
                    self.log.error("Worker %s: could not record the end of %s in Redis for %d s (%s); the task is "
                                   "completed, the job's entries stay until rq's cleanup", self.name, job.id,
                                   END_RETRY_SECONDS, error)
                    other = self._other_running_job()
                    break
                self.log.warning("Worker %s: Redis unreachable as %s ended (%s); trying again in %g s", self.name,
                                 job.id, error, wait)
                time.sleep(wait)
                wait = min(wait * 2, 5.0)
        self.execution = None
        if other is None:
            self._state, self._idle_written = WorkerStatus.IDLE, True
        self.log.info("Worker %s: %s: Job OK (%s)", self.name, queue.name, job.id)  # rq's line
        return True

    def _send_job_end(self, job, started_text: str) -> str | None:
        """The end of a successful caption job in one pipeline. Returns the job another slot runs, if any."""
        with self._state_lock, self.connection.pipeline() as pipe:
            # The task row has the outcome: the job, its executions and its result go (rq's result_ttl=0), and the
            # worker is idle again with its counts up.
            pipe.hincrby(self.key, "successful_job_count", 1)
            pipe.hincrbyfloat(self.key, "total_working_time", (job.ended_at - job.started_at).total_seconds())
            self._slot_ending()
            other = self._other_running_job()
            if other is None:
                pipe.hdel(self.key, "current_job")
                pipe.hset(self.key, "state", WorkerStatus.IDLE)
            else:
                pipe.hset(self.key, "current_job", other)  # another slot's job: the worker is still busy
            self.execution.delete(job=job, pipeline=pipe)
            # Only if the hash is still this run's: a give-back or retry may have been published again (same job id)
            # before this pipeline ran, and that publication's hash must stay.
            # EVAL, not EVALSHA: a pipeline with a registered script asks SCRIPT EXISTS first, one more round trip.
            pipe.eval(DELETE_IF_OURS_SCRIPT, 2, job.key, job.execution_registry.key, self.name, started_text)
            pipe.execute()
        return other

    def _slot_ending(self) -> None:
        slot = getattr(self._local, "slot", None)
        if slot is not None:
            slot.ending = True

    def _other_running_job(self) -> str | None:
        """With slots: the job of another busy slot than this thread's (it becomes the worker's current job)."""
        mine = getattr(self._local, "slot", None)
        return next((slot.job_id for slot in self._slots if slot is not mine and slot.job_id and not slot.ending),
                    None)

    def set_current_job_id(self, job_id=None, pipeline=None):
        if job_id is None and self.slot_count > 1:
            other = self._other_running_job()  # rq's failure path clears it; another slot may still run one
            if other is not None:
                return super().set_current_job_id(other, pipeline)
        return super().set_current_job_id(job_id, pipeline)

    def set_state(self, state, pipeline=None):
        if self.slot_count > 1 and state == WorkerStatus.IDLE and self._other_running_job() is not None:
            return  # the worker stays busy while any slot runs a job
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
        except DatabaseDriverError:  # DatabaseError, and InterfaceError (a connection the driver has closed)
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
            self._keep_dead_letter(task_id, job, queue)
            return None
        execution.attempt_started(claimed)
        return claimed

    def _keep_dead_letter(self, task_id: int, job, queue) -> None:
        """A job whose task has failed for good was popped: rq's own ``rq requeue`` (or django-rq's requeue) took it
        out of the failed-job registry. Its task stays FAILED (a caption dead letter is requeued through the portal,
        which resets the task and republishes it), so the job goes back to the registry instead of vanishing from
        ``rq info``, ``rq_dead_letter_size`` and the dead-letter alert while the task is still dead."""
        try:
            error = execution.task_dead_letter_error(task_id)
            if error is None:
                return
            broker.job_dead_letter(task_id, queue.name, f"{error} (requeued with rq's own tools, which cannot run a "
                                                       f"caption dead letter again: use manage.py tasks requeue or "
                                                       f"the dead letters page)")
            self.log.warning("Worker %s: %s is a dead letter requeued outside the portal; filed again as failed "
                             "(use manage.py tasks requeue)", self.name, job.id)
        except Exception:
            self.log.warning("Worker %s: could not file %s again as a dead letter", self.name, job.id, exc_info=True)

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


class CaptionSlot:
    """One caption slot of a worker with several: a thread that runs the jobs the main thread hands it, one at a
    time, with its own database connection and its own ``queues.cancel`` scope."""

    def __init__(self, worker: CaptionWorker, index: int):
        self.worker, self.index = worker, index
        self.job_id: str | None = None
        self.since: float | None = None
        self.ending = False  # its job's outcome is being written: not the worker's current job any more
        self.scope = cancel.Scope()
        self.handed: tuple | None = None  # (job, queue) until the slot is done with it
        self._wake: queue_module.SimpleQueue = queue_module.SimpleQueue()  # a hand-over or close wakes the thread
        self._closed = False
        self.thread = threading.Thread(target=self._run, name=f"caption-slot-{index}", daemon=True)
        self.thread.start()

    @property
    def free(self) -> bool:
        return self.job_id is None and not self._closed and self.thread.is_alive()

    def take(self, job) -> None:
        """Called by the main thread, holding the worker's slot condition."""
        self.job_id, self.since, self.ending = job.id, time.time(), False
        self.scope.begin(job.id)

    def describe(self) -> dict:
        job_id, since = self.job_id, self.since
        return {"slot": self.index, "job": job_id, "since": since if job_id else None}

    def hand(self, job, queue) -> None:
        """Called by the main thread after ``take``: the slot thread runs the job."""
        self.handed = (job, queue)
        self._wake.put(True)

    def close(self) -> None:
        self._closed = True
        self._wake.put(True)

    def _run(self) -> None:
        """Runs what it is handed until it is closed. The job in hand stays in ``handed`` until ``_done``: an
        exception arriving late from rq's timer (``TimerDeathPenalty`` sets it on the thread, and it lands wherever
        the thread next runs Python) can neither end the thread nor lose the job; at worst the job is offered to
        ``_execute_one`` again, whose claim refuses a task already run."""
        worker = self.worker
        worker._local.slot = self
        cancel.make_slot_thread_scope(self.scope)
        try:
            while True:
                try:
                    if self.handed is None:
                        if self._closed:
                            return
                        self._wake.get()
                        continue
                    job, queue = self.handed
                    try:
                        worker._execute_one(job, queue)
                    except BaseException:  # also a timer's exception arriving late: a slot never dies of a job
                        worker.log.exception("Worker %s: slot %d: job %s failed outside its bookkeeping",
                                             worker.name, self.index, job.id)
                    self._done(job)
                except BaseException:  # noqa: S112 (a late asynchronous exception between two jobs)
                    worker.log.warning("Worker %s: slot %d: exception outside a job; the slot goes on",
                                       worker.name, self.index, exc_info=True)
                    continue
        finally:
            try:
                database_connection.close()  # this thread's own connection
            except Exception:
                pass

    def _done(self, job) -> None:
        worker = self.worker
        self.scope.end()
        worker._stopped_jobs.discard(job.id)
        with worker._slots_changed:
            self.job_id = self.since = self.handed = None
            self.ending = False
            worker._slots_changed.notify_all()


class SlotDeathPenalty(TimerDeathPenalty):
    """rq's time limit on a job, for a slot thread. When it runs out during the caption, the caption is stopped
    through the slot's scope (a blocked socket call returns at once; rq's own way, an exception set on the thread,
    waits until the thread runs Python again); otherwise it raises in the thread as rq does."""

    def __init__(self, timeout, exception=JobTimeoutException, **kwargs):
        super().__init__(timeout, exception, **kwargs)
        self._scope = cancel.current_slot_scope()

    def handle_death_penalty(self):
        if self._scope is not None and self._scope.stop(self._exception()):
            return
        super().handle_death_penalty()


# Deletes a finished job's hash and executions only while the hash is still the run that finished (status started,
# this worker, this start time): a job published again under the same id meanwhile keeps its hash.
DELETE_IF_OURS_SCRIPT = """
local fields = redis.call('HMGET', KEYS[1], 'status', 'worker_name', 'started_at')
if fields[1] == 'started' and fields[2] == ARGV[1] and fields[3] == ARGV[2] then
    return redis.call('DEL', KEYS[1], KEYS[2])
end
return 0
"""
