"""Bringing Redis back in line with the database after crashes and data loss.

Two repairs, safe to run from any number of processes at once (every change is a conditional update, and
publication is claimed per row):

- A ``PROCESSING`` task whose worker is gone (its liveness key expired, or its supervisor saw it die) is re-driven:
  back to ``QUEUED`` after the retry backoff, or ``FAILED`` into the dead letters once the task has used its retries
  (a task that kills its worker every time must not crash-loop the fleet).
- A ``QUEUED``, published task whose job is no longer in Redis (Redis lost data; or a worker popped the job and died
  before claiming it) is published again. Finding those compares, per queue, the number of such tasks with the
  queue's length; only when the database expects more than Redis holds is the queue listed, in pages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from queues import broker
from queues.execution import retry_delay
from queues.models import CaptionTask, FleetEvent, TaskEvent, TaskStatus
from queues.services import tasks_publish
from queues.signals import attempt_ended

logger = logging.getLogger(__name__)

# A claimed task younger than this is not judged: its worker may not have written its first liveness key yet.
PROCESSING_GRACE = timedelta(seconds=5)
# A published task younger than this is not judged: its job may be between BLPOP and the claim right now.
PUBLISHED_GRACE = timedelta(seconds=30)
LIST_PAGE = 1000


@dataclass
class ReconcileResult:
    redriven: list[int] = field(default_factory=list)
    dead_lettered: list[int] = field(default_factory=list)
    republished: list[int] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.redriven or self.dead_lettered or self.republished)


def task_redrive(*, task: CaptionTask, reason: str, result: ReconcileResult | None = None) -> bool:
    """Ends a ``PROCESSING`` attempt whose worker is gone. Returns False if the attempt had already ended."""
    now = timezone.now()
    exhausted = task.attempts > settings.RQ_MAX_RETRIES
    message = f"worker {task.worker_name or '?'} stopped while running the task ({reason})"
    with transaction.atomic():
        if exhausted:
            changed = CaptionTask.objects.transition(
                task.pk, expect={"status": TaskStatus.PROCESSING, "attempts": task.attempts},
                changes={"status": TaskStatus.FAILED, "finished_at": now, "last_error_class": "WorkerLost",
                         "last_error_message": message, "updated_at": now})
            detail = f"worker lost on attempt {task.attempts}; no retries left"
        else:
            delay = retry_delay(task.attempts)
            changed = CaptionTask.objects.transition(
                task.pk, expect={"status": TaskStatus.PROCESSING, "attempts": task.attempts},
                changes={"status": TaskStatus.QUEUED, "published_at": None,
                         "publish_after": now + timedelta(seconds=delay), "last_error_class": "WorkerLost",
                         "last_error_message": message, "updated_at": now})
            detail = f"worker lost; retry {task.attempts} of {settings.RQ_MAX_RETRIES} in {delay:g} s"
        if changed:
            duration = int((now - task.started_at).total_seconds() * 1000) if task.started_at else None
            TaskEvent.objects.create(
                task_id=task.pk, kind=TaskEvent.Kind.FAILED if exhausted else TaskEvent.Kind.WORKER_LOST,
                attempt=task.attempts, at=now, started_at=task.started_at, worker_name=task.worker_name,
                duration_ms=duration, error_class="WorkerLost", error_message=message, detail=detail,
            )
    if not changed:
        return False
    try:
        broker.job_forget_execution(task.pk, task.priority)
        if exhausted:
            broker.job_dead_letter(task.pk, task.priority, f"WorkerLost: {message}")
    except (broker.BrokerUnavailable, *broker.UNAVAILABLE_ERRORS):
        logger.warning("task %s re-driven, but Redis could not be tidied now", task.pk)
    attempt_ended.send(sender=CaptionTask, queue=task.priority, outcome="failed" if exhausted else "worker_lost",
                       processing_seconds=None, wait_seconds=None)
    if result is not None:
        (result.dead_lettered if exhausted else result.redriven).append(task.pk)
    logger.warning("task %s: %s", task.pk, detail)
    return True


def tasks_recover_from_worker(*, worker_name: str, reason: str) -> ReconcileResult:
    """Re-drives the tasks a known-dead worker was running (the supervisor calls this when its child dies)."""
    result = ReconcileResult()
    fields = ("pk", "priority", "attempts", "worker_name", "started_at")
    for task in CaptionTask.objects.filter(status=TaskStatus.PROCESSING, worker_name=worker_name).only(*fields):
        task_redrive(task=task, reason=reason, result=result)
    return result


def tasks_reconcile(*, now=None) -> ReconcileResult:
    """One full repair pass (see the module docstring). Raises BrokerUnavailable if Redis is unreachable."""
    now = now or timezone.now()
    result = ReconcileResult()
    _redrive_orphans(now, result)
    _republish_lost(now, result)
    if result.changed:
        FleetEvent.objects.create(
            kind=FleetEvent.Kind.TASKS_RECOVERED, reason="reconciler",
            figures={"redriven": len(result.redriven), "dead_lettered": len(result.dead_lettered),
                     "republished": len(result.republished)},
        )
    return result


def _redrive_orphans(now, result: ReconcileResult) -> None:
    # PROCESSING rows are bounded by the number of workers (each runs one task at a time).
    processing = list(CaptionTask.objects.filter(status=TaskStatus.PROCESSING, started_at__lt=now - PROCESSING_GRACE)
                      .only("pk", "priority", "attempts", "worker_name", "started_at")[:10_000])
    if not processing:
        return
    alive = broker.alive_states(sorted({task.worker_name for task in processing}))
    for task in processing:
        state = alive.get(task.worker_name)
        if state is None:
            task_redrive(task=task, reason="its liveness key expired", result=result)
        elif state.get("job") != task.job_id:
            # The worker lives but has moved on: the attempt ended without its outcome being recorded (the
            # database failed at that moment, say). Its liveness key names its current job every 2 s.
            task_redrive(task=task, reason="its worker is no longer running it", result=result)


def _republish_lost(now, result: ReconcileResult) -> None:
    published = dict(CaptionTask.objects.filter(status=TaskStatus.QUEUED, published_at__isnull=False)
                     .order_by().values_list("priority").annotate(count=Count("id")))
    if not published:
        return
    lengths = broker.queue_lengths()
    for queue_name, expected in published.items():
        if expected <= lengths.get(queue_name, 0):
            continue
        candidates = _lost_among(queue_name, broker.queued_task_ids(queue_name, page=LIST_PAGE), now)
        if not candidates:
            continue
        # Unpublish (conditionally: only rows still queued and published) and publish again through the claim.
        with transaction.atomic():
            CaptionTask.objects.filter(pk__in=candidates, status=TaskStatus.QUEUED, published_at__isnull=False) \
                .update(published_at=None)
            TaskEvent.objects.bulk_create([TaskEvent(task_id=pk, kind=TaskEvent.Kind.REPUBLISHED, at=now,
                                                     detail=f"job missing from queue {queue_name}")
                                           for pk in candidates])
        tasks_publish(tasks=[(pk, queue_name) for pk in candidates])
        result.republished.extend(candidates)


def _lost_among(queue_name: str, in_queue: set[int], now) -> list[int]:
    """Queued-and-published tasks of a queue whose ids are not in it, read from the database in id order."""
    lost, last = [], 0
    while len(lost) < 10_000:
        page = list(CaptionTask.objects.filter(
            status=TaskStatus.QUEUED, published_at__isnull=False, published_at__lt=now - PUBLISHED_GRACE,
            priority=queue_name, pk__gt=last).order_by("pk").values_list("pk", flat=True)[:LIST_PAGE])
        if not page:
            break
        lost.extend(pk for pk in page if pk not in in_queue)
        last = page[-1]
    return lost
