"""Running one caption task inside a worker: claim, caption, then complete, retry or fail.

Every transition is a conditional update on the row's status (and attempt number), so a task completes at most
once however many copies of its job run, and a late worker cannot overwrite what a newer attempt recorded.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from rq.timeouts import JobTimeoutException

from queues.captioners import Captioner, get_captioner
from queues.errors import CaptionError, JobStopped
from queues.models import CaptionTask, TaskEvent, TaskStatus
from queues.signals import attempt_ended

logger = logging.getLogger(__name__)


_captioning = threading.Event()


def captioning_now() -> bool:
    """Whether this process is inside a captioner call (the only place an operator's stop may interrupt)."""
    return _captioning.is_set()


class TaskFailed(Exception):
    """Raised out of the job when a task has failed for good, so rq files the job in its failed-job registry
    (the dead-letter place) with this message."""


@dataclass(frozen=True)
class Outcome:
    status: str  # completed | retry | failed | skipped
    detail: str = ""

    def as_result(self) -> dict:
        return {"status": self.status, "detail": self.detail}


def retry_delay(attempt: int) -> float:
    """Exponential backoff: RQ_RETRY_BACKOFF seconds after the first attempt, doubling, capped."""
    return min(settings.RQ_RETRY_BACKOFF * (2 ** (attempt - 1)), settings.RQ_RETRY_BACKOFF_MAX)


def task_claim(*, task_id: int, worker_name: str, queue: str | None = None) -> CaptionTask | None:
    """QUEUED -> PROCESSING for exactly one claimant. Returns the claimed task, or None if someone else has it.

    ``queue``: the queue the job came from. A task whose priority was changed has its job published on the new
    queue; the entry left in the old one no longer matches the row's priority and claims nothing.

    The claim itself is recorded on the row (status, attempts, started_at, worker_name); the attempt's event row
    is written when it ends, with its duration, in the same transaction as its outcome. An attempt that never
    ends (its worker died) is recorded by whoever re-drives the task.
    """
    now = timezone.now()
    expect = {"status": TaskStatus.QUEUED, **({"priority": queue} if queue else {})}
    return CaptionTask.objects.transition(
        task_id, expect=expect, increment_attempts=True,
        changes={"status": TaskStatus.PROCESSING, "started_at": now, "finished_at": None,
                 "worker_name": worker_name[:200], "updated_at": now},
        returning=("image_ref", "priority", "attempts", "worker_name", "started_at", "published_at"),
    )


def task_execute(*, task_id: int, worker_name: str, queue: str | None = None,
                 captioner: Captioner | None = None) -> Outcome:
    task = task_claim(task_id=task_id, worker_name=worker_name, queue=queue)
    if task is None:
        status = CaptionTask.objects.filter(pk=task_id).values_list("status", flat=True).first()
        logger.info("caption-%s: nothing to do, task is %s", task_id, status or "gone")
        return Outcome("skipped", f"task is {status or 'gone'}")

    started = time.monotonic()
    try:
        try:
            _captioning.set()
            caption = (captioner or get_captioner()).caption(task.image_ref, timeout=settings.RQ_DEFAULT_TIMEOUT)
        finally:
            _captioning.clear()
    except JobStopped as error:
        return _record_failure(task, error, permanent=True, started=started)
    except CaptionError as error:
        return _record_failure(task, error, permanent=error.permanent, started=started)
    except JobTimeoutException as error:
        # rq's hard limit fired (the captioner overran its own timeout): worth another try.
        return _record_failure(task, error, permanent=False, started=started)
    except Exception as error:  # a bug or an unforeseen library error: retry, keeping the traceback
        logger.exception("caption-%s: unexpected error", task_id)
        return _record_failure(task, error, permanent=False, started=started)
    return _record_success(task, caption, started=started)


def _duration_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _announce(task: CaptionTask, outcome: str, started: float) -> None:
    wait = (task.started_at - task.published_at).total_seconds() if task.published_at and task.started_at else None
    attempt_ended.send(sender=CaptionTask, queue=task.priority, outcome=outcome,
                       processing_seconds=time.monotonic() - started, wait_seconds=max(wait, 0.0) if wait else wait)


def _end_attempt(task: CaptionTask, **changes) -> bool:
    """Records the attempt's outcome if the row is still in the state this attempt put it in (a reconciler may
    have re-driven the task meanwhile)."""
    return CaptionTask.objects.transition(
        task.pk, expect={"status": TaskStatus.PROCESSING, "attempts": task.attempts},
        changes={**changes, "updated_at": timezone.now()},
    )


def _record_success(task: CaptionTask, caption: str, *, started: float) -> Outcome:
    now = timezone.now()
    with transaction.atomic():
        updated = _end_attempt(task, status=TaskStatus.COMPLETED, caption=caption, finished_at=now,
                               last_error_class="", last_error_message="")
        if updated:
            TaskEvent.objects.create(task=task, kind=TaskEvent.Kind.COMPLETED, attempt=task.attempts, at=now,
                                     started_at=task.started_at, worker_name=task.worker_name,
                                     duration_ms=_duration_ms(started))
    if not updated:
        return Outcome("skipped", "a newer attempt owns the task")
    _announce(task, "completed", started)
    return Outcome("completed")


def _record_failure(task: CaptionTask, error: BaseException, *, permanent: bool, started: float) -> Outcome:
    now = timezone.now()
    error_class = type(error).__name__
    message = str(error) or error_class
    trace = "".join(traceback.format_exception(error))
    retry = not permanent and task.attempts <= settings.RQ_MAX_RETRIES
    with transaction.atomic():
        if retry:
            delay = retry_delay(task.attempts)
            updated = _end_attempt(task, status=TaskStatus.QUEUED, published_at=None,
                                   publish_after=now + timedelta(seconds=delay),
                                   last_error_class=error_class, last_error_message=message)
            detail = f"retry {task.attempts} of {settings.RQ_MAX_RETRIES} in {delay:g} s"
            kind = TaskEvent.Kind.RETRY_SCHEDULED
        else:
            updated = _end_attempt(task, status=TaskStatus.FAILED, finished_at=now, last_error_class=error_class,
                                   last_error_message=message)
            if isinstance(error, JobStopped):
                detail = "stopped by an operator"
            else:
                detail = "permanent error" if permanent else f"gave up after {task.attempts} attempts"
            kind = TaskEvent.Kind.FAILED
        if updated:
            TaskEvent.objects.create(
                task=task, kind=kind, attempt=task.attempts, at=now, started_at=task.started_at,
                worker_name=task.worker_name,
                duration_ms=_duration_ms(started), error_class=error_class, error_message=message,
                traceback=trace, detail=detail,
            )
    if not updated:
        return Outcome("skipped", "a newer attempt owns the task")
    _announce(task, "retry" if retry else "failed", started)
    logger.warning("caption-%s: %s: %s (%s)", task.pk, error_class, message, detail)
    if retry:
        return Outcome("retry", detail)
    raise TaskFailed(f"task {task.pk} failed ({detail}): {error_class}: {message}")
