"""Running one caption task inside a worker: claim, caption, then complete, retry or fail.

Every transition is a conditional update on the row's status and the attempt's claim token, so a task completes at
most once however many copies of its job run, and a late worker cannot overwrite what a newer attempt recorded
(even after a requeue has reset the attempt count).

While an attempt runs, the worker's liveness thread calls ``attempts_heartbeat`` every couple of seconds: it stamps
the row's ``heartbeat_at`` with the database's clock. The reconciler re-drives a PROCESSING task only when that
stamp is older than the lease, so a Redis restart, flush, failover or eviction (which removes every key a worker
keeps there) never hands a running task to a second worker.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from rq.timeouts import JobTimeoutException

from portal.db import insert_statement
from queues import cancel, correlation
from queues.captioners import Captioner, get_captioner
from queues.errors import CaptionerMisconfigured, CaptionError, JobStopped, WorkerInterrupted
from queues.models import DATABASE_NOW, NOT_NULL, CaptionTask, Dispatch, TaskEvent, TaskStatus
from queues.signals import attempt_ended

logger = logging.getLogger(__name__)


_captioning = threading.Event()


def captioning_now() -> bool:
    """Whether this process' main thread is inside a captioner call (the only place an operator's stop may
    interrupt a one-slot worker). Caption slot threads are stopped through their ``queues.cancel`` scope."""
    return _captioning.is_set()


_interrupt_next = threading.Event()


def interrupt_next_caption() -> None:
    """A one-slot worker told to stop at once between its pop and its caption: the caption about to start is given
    back instead of run. Called from the signal handler, which runs in the main thread between two of its bytecodes,
    so it comes either before ``_run_attempt`` reads this (the attempt is given back) or during the caption (the
    handler raises there instead). The worker exits after this attempt."""
    _interrupt_next.set()


# The attempts this process is running: task id -> claim token. Read by the liveness thread (attempts_heartbeat).
_in_flight: dict[int, str] = {}
_in_flight_lock = threading.Lock()


def attempts_in_flight() -> dict[int, str]:
    with _in_flight_lock:
        return dict(_in_flight)


def attempts_heartbeat() -> int:
    """Renews the lease of every attempt this process runs (one UPDATE each, on the database's clock).

    Called from the worker's liveness thread, which has its own database connection. Returns how many rows were
    renewed; a database error is logged and the connection dropped so the next beat reconnects.
    """
    renewed = 0
    try:
        for task_id, token in attempts_in_flight().items():
            renewed += CaptionTask.objects.transition(
                task_id, expect={"status": TaskStatus.PROCESSING, "claim_token": token},
                changes={"heartbeat_at": DATABASE_NOW})
    except Exception:  # DatabaseError, but also the driver's InterfaceError on a broken connection: never stop
        logger.warning("could not renew the lease of the running attempt(s)", exc_info=True)
        try:
            connection.close()
        except Exception:
            pass
    return renewed


class TaskFailed(Exception):
    """Raised out of the job when a task has failed for good, so rq files the job in its failed-job registry
    (the dead-letter place) with this message."""


@dataclass(frozen=True)
class Outcome:
    status: str  # completed | retry | failed | held | skipped
    detail: str = ""

    def as_result(self) -> dict:
        return {"status": self.status, "detail": self.detail}


def retry_delay(attempt: int) -> float:
    """Exponential backoff: RQ_RETRY_BACKOFF seconds after the first attempt, doubling, capped."""
    return min(settings.RQ_RETRY_BACKOFF * (2 ** (attempt - 1)), settings.RQ_RETRY_BACKOFF_MAX)


def task_claim(*, task_id: int, worker_name: str, queue: str | None = None) -> CaptionTask | None:
    """QUEUED -> PROCESSING for exactly one claimant. Returns the claimed task, or None if someone else has it.

    ``queue``: the queue the worker popped the job from. A task whose priority was changed has its job published on
    the new queue; the entry left in the old one no longer matches the row's priority and claims nothing.

    Only a task dispatched to RQ can be claimed here (the database poller claims its own, in migration.legacy), so
    a task moved between the systems runs in at most one of them. Only a published task can be claimed.
    Publication is what makes a task due (the relay publishes a retry only once its backoff is over), so a stale copy of a job (pushed twice, or left behind when the task went back to
    waiting for a retry or was unpublished by the reconciler) cannot start the task early.

    The claim itself is recorded on the row (status, attempts, started_at, worker_name); the attempt's event row
    is written when it ends, with its duration, in the same transaction as its outcome. An attempt that never
    ends (its worker died) is recorded by whoever re-drives the task.
    """
    expect = {"status": TaskStatus.QUEUED, "dispatch": Dispatch.RQ, "published_at": NOT_NULL,
              **({"priority": queue} if queue else {})}
    return task_claim_as(task_id=task_id, worker_name=worker_name, expect=expect)


def task_claim_as(*, task_id: int, worker_name: str, expect: dict) -> CaptionTask | None:
    """The claim itself, if the row has the values in ``expect``: RQ's (above) and the database poller's
    (migration.legacy) differ only in what they expect."""
    now = timezone.now()
    return CaptionTask.objects.transition(
        task_id, expect=expect, increment_attempts=True,
        changes={"status": TaskStatus.PROCESSING, "started_at": now, "finished_at": None,
                 "worker_name": worker_name[:200], "updated_at": now, "claim_token": uuid.uuid4().hex,
                 "heartbeat_at": DATABASE_NOW},
        returning=("image_ref", "priority", "attempts", "worker_name", "started_at", "published_at", "claim_token",
                   "correlation_id"),
    )


def task_dead_letter_error(task_id: int) -> str | None:
    """The last error of a task that has failed for good (a dead letter), or None if it has not."""
    row = CaptionTask.objects.filter(pk=task_id, status=TaskStatus.FAILED) \
        .values_list("last_error_class", "last_error_message").first()
    if row is None:
        return None
    return ": ".join(part for part in row if part) or "failed"


def task_execute(*, task_id: int, worker_name: str, queue: str | None = None,
                 captioner: Captioner | None = None, claimed: CaptionTask | None = None) -> Outcome:
    """Runs one attempt. ``claimed``: the task as the worker already claimed it (queues.fleet.worker claims before rq's
    own bookkeeping touches the job, so a refused claim leaves the job alone); otherwise it is claimed here."""
    task = claimed if claimed is not None and claimed.pk == task_id else \
        task_claim(task_id=task_id, worker_name=worker_name, queue=queue)
    if task is None:
        status = CaptionTask.objects.filter(pk=task_id).values_list("status", flat=True).first()
        logger.info("caption-%s: nothing to do, task is %s", task_id, status or "gone")
        return Outcome("skipped", f"task is {status or 'gone'}")

    started = time.monotonic()
    attempt_started(task)
    # The task's correlation id is current for the attempt: its log lines and its TaskEvent rows carry it.
    with correlation.bound(task.correlation_id or None, task_id=task.pk, worker=worker_name, queue=queue):
        try:
            return _run_attempt(task, captioner, started)
        finally:
            attempt_finished(task)


def attempt_started(task: CaptionTask) -> None:
    """From the claim on, the liveness thread renews this attempt's lease."""
    with _in_flight_lock:
        _in_flight[task.pk] = task.claim_token


def attempt_finished(task: CaptionTask) -> None:
    """Only this attempt's entry goes: another slot of this process may hold a newer attempt of the same task (this
    one's lease lapsed and the task was run again), whose lease must go on being renewed."""
    with _in_flight_lock:
        if _in_flight.get(task.pk) == task.claim_token:
            del _in_flight[task.pk]


def _run_attempt(task: CaptionTask, captioner: Captioner | None, started: float) -> Outcome:
    scope = cancel.current_slot_scope()  # a worker's caption slot thread: stopped through its scope
    error: BaseException | None = None
    try:
        if scope is None:
            # The main thread (a one-slot worker): stopped by a signal whose handler raises during the caption.
            try:
                _captioning.set()
                if _interrupt_next.is_set():
                    _interrupt_next.clear()
                    raise WorkerInterrupted("the worker was told to stop at once")
                caption = (captioner or get_captioner()).caption(task.image_ref, timeout=settings.RQ_DEFAULT_TIMEOUT)
            finally:
                _captioning.clear()
        else:
            with scope:
                if scope.reason is None:  # not stopped before it began
                    caption = (captioner or get_captioner()).caption(task.image_ref,
                                                                     timeout=settings.RQ_DEFAULT_TIMEOUT)
    except BaseException as raised:
        error = raised
    if scope is not None and scope.reason is not None:
        error = scope.reason  # the stop, not what the captioner raised when its connection was shut down
    if error is None:
        return _record_success(task, caption, started=started)
    if isinstance(error, WorkerInterrupted):
        # The worker was told to stop at once (a second stop signal): the attempt is given back and the job ends
        # normally, so rq files no dead letter and the worker exits after it.
        return _give_back(task, error, started)
    if isinstance(error, Exception):
        return _caption_error(task, error, started)
    # SystemExit, KeyboardInterrupt: the process is going away. Give the attempt back first, so the row never
    # stays PROCESSING behind a worker that exited.
    try:
        _give_back(task, error, started)
    except Exception:
        logger.exception("caption-%s: could not give the interrupted attempt back", task.pk)
    raise error


def _caption_error(task: CaptionTask, error: Exception, started: float) -> Outcome:
    if isinstance(error, CaptionerMisconfigured):
        return _hold(task, error, started)
    if isinstance(error, JobStopped):
        return _record_failure(task, error, permanent=True, started=started)
    if isinstance(error, CaptionError):
        return _record_failure(task, error, permanent=error.permanent, started=started)
    if isinstance(error, JobTimeoutException):
        # rq's hard limit fired (the captioner overran its own timeout): worth another try.
        return _record_failure(task, error, permanent=False, started=started)
    # A bug or an unforeseen library error: retry, keeping the traceback.
    logger.exception("caption-%s: unexpected error", task.pk)
    return _record_failure(task, error, permanent=False, started=started)


def _duration_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _announce(task: CaptionTask, outcome: str, started: float, *, error_class: str = "") -> None:
    wait = (task.started_at - task.published_at).total_seconds() if task.published_at and task.started_at else None
    attempt_ended.send(sender=CaptionTask, queue=task.priority, outcome=outcome,
                       processing_seconds=time.monotonic() - started, wait_seconds=max(wait, 0.0) if wait else wait,
                       error_class=error_class)


def _record_end(task: CaptionTask, changes: dict, event: TaskEvent) -> bool:
    """Records the attempt's outcome and its event row in one transaction, if the row is still in the state this
    attempt put it in (a reconciler may have re-driven the task meanwhile, or an operator requeued it and a newer
    attempt runs). Both statements are compiled before the transaction begins: on SQLite it holds the writers' lock
    (portal/sqlite3) from its BEGIN, and other workers wait for it."""
    update = CaptionTask.objects.transition_statement(
        task.pk, expect={"status": TaskStatus.PROCESSING, "claim_token": task.claim_token},
        changes={**changes, "updated_at": timezone.now()})
    insert = insert_statement(event)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(*update)
        if cursor.rowcount != 1:
            return False
        cursor.execute(*insert)
        return True


def _record_success(task: CaptionTask, caption: str, *, started: float) -> Outcome:
    now = timezone.now()
    updated = _record_end(
        task, {"status": TaskStatus.COMPLETED, "caption": caption, "finished_at": now, "last_error_class": "",
               "last_error_message": ""},
        TaskEvent(task=task, kind=TaskEvent.Kind.COMPLETED, attempt=task.attempts, at=now, started_at=task.started_at,
                  worker_name=task.worker_name, duration_ms=_duration_ms(started)))
    if not updated:
        return Outcome("skipped", "a newer attempt owns the task")
    _announce(task, "completed", started)
    from queues import broker

    broker.captioner_problem_over()
    return Outcome("completed")


HOLD_SECONDS = 60


def _give_back(task: CaptionTask, error: BaseException, started: float) -> Outcome:
    """The worker stopped in the middle of the attempt (not the task's fault): the task goes back to its queue at
    once, without using a retry, so even a task on its last attempt is never dead-lettered by a stop."""
    now = timezone.now()
    updated = _record_end(
        task, {"status": TaskStatus.QUEUED, "published_at": None, "attempts": task.attempts - 1, "publish_after": now},
        TaskEvent(task=task, kind=TaskEvent.Kind.RETRY_SCHEDULED, attempt=task.attempts, at=now,
                  started_at=task.started_at, worker_name=task.worker_name, duration_ms=_duration_ms(started),
                  error_class=type(error).__name__, error_message=str(error) or type(error).__name__,
                  detail="the worker was stopped during the attempt; given back without using a retry"))
    return Outcome("retry" if updated else "skipped", "given back: the worker was stopped")


def _hold(task: CaptionTask, error: CaptionerMisconfigured, started: float) -> Outcome:
    """Gives the task back without using an attempt: it waits ``HOLD_SECONDS`` and is tried again, until the
    captioner is fixed. The problem is reported for health and the admin; while it is, the relay publishes one held
    task per pass as a probe instead of the whole backlog (queues.services.tasks_relay_once)."""
    from queues import broker

    now = timezone.now()
    message = str(error)
    updated = _record_end(
        task, {"status": TaskStatus.QUEUED, "published_at": None, "attempts": task.attempts - 1,
               "publish_after": now + timedelta(seconds=HOLD_SECONDS), "last_error_class": type(error).__name__,
               "last_error_message": message},
        TaskEvent(task=task, kind=TaskEvent.Kind.HELD, attempt=task.attempts, at=now, started_at=task.started_at,
                  worker_name=task.worker_name, duration_ms=_duration_ms(started), error_class=type(error).__name__,
                  error_message=message, detail=f"held; tried again in {HOLD_SECONDS} s"))
    broker.captioner_problem_report(message)
    logger.error("caption-%s held: %s", task.pk, message)
    return Outcome("held" if updated else "skipped", message)


def _record_failure(task: CaptionTask, error: BaseException, *, permanent: bool, started: float) -> Outcome:
    now = timezone.now()
    error_class = type(error).__name__
    message = str(error) or error_class
    trace = "".join(traceback.format_exception(error))
    retry = not permanent and task.attempts <= settings.RQ_MAX_RETRIES
    if retry:
        delay = retry_delay(task.attempts)
        changes = {"status": TaskStatus.QUEUED, "published_at": None, "publish_after": now + timedelta(seconds=delay)}
        detail = f"retry {task.attempts} of {settings.RQ_MAX_RETRIES} in {delay:g} s"
        kind = TaskEvent.Kind.RETRY_SCHEDULED
    else:
        changes = {"status": TaskStatus.FAILED, "finished_at": now}
        if isinstance(error, JobStopped):
            detail = "stopped by an operator"
        else:
            detail = "permanent error" if permanent else f"gave up after {task.attempts} attempts"
        kind = TaskEvent.Kind.FAILED
    updated = _record_end(
        task, {**changes, "last_error_class": error_class, "last_error_message": message},
        TaskEvent(task=task, kind=kind, attempt=task.attempts, at=now, started_at=task.started_at,
                  worker_name=task.worker_name, duration_ms=_duration_ms(started), error_class=error_class,
                  error_message=message, traceback=trace, detail=detail))
    if not updated:
        return Outcome("skipped", "a newer attempt owns the task")
    _announce(task, "retry" if retry else "failed", started, error_class=error_class)
    logger.warning("caption-%s: %s: %s (%s)", task.pk, error_class, message, detail)
    if retry:
        return Outcome("retry", detail)
    raise TaskFailed(f"task {task.pk} failed ({detail}): {error_class}: {message}")
