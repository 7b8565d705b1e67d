"""Operator actions on tasks and queues: requeue, cancel, change priority, retry now, empty, pause, maintenance.

Each bulk action works in batches of 1,000: the eligible rows are locked and changed in one transaction with a
``TaskEvent`` per task (with the operator), and after commit the batch's jobs are published with one pipeline.
Tasks in a state the action does not apply to are refused and counted, never changed.

Large selections run as a ``BulkOperation`` in the background (``queues.jobs.bulk_operation``), with progress on its
row. What it acts on is stored as either the ids an operator selected or, for "every task matching the filter" and
for emptying a queue, a JSON description of the queryset's filter (``selection_describe``), limited to the tasks the
action applies to and to ids that existed when it was confirmed, and re-evaluated batch by batch at run time. Each
batch commits together with the operation's checkpoint (the last task id done) and a heartbeat on the database's
clock, so a run that dies (its worker killed) is continued from the checkpoint by ``bulk_operations_recover`` (the
reconciler calls it): the actions refuse tasks no longer eligible, so a batch run again never changes a task twice.

Emptying a queue cancels the rows first and drops the Redis list only after all are cancelled (see ``queue_empty``).
"""

from __future__ import annotations

import datetime
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

from django.db import transaction
from django.db.models import Count, DateTimeField, ExpressionWrapper, F, Max, Q, QuerySet
from django.db.models.expressions import Col
from django.db.models.lookups import Lookup
from django.db.models.sql.where import WhereNode
from django.utils import timezone

from queues import broker, correlation
from queues.audit import audit
from queues.dispatch import get_policy
from queues.errors import BrokerUnavailable
from queues import control
from queues.models import BulkOperation, CaptionTask, Priority, TaskEvent, TaskStatus, UtcNow
from queues.services import tasks_publish

BATCH = 1000
# Selections larger than this run in the background, so no request waits on them.
INLINE_LIMIT = 2000

REQUEUEABLE = (TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.DISCARDED)
WHY_NOT = {
    "requeue": "only failed, discarded or cancelled tasks can be requeued",
    "discard": "only failed tasks (dead letters) can be discarded, once their worker has filed them (a moment "
               "after they fail)",
    "cancel": "only queued tasks can be cancelled",
    "priority": "only queued tasks can change priority",
    "retry_now": "only tasks waiting to retry can be brought forward",
}
# The tasks each action applies to. The admin's confirmation counts with these; a background operation's stored
# filter is limited to them, so re-evaluating it later can only reach tasks the action may change.
ELIGIBLE = {
    BulkOperation.Kind.REQUEUE: Q(status__in=REQUEUEABLE),
    BulkOperation.Kind.CANCEL: Q(status=TaskStatus.QUEUED),
    BulkOperation.Kind.PRIORITY: Q(status=TaskStatus.QUEUED),
    BulkOperation.Kind.RETRY_NOW: Q(status=TaskStatus.QUEUED, published_at__isnull=True, attempts__gt=0),
    BulkOperation.Kind.EMPTY_QUEUE: Q(status=TaskStatus.QUEUED),
    BulkOperation.Kind.DISCARD: Q(status=TaskStatus.FAILED),
}


@dataclass
class BulkResult:
    action: str
    changed: int = 0
    refused: Counter = field(default_factory=Counter)
    pinned: int = 0  # eligible, but left unchanged: a migration run verifies them (queues.dispatch, tasks_pinned)
    pinned_reason: str = ""

    @property
    def refused_count(self) -> int:
        return sum(self.refused.values())

    def describe(self) -> str:
        verbs = {"requeue": "Requeued", "cancel": "Cancelled", "priority": "Moved", "retry_now": "Brought forward",
                 "discard": "Discarded"}
        text = f"{verbs[self.action]} {self.changed} task(s)."
        if self.refused:
            parts = ", ".join(f"{count} {status.lower()}" for status, count in sorted(self.refused.items()))
            text += f" Refused {self.refused_count} ({parts}): {WHY_NOT[self.action]}."
        if self.pinned:
            text += f" Left {self.pinned} unchanged: {self.pinned_reason}."
        return text


def _unpinned(rows, result):
    """The rows an operator may change now; the others are counted as pinned (see ``BulkResult.pinned``)."""
    upto, reason = get_policy().tasks_pinned()
    if not upto:
        return rows
    free = [row for row in rows if row[0] > upto]
    if len(free) < len(rows):
        result.pinned += len(rows) - len(free)
        result.pinned_reason = reason
    return free


# --- what each action does to one batch of locked rows ------------------------------------------------------------
# Each receives the rows as (pk, status, priority, published_at, publish_after), counts what it changes and refuses
# in ``result``, and returns the (task id, priority) pairs to publish after the batch commits.

def _events(pks, kind, user, detail, now):
    TaskEvent.objects.bulk_create([TaskEvent(task_id=pk, kind=kind, at=now, actor=user if getattr(user, "pk", None)
                                             else None, detail=detail) for pk in pks])


def _requeue(rows, result, user):
    now = timezone.now()
    rows = _unpinned([row for row in rows if row[1] in REQUEUEABLE], result) + \
        [row for row in rows if row[1] not in REQUEUEABLE]
    eligible = [(pk, priority) for pk, status, priority, *_ in rows if status in REQUEUEABLE]
    result.refused.update(status for _, status, *_ in rows if status not in REQUEUEABLE)
    if not eligible:
        return []
    pks = [pk for pk, _ in eligible]
    # A requeued task goes where new tasks go now (queues.dispatch): the system that ran it before may be gone.
    by_system: dict[str, list[int]] = {}
    for pk, system in zip(pks, get_policy().assign(len(pks))):
        by_system.setdefault(system, []).append(pk)
    for system, ids in by_system.items():
        CaptionTask.objects.filter(pk__in=ids, status__in=REQUEUEABLE).update(
            status=TaskStatus.QUEUED, attempts=0, published_at=None, publish_after=now, started_at=None,
            finished_at=None, last_error_class="", last_error_message="", updated_at=now, dispatch=system)
    _events(pks, TaskEvent.Kind.REQUEUED, user, "requeued; retry count reset", now)
    result.changed += len(pks)
    transaction.on_commit(lambda: broker.dead_letters_forget(eligible))
    return eligible


def _cancel(rows, result, user, detail: str = "cancelled"):
    now = timezone.now()
    pks = [pk for pk, status, *_ in rows if status == TaskStatus.QUEUED]
    result.refused.update(status for _, status, *_ in rows if status != TaskStatus.QUEUED)
    if pks:
        CaptionTask.objects.filter(pk__in=pks, status=TaskStatus.QUEUED).update(
            status=TaskStatus.CANCELLED, finished_at=now, updated_at=now)
        _events(pks, TaskEvent.Kind.CANCELLED, user, detail, now)
        result.changed += len(pks)
        # Only once the rows say CANCELLED: a worker that still pops one of these finds no job (or a row it cannot
        # claim) and moves on.
        transaction.on_commit(lambda: broker.jobs_delete(pks))
    return []


def _change_priority(rows, result, user, priority: str):
    now = timezone.now()
    rows = _unpinned([row for row in rows if row[1] == TaskStatus.QUEUED and row[2] != priority], result) + \
        [row for row in rows if not (row[1] == TaskStatus.QUEUED and row[2] != priority)]
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


def _retry_now(rows, result, user):
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


def _discard(rows, result, user):
    now = timezone.now()
    rows = _unpinned([row for row in rows if row[1] == TaskStatus.FAILED], result) + \
        [row for row in rows if row[1] != TaskStatus.FAILED]
    eligible = [(pk, priority) for pk, status, priority, *_ in rows if status == TaskStatus.FAILED]
    result.refused.update(status for _, status, *_ in rows if status != TaskStatus.FAILED)
    if not eligible:
        return []
    # Redis first, inside the batch's transaction: without Redis nothing is discarded (BrokerUnavailable rolls the
    # batch back), so no row says DISCARDED while its job still counts as a dead letter (and keeps the dead-letter
    # alert firing) until RQ_FAILURE_TTL. A database error after this leaves FAILED rows whose jobs are gone from the
    # registries: discarding them again finishes the work. A job its worker is filing right now is left for later.
    filing = set(broker.dead_letters_drop(eligible))
    if filing:
        result.refused.update({"BEING FILED": len(filing)})
        eligible = [(pk, priority) for pk, priority in eligible if pk not in filing]
    pks = [pk for pk, _ in eligible]
    if not pks:
        return []
    CaptionTask.objects.filter(pk__in=pks, status=TaskStatus.FAILED).update(status=TaskStatus.DISCARDED,
                                                                           updated_at=now)
    _events(pks, TaskEvent.Kind.DISCARDED, user, "dead letter discarded", now)
    result.changed += len(pks)
    return []


CHANGES: dict[str, Callable] = {"requeue": _requeue, "cancel": _cancel, "priority": _change_priority,
                                "retry_now": _retry_now, "discard": _discard}


def _apply_batch(action: str, batch: list[int], result: BulkResult, *, user, params: dict,
                 record: Callable | None = None) -> None:
    """One batch in one transaction; ``record(batch, result)`` runs inside it (a bulk operation's checkpoint, so the
    batch and its progress commit together or not at all). Publishing follows the commit."""
    with transaction.atomic():
        rows = list(CaptionTask.objects.select_for_update().filter(pk__in=batch)
                    .values_list("pk", "status", "priority", "published_at", "publish_after"))
        to_publish = CHANGES[action](rows, result, user, **params)
        if record:
            record(batch, result)
    if to_publish:
        tasks_publish(tasks=to_publish)


def _chunks(ids: list[int]) -> Iterable[list[int]]:
    for start in range(0, len(ids), BATCH):
        yield ids[start:start + BATCH]


def _run(action: str, task_ids: Iterable[int], *, user, address, on_batch, params: dict | None = None,
         detail: dict | None = None) -> BulkResult:
    ids = sorted(set(int(task_id) for task_id in task_ids))
    result = BulkResult(action)
    stopped = None
    try:
        for batch in _chunks(ids):
            _apply_batch(action, batch, result, user=user, params=params or {})
            if on_batch:
                on_batch(len(batch), result)
    except BrokerUnavailable as error:  # the batches before it are done: the audit says how many
        stopped = error
    if stopped is None or result.changed:
        audit(user=user, action=f"tasks_{action}", target=f"{len(ids)} selected task(s)", count=result.changed,
              detail={"refused": dict(result.refused), **({"stopped": f"Redis unreachable: {stopped}"}
                                                          if stopped else {}), **(detail or {})}, address=address)
    if stopped is not None:
        raise stopped
    return result


def tasks_requeue(*, task_ids: Iterable[int], user=None, address=None, on_batch=None) -> BulkResult:
    """Failed or cancelled tasks back to QUEUED with a fresh retry count, published at once."""
    return _run("requeue", task_ids, user=user, address=address, on_batch=on_batch)


def tasks_cancel(*, task_ids: Iterable[int], user=None, address=None, on_batch=None, detail: str = "cancelled"
                 ) -> BulkResult:
    """Queued tasks (waiting to run or to retry) to CANCELLED; their jobs are dropped from Redis."""
    return _run("cancel", task_ids, user=user, address=address, on_batch=on_batch, params={"detail": detail})


def tasks_change_priority(*, task_ids: Iterable[int], priority: str, user=None, address=None, on_batch=None
                          ) -> BulkResult:
    """Moves queued tasks to another priority queue. The job is published on the new queue after the row changes;
    the entry left in the old queue no longer matches the row's priority, so the task runs once, from the new one."""
    if priority not in Priority.values:
        raise ValueError(f"Unknown priority {priority!r}: choose one of {', '.join(Priority.values)}")
    return _run("priority", task_ids, user=user, address=address, on_batch=on_batch, params={"priority": priority},
                detail={"priority": priority})


def tasks_discard(*, task_ids: Iterable[int], user=None, address=None, on_batch=None, detail: dict | None = None
                  ) -> BulkResult:
    """Failed tasks (dead letters) to DISCARDED: their jobs leave the failed-job registries, so they no longer count
    as dead letters (nor keep the dead-letter alert firing); the rows stay as history until the cleanup.
    ``detail``: what the audit entry says of the selection (the dead-letter page's error class)."""
    return _run("discard", task_ids, user=user, address=address, on_batch=on_batch, detail=detail)


def tasks_retry_now(*, task_ids: Iterable[int], user=None, address=None, on_batch=None) -> BulkResult:
    """Tasks waiting out a retry backoff are published now."""
    return _run("retry_now", task_ids, user=user, address=address, on_batch=on_batch)


# --- a queryset's filter as JSON, and back ------------------------------------------------------------------------

SELECTION_LOOKUPS = {"exact", "iexact", "in", "gt", "gte", "lt", "lte", "isnull", "contains", "icontains",
                     "startswith", "istartswith", "range"}
TASK_FIELDS = {task_field.name for task_field in CaptionTask._meta.concrete_fields}


def selection_describe(queryset: QuerySet) -> dict:
    """The filter of a CaptionTask queryset as JSON: a tree of AND/OR groups (possibly negated) whose leaves are
    (field, lookup, value) on the task's own columns. ``selection_queryset`` turns it back into the same filter.

    Describing the WHERE clause Django built (rather than the admin's query parameters) keeps what a background
    operation acts on equal to what the confirmation counted, whatever the admin's list filters and search did.
    Raises ValueError for a filter it cannot describe (a join, an expression, raw SQL): no admin filter of the task
    list builds one.
    """
    if queryset.model is not CaptionTask or len(queryset.query.alias_map) > 1:
        raise ValueError("only a filter on the tasks' own columns can run in the background")
    return _describe(queryset.query.where)


def _describe(node) -> dict:
    if isinstance(node, WhereNode):
        return {"connector": node.connector, "negated": node.negated,
                "children": [_describe(child) for child in node.children]}
    if not (isinstance(node, Lookup) and isinstance(node.lhs, Col) and node.lookup_name in SELECTION_LOOKUPS
            and not hasattr(node.rhs, "resolve_expression")):
        raise ValueError(f"this filter cannot run in the background: {node!r}")
    return {"field": node.lhs.target.name, "lookup": node.lookup_name, "value": _to_json(node.rhs)}


def _to_json(value):
    if isinstance(value, datetime.datetime):
        return {"datetime": value.isoformat()}
    if isinstance(value, datetime.date):
        return {"date": value.isoformat()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_to_json(item) for item in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError(f"this filter value cannot run in the background: {value!r}")


def _from_json(value):
    if isinstance(value, dict):
        if "datetime" in value:
            return datetime.datetime.fromisoformat(value["datetime"])
        return datetime.date.fromisoformat(value["date"])
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


def _as_q(node: dict) -> Q:
    if "field" in node:
        if node["field"] not in TASK_FIELDS or node["lookup"] not in SELECTION_LOOKUPS:
            raise ValueError(f"not a task filter: {node!r}")
        return Q(**{f"{node['field']}__{node['lookup']}": _from_json(node["value"])})
    group = Q(*[_as_q(child) for child in node["children"]], _connector=node["connector"])
    return ~group if node["negated"] else group


def selection_queryset(selection: dict) -> QuerySet:
    """The tasks a ``selection_describe`` description matches now."""
    return CaptionTask.objects.filter(_as_q(selection))


# --- background operations ----------------------------------------------------------------------------------------

# A running operation renews its heartbeat with every batch (a batch takes well under a second or two). One silent
# for longer than this has lost its worker.
BULK_LEASE = timedelta(seconds=60)
# An operation whose runs keep dying (a batch that kills its worker, say) is given up after this many starts.
BULK_MAX_RUNS = 5


def bulk_operation_start(*, kind: str, task_ids: Iterable[int] | None = None, matching: QuerySet | None = None,
                         params: dict | None = None, user=None, address=None) -> BulkOperation:
    """Records a large action and hands it to a worker (urgent queue). Raises BrokerUnavailable without Redis.

    Give either ``task_ids`` (the tasks an operator selected; stored as a list) or ``matching`` (a queryset: every
    task matching a filter). A queryset is stored as the description of its filter, limited to the tasks the action
    applies to and to ids up to the highest one matching now (tasks created later are not part of what was
    confirmed), and re-evaluated batch by batch when the operation runs.
    """
    if (task_ids is None) == (matching is None):
        raise ValueError("give either task_ids or matching")
    if matching is not None:
        eligible = matching.filter(ELIGIBLE[kind])
        figures = eligible.order_by().aggregate(top=Max("pk"), total=Count("pk"))
        selection, ids_text, total = selection_describe(eligible.filter(pk__lte=figures["top"] or 0)), "", \
            figures["total"]
    else:
        unique = sorted(set(int(task_id) for task_id in task_ids))
        selection, ids_text, total = None, ",".join(str(task_id) for task_id in unique), len(unique)
    operation = BulkOperation.objects.create(
        kind=kind, task_ids=ids_text, selection=selection, params=params or {}, total=total,
        user=user if getattr(user, "pk", None) else None, address=address, heartbeat_at=UtcNow())
    operation.refresh_from_db(fields=["heartbeat_at"])
    try:
        broker.enqueue_bulk_operation(operation.pk)
    except broker.BrokerUnavailable:
        operation.state, operation.message = BulkOperation.State.FAILED, "Redis was unreachable; nothing was done"
        operation.save(update_fields=["state", "message"])
        raise
    return operation


class _Superseded(Exception):
    """This run lost its lease: recovery handed the operation to a newer run, which continues it."""


def _bulk_action(operation: BulkOperation) -> tuple[str, dict]:
    if operation.kind == BulkOperation.Kind.EMPTY_QUEUE:
        return "cancel", {"detail": f"queue {operation.params['queue_name']} emptied"}
    if operation.kind == BulkOperation.Kind.DISCARD:
        return "discard", {}  # its params (the dead-letter page's error class) are for the audit entry
    return operation.kind, dict(operation.params)


def _bulk_batches(operation: BulkOperation) -> Iterator[list[int]]:
    """The operation's tasks after its checkpoint, a batch at a time, in id order."""
    if operation.selection is None:
        yield from _chunks([task_id for task_id in operation.ids() if task_id > operation.checkpoint])
        return
    remaining = selection_queryset(operation.selection).filter(ELIGIBLE[operation.kind]).order_by("pk")
    after = operation.checkpoint
    while True:
        batch = list(remaining.filter(pk__gt=after).values_list("pk", flat=True)[:BATCH])
        if not batch:
            return
        yield batch
        after = batch[-1]


def bulk_operation_run(*, operation_id: int, worker_name: str = "") -> BulkOperation:
    """Runs (or, after a recovery, continues) a background operation. Only one run at a time: the claim and every
    later write expect this run's number. Under the correlation id of the request that started it."""
    started_by = BulkOperation.objects.filter(pk=operation_id).values_list("correlation_id", flat=True).first()
    with correlation.bound(started_by or None):
        return _bulk_operation_run(operation_id=operation_id, worker_name=worker_name)


def _bulk_operation_run(*, operation_id: int, worker_name: str) -> BulkOperation:
    claimed = BulkOperation.objects.filter(pk=operation_id, state=BulkOperation.State.PENDING).update(
        state=BulkOperation.State.RUNNING, runs=F("runs") + 1, worker_name=worker_name[:200],
        heartbeat_at=UtcNow())
    operation = BulkOperation.objects.get(pk=operation_id)
    if claimed != 1:
        return operation  # running elsewhere or done (a duplicate job)
    this_run = BulkOperation.objects.filter(pk=operation_id, state=BulkOperation.State.RUNNING, runs=operation.runs)
    action, params = _bulk_action(operation)
    result = BulkResult(action, changed=operation.changed, refused=Counter(operation.refused_by_status))

    def record(batch, counts):
        if this_run.update(processed=F("processed") + len(batch), changed=counts.changed,
                           refused=counts.refused_count, refused_by_status=dict(counts.refused),
                           checkpoint=batch[-1], heartbeat_at=UtcNow()) != 1:
            raise _Superseded  # rolls this batch back: the newer run does it

    try:
        for batch in _bulk_batches(operation):
            _apply_batch(action, batch, result, user=operation.user, params=params, record=record)
        if operation.kind == BulkOperation.Kind.EMPTY_QUEUE:
            _queue_list_drop(operation.params["queue_name"])
    except _Superseded:
        return BulkOperation.objects.get(pk=operation_id)
    except Exception as error:
        # Stays FAILED with the reason (the operator starts it again: only the tasks still eligible are acted on).
        # If even this write fails, the row stays RUNNING and recovery takes it over one lease later.
        if this_run.update(state=BulkOperation.State.FAILED, message=f"{type(error).__name__}: {error}",
                           finished_at=timezone.now()) == 1:
            _bulk_audit(operation, result, failed=f"{type(error).__name__}: {error}")
        raise
    if this_run.update(state=BulkOperation.State.DONE, message=result.describe(), finished_at=timezone.now(),
                       heartbeat_at=UtcNow()) == 1:
        _bulk_audit(operation, result)
    operation.refresh_from_db()
    return operation


def _bulk_audit(operation: BulkOperation, result: BulkResult, failed: str = "") -> None:
    detail = {"bulk_operation": operation.pk, "refused": dict(result.refused), **operation.params}
    if failed:
        detail["failed"] = failed
    if operation.kind == BulkOperation.Kind.EMPTY_QUEUE:
        audit(user=operation.user, action="queue_empty", target=operation.params["queue_name"],
              count=result.changed, detail=detail, address=operation.address)
    else:
        audit(user=operation.user, action=f"tasks_{operation.kind}",
              target=f"bulk operation {operation.pk} ({operation.total} task(s))", count=result.changed,
              detail=detail, address=operation.address)


@dataclass
class BulkRecovery:
    resumed: list[int] = field(default_factory=list)  # enqueued again, to continue after their checkpoint
    given_up: list[int] = field(default_factory=list)  # FAILED: their runs died BULK_MAX_RUNS times


def bulk_operations_recover(*, lease: timedelta = BULK_LEASE) -> BulkRecovery:
    """Hands background operations that went silent to a new run.

    An operation RUNNING whose heartbeat is older than ``lease`` has lost its worker (killed, or cut off from the
    database): it goes back to PENDING and its job is enqueued again; the new run continues after the checkpoint,
    and the old run, should it still be alive, stops at its next batch (its writes expect its run number). One
    PENDING for longer than the lease had its job lost with Redis' data: it is enqueued again (a duplicate job finds
    it claimed and does nothing). After ``BULK_MAX_RUNS`` starts an operation is marked FAILED instead.

    Safe from any number of processes at once (conditional updates on the database's clock). Each recovery is an
    audit row. Raises BrokerUnavailable if Redis is unreachable; the operation is tried again one lease later.
    """
    silent_since = ExpressionWrapper(UtcNow() - lease, output_field=DateTimeField())
    silent = Q(heartbeat_at__lt=silent_since) | Q(heartbeat_at__isnull=True)
    recovery = BulkRecovery()
    candidates = (BulkOperation.objects.filter(silent, state__in=[BulkOperation.State.PENDING,
                                                                   BulkOperation.State.RUNNING])
                  .order_by("pk").values_list("pk", "state", "runs", "checkpoint")[:100])
    for pk, state, runs, checkpoint in candidates:
        unchanged = BulkOperation.objects.filter(silent, pk=pk, state=state, runs=runs)
        if state == BulkOperation.State.RUNNING and runs >= BULK_MAX_RUNS:
            message = f"Given up: its worker stopped {runs} times (last at task {checkpoint})."
            if unchanged.update(state=BulkOperation.State.FAILED, message=message, finished_at=timezone.now()) == 1:
                audit(user=None, action="bulk_operation_given_up", target=f"bulk operation {pk}",
                      detail={"runs": runs, "checkpoint": checkpoint})
                recovery.given_up.append(pk)
            continue
        if state == BulkOperation.State.RUNNING:
            message = f"Resumed after task {checkpoint}: run {runs} gave no sign of life for {lease}."
        elif broker.bulk_operation_waiting(pk):
            continue  # its job is still queued (behind other urgent work, or urgent is paused): nothing was lost
        else:
            message = f"Enqueued again: still waiting after {lease} (its job was lost with Redis' data)."
        if unchanged.update(state=BulkOperation.State.PENDING, heartbeat_at=UtcNow(), message=message) != 1:
            continue  # its run renewed the heartbeat meanwhile, or another process recovered it
        audit(user=None, action="bulk_operation_resumed", target=f"bulk operation {pk}",
              detail={"was": state, "runs": runs, "checkpoint": checkpoint})
        broker.enqueue_bulk_operation(pk)
        recovery.resumed.append(pk)
    return recovery


def queue_empty(*, queue_name: str, confirm: str, user=None, address=None, on_batch=None
                ) -> BulkResult | BulkOperation:
    """Cancels every queued task of a queue, then drops the queue's list of waiting jobs. ``confirm`` must repeat
    the queue's name.

    The rows are cancelled first, in batches (each with its task events; the cancelled tasks' job hashes are deleted
    after each commit), and the list is dropped only once all are. Interrupted half-way, this leaves cancelled tasks
    and queued tasks whose jobs are still in the list, never a queued, published task whose job is gone (the
    reconciler would publish it again, undoing the emptying). With more than ``INLINE_LIMIT`` queued tasks it runs as
    a background ``BulkOperation``, which is returned; otherwise it runs now and returns the counts.
    """
    if queue_name not in broker.QUEUE_NAMES:
        raise ValueError(f"Unknown queue {queue_name!r}")
    if confirm.strip() != queue_name:
        raise ValueError(f"Type the queue's name ({queue_name}) to confirm emptying it")
    queued = CaptionTask.objects.filter(status=TaskStatus.QUEUED, priority=queue_name)
    if queued.count() > INLINE_LIMIT:
        return bulk_operation_start(kind=BulkOperation.Kind.EMPTY_QUEUE,
                                    matching=CaptionTask.objects.filter(priority=queue_name),
                                    params={"queue_name": queue_name}, user=user, address=address)
    ids = list(queued.values_list("pk", flat=True))
    result = tasks_cancel(task_ids=ids, user=user, address=address, on_batch=on_batch,
                          detail=f"queue {queue_name} emptied")
    _queue_list_drop(queue_name)
    audit(user=user, action="queue_empty", target=queue_name, count=result.changed, address=address)
    return result


def _queue_list_drop(queue_name: str) -> None:
    """Drops a queue's list once its tasks are cancelled. Tasks published to the queue meanwhile (submitted during
    the emptying, or moved to this queue) lose their entry with the list, so they are published again here: none is
    left queued and published with its job gone. (Published twice at worst, which runs the task once: the claim is a
    conditional update.)"""
    broker.queue_drop(queue_name)
    survivors = CaptionTask.objects.filter(status=TaskStatus.QUEUED, priority=queue_name,
                                           published_at__isnull=False).order_by("pk")
    after = 0
    while True:
        batch = list(survivors.filter(pk__gt=after).values_list("pk", flat=True)[:BATCH])
        if not batch:
            return
        CaptionTask.objects.filter(pk__in=batch, status=TaskStatus.QUEUED, published_at__isnull=False).update(
            published_at=None)
        tasks_publish(tasks=CaptionTask.objects.filter(pk__in=batch).values_list("pk", "priority"))
        after = batch[-1]


def queue_set_paused(*, queue_name: str, paused: bool, user=None, address=None) -> None:
    """Paused queues keep their tasks; workers take nothing from them until resumed (within about a second)."""
    control.queue_set_paused(queue=queue_name, paused=paused, user=user)
    audit(user=user, action="queue_pause" if paused else "queue_resume", target=queue_name, address=address)


def queues_maintenance(*, user=None, address=None) -> dict:
    """rq's registry cleanup for every queue, as an explicit action (reading pages never does it)."""
    cleaned = broker.registries_clean()
    audit(user=user, action="queue_maintenance", target="all queues", detail=cleaned, address=address)
    return cleaned


def tasks_cleanup(*, cutoff, dry_run: bool = False, on_batch=None, budget: float | None = None) -> dict:
    """Deletes completed, cancelled and discarded tasks that finished before ``cutoff`` (with their events), 1,000
    rows per statement, and the finished jobs in Redis that ended before it. Failed tasks stay: they are dead letters
    until someone requeues or discards them.

    With a ``budget`` (seconds) it stops between batches once the budget is spent and says ``finished: False``;
    calling it again goes on where it stopped (the fleet's periodic cleanup runs it this way, beside the relay)."""
    deadline = None if budget is None else time.monotonic() + budget
    old = CaptionTask.objects.filter(status__in=[TaskStatus.COMPLETED, TaskStatus.CANCELLED, TaskStatus.DISCARDED],
                                     finished_at__lt=cutoff)
    upto, reason = get_policy().tasks_pinned()
    kept = {"kept": old.filter(pk__lte=upto).count(), "why_kept": reason} if upto else {"kept": 0, "why_kept": ""}
    if upto:
        old = old.filter(pk__gt=upto)
    if dry_run:
        return {"rows": old.count(), "jobs": broker.finished_jobs_cleanup(cutoff=cutoff, dry_run=True), **kept}
    rows = 0
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            return {"rows": rows, "jobs": 0, "finished": False, **kept}
        batch = list(old.order_by("pk").values_list("pk", flat=True)[:BATCH])
        if not batch:
            break
        with transaction.atomic():
            TaskEvent.objects.filter(task_id__in=batch).delete()
            CaptionTask.objects.filter(pk__in=batch).delete()
        rows += len(batch)
        if on_batch:
            on_batch(len(batch))
    jobs = broker.finished_jobs_cleanup(cutoff=cutoff, on_batch=on_batch, deadline=deadline)
    finished = deadline is None or time.monotonic() < deadline
    return {"rows": rows, "jobs": jobs, "finished": finished, **kept}
