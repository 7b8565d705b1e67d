"""The database-polling worker (the old system, kept runnable): ``manage.py run_legacy_worker``.

It claims tasks dispatched to the database (``dispatch`` ``database``, or ``fallback`` while Redis is away) that are
queued and due, and runs each through the same attempt as an RQ worker (queues.execution.task_execute): the same
captioner, timeout, retries with backoff, dead letters, attempt rows, metrics and database lease. Nothing of it
touches Redis, so it works through a Redis outage.

The claim: on MySQL/MariaDB ``SELECT ... FOR UPDATE SKIP LOCKED`` picks one due row that no other poller is
claiming, then the conditional update QUEUED -> PROCESSING (expecting the dispatch it read) takes it. SQLite has no
row locks (a write locks the database); there the poller reads a few due candidates and takes the first whose
conditional update changes one row. Either way exactly one claimant wins, against other pollers and against a
migration moving the task to RQ at the same moment.

The poller registers as a ``LegacyWorker`` row and beats every couple of seconds (the database's clock); a beat also
renews the lease of the attempt in hand, which is what the reconciler trusts. Pollers also look after each other and
after the pause, since they may be all that runs (legacy mode with pollers only, the rollback's procedure; the
fallback, with Redis away): every few seconds a poller re-drives polled attempts whose lease ran out (their poller
died), with the reconciler's guards, and before claiming it ends a pause whose end time has passed and releases
tasks held with submission open (migration.dispatch.held_release). SIGTERM: finish the task in hand, then
exit; a second SIGTERM gives the attempt back (without using a retry) and exits. ``stop_requested`` on its row (the
migration's drain phase, the admin) has the effect of the first SIGTERM, ``stop_forced`` (the drain's timeout) that
of the second: the poller reads its row at every beat, so the drain reaches pollers on any host. A poller whose main
thread does not give the attempt back within FORCE_GRACE_SECONDS (stuck outside Python) kills itself; the drain then
re-drives its task once the heartbeat is stale, as for any dead worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.utils import timezone
from rq.timeouts import JobTimeoutException, TimerDeathPenalty, UnixSignalDeathPenalty

from migration.dispatch import held_release
from migration.models import LegacyWorker
from migration.state import blocking_run
from queues import broker, correlation, execution
from queues.broker import job_timeout
from queues.errors import BrokerUnavailable, WorkerInterrupted
from queues.execution import TaskFailed, task_execute
from queues.fleet.reconcile import REDRIVE_FIELDS, TASK_LEASE_SECONDS, task_redrive
from queues.models import (
    POLLED_DISPATCH,
    QUEUE_ORDER,
    AtMost,
    CaptionTask,
    TaskStatus,
    UtcNow,
    database_now,
    database_now_expression,
)

logger = logging.getLogger("migration.legacy")

BEAT_SECONDS = 2.0
FORCE_GRACE_SECONDS = 10.0
SQLITE_CANDIDATES = 8
RECOVER_EVERY = 5.0  # seconds between a poller's looks for polled attempts whose poller died
HOUSEKEEPING_EVERY = 1.0  # seconds between a poller's looks at the pause (held tasks, an expired end time)


def polled_attempts_recover(*, worker_name: str) -> list[int]:
    """Re-drives polled attempts (``database`` or ``fallback``) whose lease ran out: their poller died (SIGKILL, OOM,
    its host gone). The reconciler does this for every task, but it runs in ``runworkers`` and needs Redis; in legacy
    mode with pollers only, or during the fallback, the pollers must do it for each other. The reconciler's guards:
    the lease is judged on the database's clock, the re-drive is conditional on the attempt's claim token and on the
    lease still being expired, and refused if it runs more than a second after the judgement. RQ attempts are left
    to the reconciler. Returns the ids re-driven."""
    judged_at = database_now(connection)
    started = time.monotonic()
    lease_start = database_now_expression(-TASK_LEASE_SECONDS)
    expired = list(CaptionTask.objects.filter(status=TaskStatus.PROCESSING, dispatch__in=POLLED_DISPATCH,
                                              heartbeat_at__lt=lease_start).only(*REDRIVE_FIELDS)[:100])
    if time.monotonic() - started > 1.0:
        return []  # the database was slow: its pollers' renewals may be waiting too; judged on a later look
    redriven = []
    for task in expired:
        if task_redrive(task=task, reason=f"its poller {task.worker_name} stopped renewing the lease for over "
                                          f"{TASK_LEASE_SECONDS} s (seen by {worker_name})",
                        lease_expired_only=True, judged_at=judged_at):
            redriven.append(task.pk)
    return redriven


def task_claim_polled(*, worker_name: str) -> CaptionTask | None:
    """Claims one due task dispatched to the database, or returns None when there is none: the highest priority
    first (as RQ workers listen to urgent, high, normal, low), the longest due first within it.

    One dispatch and one priority per query, ordered as the (dispatch, status, priority, publish_after) index is: a
    seek, cheap when it finds nothing. With several values in one IN list MySQL sorts the rows instead, and
    ``FOR UPDATE`` would lock every due row it read, so the other pollers would skip them all and wait."""
    for priority, dispatch in ((priority, dispatch) for priority in QUEUE_ORDER for dispatch in POLLED_DISPATCH):
        due = CaptionTask.objects.filter(dispatch=dispatch, status=TaskStatus.QUEUED, priority=priority,
                                         publish_after__lte=timezone.now()).order_by("publish_after", "pk")
        if connection.features.has_select_for_update_skip_locked:
            with transaction.atomic():
                pk = due.select_for_update(skip_locked=True).values_list("pk", flat=True).first()
                task = _take(pk, dispatch, worker_name) if pk else None
        else:
            task = next((claimed for claimed in (_take(pk, dispatch, worker_name)
                                                 for pk in due.values_list("pk", flat=True)[:SQLITE_CANDIDATES])
                         if claimed is not None), None)
        if task is not None:
            return task
    return None


def _take(pk: int, dispatch: str, worker_name: str) -> CaptionTask | None:
    # Still due: another poller may have put the candidate back into a retry's backoff since it was read.
    return execution.task_claim_as(task_id=pk, worker_name=worker_name,
                                   expect={"status": TaskStatus.QUEUED, "dispatch": dispatch,
                                           "publish_after": AtMost(timezone.now())})


@dataclass
class PollerResult:
    processed: int = 0
    completed: int = 0
    failed: int = 0
    reason: str = ""


class LegacyPoller:
    def __init__(self, *, name: str | None = None, interval: float | None = None, fallback: bool = False):
        self.name = (name or f"poller.{socket.gethostname()[:120]}.{os.getpid()}.{uuid.uuid4().hex[:6]}")[:200]
        self.interval = settings.LEGACY_POLL_INTERVAL if interval is None else interval
        self.fallback = fallback
        self.stopping = False
        self.interrupted = False
        self._beat_stop = threading.Event()
        self._asked_checked_at = 0.0
        self._may_signal_itself = False  # the poller is this process' main loop (the command)
        self._forced_at: float | None = None
        self._in_task = False
        self._housekeeping_at = 0.0
        self._recovered_at: float | None = None  # monotonic time of this poller's last look that reached the database
        self.result = PollerResult()

    # --- signals ---------------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        self._may_signal_itself = True

    def _on_signal(self, signum, frame):
        if self.stopping and execution.captioning_now():
            self.interrupted = True
            raise WorkerInterrupted("the poller was told to stop at once")
        self.stopping = True
        logger.info("%s: stopping after the task in hand", self.name)

    # --- registration and heartbeat --------------------------------------------------------------------------
    def register(self) -> None:
        LegacyWorker.objects.update_or_create(name=self.name, defaults={
            "host": socket.gethostname()[:200], "pid": os.getpid(), "fallback": self.fallback,
            "started_at": timezone.now(), "heartbeat_at": timezone.now(), "stopped_at": None,
            "current_task_id": None, "stop_requested": False, "stop_forced": False})

    def _beat_loop(self) -> None:
        try:
            while not self._beat_stop.wait(BEAT_SECONDS):
                try:
                    execution.attempts_heartbeat()
                    asked, forced = LegacyWorker.objects.filter(name=self.name).values_list(
                        "stop_requested", "stop_forced").first() or (False, False)
                    if asked:
                        self.stopping = True
                    if forced:
                        self._force()
                    LegacyWorker.objects.filter(name=self.name).update(
                        heartbeat_at=UtcNow(), processed=self.result.processed, failed=self.result.failed)
                    self._recover()
                except Exception:  # the database is away: the next beat tries again
                    logger.warning("%s: heartbeat failed", self.name, exc_info=True)
                    self._recovered_at = None  # after an outage every lease looks expired: judge none at once
                    connection.close()
        finally:
            connection.close()  # this thread's own connection

    def _recover(self) -> None:
        """Every RECOVER_EVERY seconds, the attempts of dead pollers (``polled_attempts_recover``). As the
        reconciler, only on a look that follows one that reached the database shortly before: right after an outage
        every lease looks expired, and the other pollers' renewals are still on their way."""
        now = time.monotonic()
        previous = self._recovered_at
        if previous is not None and now - previous < RECOVER_EVERY:
            return
        self._recovered_at = now
        if previous is None or now - previous > 2 * RECOVER_EVERY + BEAT_SECONDS + 5:
            return
        redriven = polled_attempts_recover(worker_name=self.name)
        if redriven:
            logger.warning("%s: re-drove %d task(s) of pollers that stopped renewing their lease: %s", self.name,
                           len(redriven), redriven)

    def _force(self) -> None:
        """The drain's timeout ran out: give the attempt in hand back and exit, as a second SIGTERM does (the signal
        goes to the main thread whenever it is inside the captioner). Still inside the captioner
        FORCE_GRACE_SECONDS later: the main thread is stuck where no signal handler runs, so the process kills
        itself (only there: outside the captioner it is recording an outcome, which a kill could lose)."""
        self.stopping = True
        if self._forced_at is None:
            self._forced_at = time.monotonic()
            logger.warning("%s: told to stop at once (the migration's drain timeout ran out)", self.name)
        if not self._may_signal_itself or not self._in_task or not execution.captioning_now():
            return
        if time.monotonic() - self._forced_at > FORCE_GRACE_SECONDS:
            logger.error("%s: the caption in hand did not stop within %g s; killing this process (the drain gives "
                         "its task back once the lease has run out)", self.name, FORCE_GRACE_SECONDS)
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    # --- the loop ----------------------------------------------------------------------------------------------
    def work(self, *, burst: bool = False, max_tasks: int | None = None) -> PollerResult:
        self.register()
        LegacyWorker.objects.filter(name=self.name).update(heartbeat_at=UtcNow())
        beat = threading.Thread(target=self._beat_loop, name="poller-beat", daemon=True)
        beat.start()
        try:
            while not self.stopping and not self.interrupted:
                if max_tasks is not None and self.result.processed >= max_tasks:
                    self.result.reason = f"processed {max_tasks} task(s)"
                    break
                close_old_connections()
                try:
                    if self._stop_asked():
                        self.result.reason = self.result.reason or "asked to stop"
                        break
                    task = task_claim_polled(worker_name=self.name)
                except Exception:
                    logger.warning("%s: could not look for work (database away?)", self.name, exc_info=True)
                    connection.close()
                    self._sleep(max(self.interval, 1.0))
                    continue
                if task is None:
                    if burst:
                        self.result.reason = "nothing left to do"
                        break
                    self._sleep(self.interval)
                    continue
                self._run(task)
            else:
                self.result.reason = self.result.reason or "stopped"
        finally:
            self._beat_stop.set()
            beat.join(BEAT_SECONDS + 5)
            close_old_connections()
            LegacyWorker.objects.filter(name=self.name).update(stopped_at=timezone.now(), current_task_id=None,
                                                               processed=self.result.processed,
                                                               failed=self.result.failed)
        return self.result

    def _stop_asked(self) -> bool:
        """Whether the drain (or an admin) asked this poller to stop: read before claiming, at most every 0.5 s, so
        a poller told to stop claims nothing more. A poller started while a migration run has drained the pollers
        (by hand, by a restart policy) stops the same way."""
        now = time.monotonic()
        if now - self._asked_checked_at >= 0.5:
            self._asked_checked_at = now
            asked = LegacyWorker.objects.filter(name=self.name, stop_requested=True).exists()
            run = None if asked else blocking_run()
            if run is not None:
                logger.warning("%s: %s has drained the database pollers and not yet cut over to RQ; stopping. "
                               "Pollers run again once it is resumed to its end or rolled back "
                               "(manage.py migrate_to_rq resume, or rollback)", self.name, run)
                self.result.reason = f"{run} has drained the database pollers"
                asked = True
            self.stopping = self.stopping or asked
        if not self.stopping and now - self._housekeeping_at >= HOUSEKEEPING_EVERY:
            self._housekeeping_at = now
            try:
                held_release()  # no relay may run here (legacy mode, pollers only): a pause still ends
            except Exception:
                logger.warning("%s: could not release held tasks now", self.name, exc_info=True)
        return self.stopping

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.05, seconds))

    def _file_dead_letter(self, task: CaptionTask, error: TaskFailed) -> None:
        """Where an RQ worker's failed job goes to rq's failed-job registry, the poller files one the same way. With
        Redis away (the fallback) the dead letter is the FAILED row alone: the dead-letter counts miss it."""
        try:
            broker.job_dead_letter(task.pk, task.priority, f"{type(error).__name__}: {error}",
                                   correlation_id=task.correlation_id)
        except BrokerUnavailable as unavailable:
            logger.warning("%s: caption-%s failed for good; Redis is away (%s), so it is not in the failed-job "
                           "registry", self.name, task.pk, unavailable)

    def _run(self, task: CaptionTask) -> None:
        # Every line about the task, this poller's included, carries its correlation id, task, worker and queue.
        with correlation.bound(task.correlation_id or None, task_id=task.pk, worker=self.name, queue=task.priority):
            self._run_task(task)

    def _run_task(self, task: CaptionTask) -> None:
        LegacyWorker.objects.filter(name=self.name).update(current_task_id=task.pk)
        self._in_task = True
        try:
            outcome = self._attempt(task)
        finally:
            self._in_task = False
        self.result.processed += 1
        if outcome == "completed":
            self.result.completed += 1
        elif outcome == "failed":
            self.result.failed += 1
        LegacyWorker.objects.filter(name=self.name).update(current_task_id=None)

    def _attempt(self, task: CaptionTask) -> str:
        outcome = "failed"
        try:
            # The same backstop as rq's job timeout: the captioner enforces RQ_DEFAULT_TIMEOUT itself. SIGALRM works
            # only in the main thread (a poller run in a thread, as tests do, gets rq's timer instead).
            penalty = UnixSignalDeathPenalty if threading.current_thread() is threading.main_thread() \
                else TimerDeathPenalty
            with penalty(job_timeout(), JobTimeoutException, job_id=task.job_id):
                outcome = task_execute(task_id=task.pk, worker_name=self.name, claimed=task).status
        except TaskFailed as error:
            logger.warning("%s: %s", self.name, error)
            self._file_dead_letter(task, error)
        except WorkerInterrupted:
            outcome = "retry"
        return outcome
