"""Operator actions on tasks and queues: requeue, cancel, change priority, retry now, empty, pause, maintenance.

Each bulk action works in batches of 1,000: the eligible rows are locked and changed in one transaction with a
``TaskEvent`` per task (with the operator), and after commit the batch's jobs are published with one pipeline.
Tasks in a state the action does not apply to are refused and counted, never changed. Large selections run as a
``BulkOperation`` in the background (``queues.jobs.bulk_operation``) with progress on its row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from queues import broker
from queues.fleet import audit
from queues.models import BulkOperation, CaptionTask, Priority, TaskEvent, TaskStatus
from queues.services import tasks_publish

BATCH = 1000
# Selections larger than this run in the background, so no request waits on them.
INLINE_LIMIT = 2000

REQUEUEABLE = (TaskStatus.FAILED, TaskStatus.CANCELLED)
WHY_NOT = {
    "requeue": "only failed or cancelled tasks can be requeued",
    "cancel": "only queued tasks can be cancelled",
    "priority": "only queued tasks can change priority",
    "retry_now": "only tasks waiting to retry can be brought forward",
}


@dataclass
class BulkResult:
    action: str
    changed: int = 0
    refused: Counter = field(default_factory=Counter)

    @property
    def refused_count(self) -> int:
        return sum(self.refused.values())

    def describe(self) -> str:
        verbs = {"requeue": "Requeued", "cancel": "Cancelled", "priority": "Moved", "retry_now": "Brought forward"}
        text = f"{verbs[self.action]} {self.changed} task(s)."
        if self.refused:
            parts = ", ".join(f"{count} {status.lower()}" for status, count in sorted(self.refused.items()))
            text += f" Refused {self.refused_count} ({parts}): {WHY_NOT[self.action]}."
        return text


def _chunks(ids: list[int]) -> Iterable[list[int]]:
    for start in range(0, len(ids), BATCH):
        yield ids[start:start + BATCH]


def _run(action: str, task_ids: Iterable[int], change: Callable, *, user, address, on_batch, detail=None
         ) -> BulkResult:
    ids = sorted(set(int(task_id) for task_id in task_ids))
    result = BulkResult(action)
    for batch in _chunks(ids):
        with transaction.atomic():
            rows = list(CaptionTask.objects.select_for_update().filter(pk__in=batch)
                        .values_list("pk", "status", "priority", "published_at", "publish_after"))
            to_publish = change(rows, result, user)
        if to_publish:
            tasks_publish(tasks=to_publish)
        if on_batch:
            on_batch(len(batch), result)
    audit(user=user, action=f"tasks_{action}", target=f"{len(ids)} selected task(s)", count=result.changed,
          detail={"refused": dict(result.refused), **(detail or {})}, address=address)
    return result


def _events(pks, kind, user, detail, now):
    TaskEvent.objects.bulk_create([TaskEvent(task_id=pk, kind=kind, at=now, actor=user if getattr(user, "pk", None)
                                             else None, detail=detail) for pk in pks])


def tasks_requeue(*, task_ids: Iterable[int], user=None, address=None, on_batch=None) -> BulkResult:
    """Failed or cancelled tasks back to QUEUED with a fresh retry count, published at once."""

    def change(rows, result, user):
        now = timezone.now()
        eligible = [(pk, priority) for pk, status, priority, *_ in rows if status in REQUEUEABLE]
        result.refused.update(status for _, status, *_ in rows if status not in REQUEUEABLE)
        if not eligible:
            return []
        pks = [pk for pk, _ in eligible]
        CaptionTask.objects.filter(pk__in=pks, status__in=REQUEUEABLE).update(
            status=TaskStatus.QUEUED, attempts=0, published_at=None, publish_after=now, started_at=None,
            finished_at=None, last_error_class="", last_error_message="", updated_at=now)
        _events(pks, TaskEvent.Kind.REQUEUED, user, "requeued; retry count reset", now)
        result.changed += len(pks)
        transaction.on_commit(lambda: broker.dead_letters_forget(eligible))
        return eligible

    return _run("requeue", task_ids, change, user=user, address=address, on_batch=on_batch)


def tasks_cancel(*, task_ids: Iterable[int], user=None, address=None, on_batch=None, detail: str = "cancelled"
                 ) -> BulkResult:
    """Queued tasks (waiting to run or to retry) to CANCELLED; their jobs are dropped from Redis."""

    def change(rows, result, user):
        now = timezone.now()
        pks = [pk for pk, status, *_ in rows if status == TaskStatus.QUEUED]
        result.refused.update(status for _, status, *_ in rows if status != TaskStatus.QUEUED)
        if pks:
            CaptionTask.objects.filter(pk__in=pks, status=TaskStatus.QUEUED).update(
                status=TaskStatus.CANCELLED, finished_at=now, updated_at=now)
            _events(pks, TaskEvent.Kind.CANCELLED, user, detail, now)
            result.changed += len(pks)
            # A worker that still pops one of these finds no job (or a row it cannot claim) and moves on.
            transaction.on_commit(lambda: broker.jobs_delete(pks))
        return []

    return _run("cancel", task_ids, change, user=user, address=address, on_batch=on_batch)


def tasks_change_priority(*, task_ids: Iterable[int], priority: str, user=None, address=None, on_batch=None
                          ) -> BulkResult:
    """Moves queued tasks to another priority queue. The job is published on the new queue after the row changes;
    the entry left in the old queue no longer matches the row's priority, so the task runs once, from the new one."""
    if priority not in Priority.values:
        raise ValueError(f"Unknown priority {priority!r}: choose one of {', '.join(Priority.values)}")

    def change(rows, result, user):
        now = timezone.now()
        queued = [(pk, old, published) for pk, status, old, published, _ in rows if status == TaskStatus.QUEUED]
        result.refused.update(status for _, status, *_ in rows if status != TaskStatus.QUEUED)
        moving = [(pk, old, published) for pk, old, published in queued if old != priority]
        if not moving:
            return []
        published = [pk for pk, _, was_published in moving if was_published]
        waiting = [pk for pk, _, was_published in moving if not was_published]
        if published:
            CaptionTask.objects.filter(pk__in=published, status=TaskStatus.QUEUED).update(
                priority=priority, published_at=None, publish_after=now, updated_at=now)
        if waiting:  # waiting to retry: the relay publishes them on the new queue when due
            CaptionTask.objects.filter(pk__in=waiting, status=TaskStatus.QUEUED).update(
                priority=priority, updated_at=now)
        TaskEvent.objects.bulk_create([
            TaskEvent(task_id=pk, kind=TaskEvent.Kind.PRIORITY_CHANGED, at=now, detail=f"{old} -> {priority}",
                      actor=user if getattr(user, "pk", None) else None) for pk, old, _ in moving])
        result.changed += len(moving)
        return [(pk, priority) for pk in published]

    return _run("priority", task_ids, change, user=user, address=address, on_batch=on_batch,
                detail={"priority": priority})


def tasks_retry_now(*, task_ids: Iterable[int], user=None, address=None, on_batch=None) -> BulkResult:
    """Tasks waiting out a retry backoff are published now."""

    def change(rows, result, user):
        now = timezone.now()
        eligible = [(pk, priority) for pk, status, priority, published, after in rows
                    if status == TaskStatus.QUEUED and published is None and after > now]
        eligible_ids = {pk for pk, _ in eligible}
        result.refused.update(("WAITING" if status == TaskStatus.QUEUED and pk not in eligible_ids else status)
                              for pk, status, *_ in rows if pk not in eligible_ids)
        if not eligible:
            return []
        pks = [pk for pk, _ in eligible]
        CaptionTask.objects.filter(pk__in=pks, status=TaskStatus.QUEUED, published_at__isnull=True).update(
            publish_after=now, updated_at=now)
        _events(pks, TaskEvent.Kind.RETRY_NOW, user, "backoff skipped", now)
        result.changed += len(pks)
        return eligible

    return _run("retry_now", task_ids, change, user=user, address=address, on_batch=on_batch)


ACTIONS = {
    BulkOperation.Kind.REQUEUE: tasks_requeue,
    BulkOperation.Kind.CANCEL: tasks_cancel,
    BulkOperation.Kind.PRIORITY: tasks_change_priority,
    BulkOperation.Kind.RETRY_NOW: tasks_retry_now,
}


def bulk_operation_start(*, kind: str, task_ids: list[int], params: dict | None = None, user=None,
                         address=None) -> BulkOperation:
    """Records a large action and hands it to a worker (urgent queue). Raises BrokerUnavailable without Redis."""
    operation = BulkOperation.objects.create(
        kind=kind, task_ids=",".join(str(task_id) for task_id in sorted(set(task_ids))), params=params or {},
        total=len(set(task_ids)), user=user if getattr(user, "pk", None) else None, address=address)
    try:
        broker.enqueue_bulk_operation(operation.pk)
    except broker.BrokerUnavailable:
        operation.state, operation.message = BulkOperation.State.FAILED, "Redis was unreachable; nothing was done"
        operation.save(update_fields=["state", "message"])
        raise
    return operation


def bulk_operation_run(*, operation_id: int) -> BulkOperation:
    operation = BulkOperation.objects.get(pk=operation_id)
    if BulkOperation.objects.filter(pk=operation_id, state=BulkOperation.State.PENDING).update(
            state=BulkOperation.State.RUNNING) != 1:
        return operation  # already run (a duplicate job)

    def progress(count, result):
        BulkOperation.objects.filter(pk=operation_id).update(
            processed=F("processed") + count, changed=result.changed, refused=result.refused_count)

    try:
        result = ACTIONS[operation.kind](task_ids=operation.ids(), user=operation.user, address=operation.address,
                                         on_batch=progress, **operation.params)
    except Exception as error:
        BulkOperation.objects.filter(pk=operation_id).update(
            state=BulkOperation.State.FAILED, message=f"{type(error).__name__}: {error}",
            finished_at=timezone.now())
        raise
    BulkOperation.objects.filter(pk=operation_id).update(
        state=BulkOperation.State.DONE, message=result.describe(), changed=result.changed,
        refused=result.refused_count, processed=operation.total, finished_at=timezone.now())
    operation.refresh_from_db()
    return operation


def queue_empty(*, queue_name: str, confirm: str, user=None, address=None) -> BulkResult:
    """Cancels every queued task of a queue and drops its jobs. ``confirm`` must repeat the queue's name."""
    if queue_name not in broker.QUEUE_NAMES:
        raise ValueError(f"Unknown queue {queue_name!r}")
    if confirm.strip() != queue_name:
        raise ValueError(f"Type the queue's name ({queue_name}) to confirm emptying it")
    broker.queue_drop(queue_name)  # workers stop finding its jobs at once
    ids = list(CaptionTask.objects.filter(status=TaskStatus.QUEUED, priority=queue_name)
               .values_list("pk", flat=True))
    result = tasks_cancel(task_ids=ids, user=user, address=address, detail=f"queue {queue_name} emptied")
    audit(user=user, action="queue_empty", target=queue_name, count=result.changed, address=address)
    return result


def queue_set_paused(*, queue_name: str, paused: bool, user=None, address=None) -> None:
    """Paused queues keep their tasks; workers take nothing from them until resumed (within about a second)."""
    broker.set_queue_paused(queue_name, paused)
    audit(user=user, action="queue_pause" if paused else "queue_resume", target=queue_name, address=address)


def queues_maintenance(*, user=None, address=None) -> dict:
    """rq's registry cleanup for every queue, as an explicit action (reading pages never does it)."""
    cleaned = broker.registries_clean()
    audit(user=user, action="queue_maintenance", target="all queues", detail=cleaned, address=address)
    return cleaned


def tasks_cleanup(*, cutoff, dry_run: bool = False, on_batch=None) -> dict:
    """Deletes completed and cancelled tasks that finished before ``cutoff`` (with their events), 1,000 rows per
    statement, and the finished jobs in Redis that ended before it. Failed tasks stay: they are dead letters."""
    old = CaptionTask.objects.filter(status__in=[TaskStatus.COMPLETED, TaskStatus.CANCELLED],
                                     finished_at__lt=cutoff)
    if dry_run:
        return {"rows": old.count(), "jobs": broker.finished_jobs_cleanup(cutoff=cutoff, dry_run=True)}
    rows = 0
    while True:
        batch = list(old.order_by("pk").values_list("pk", flat=True)[:BATCH])
        if not batch:
            break
        with transaction.atomic():
            TaskEvent.objects.filter(task_id__in=batch).delete()
            CaptionTask.objects.filter(pk__in=batch).delete()
        rows += len(batch)
        if on_batch:
            on_batch(len(batch))
    jobs = broker.finished_jobs_cleanup(cutoff=cutoff, on_batch=on_batch)
    return {"rows": rows, "jobs": jobs}
