"""Bringing Redis back in line with the database after crashes and data loss.

Two repairs, safe to run from any number of processes at once (every change is a conditional update, and
publication is claimed per row):

- **Attempts whose worker is gone.** A worker renews the lease of the attempt it runs every couple of seconds:
  ``heartbeat_at`` on the task row, written with the database's clock (queues.execution). A ``PROCESSING`` task
  whose heartbeat is older than ``TASK_LEASE_SECONDS`` on that same clock is re-driven: back to ``QUEUED`` after the
  retry backoff, or ``FAILED`` into the dead letters once the task has used its retries (a task that kills its worker
  every time must not crash-loop the fleet). Nothing in Redis is consulted: a Redis restart, flush, failover,
  eviction or a host that cannot reach Redis removes keys from live workers, and clock skew between hosts does not
  matter when one clock judges. A supervisor that sees its own worker die re-drives at once instead
  (``tasks_recover_from_worker``).
- **Background bulk operations whose worker died** are handed to a new run (``bulk_operations_recover``).
- **Jobs lost from Redis.** A ``QUEUED``, published task whose job is no longer in Redis (Redis lost data; or a
  worker popped the job and died before claiming it) is published again. Candidates (published longer than
  ``PUBLISHED_GRACE`` ago) are checked directly, a page at a time from a cursor that walks the backlog over
  successive passes: does ``rq:job:caption-<id>`` exist, and in what state? A job hash that is missing, or that a
  worker has already taken (started, finished, failed), means lost; so does a job still marked queued that was
  enqueued before the job now at the head of its queue (FIFO: it would have been popped already). A task found
  lost is only a suspect until a later pass, at least ``CONFIRM_AFTER`` seconds on, finds it lost again; then it is
  unpublished (conditionally on the publication we judged) and published again, and its ``REPUBLISHED`` event is
  written only once the publish succeeded. The cost of a pass is bounded by ``CHECKS_PER_PASS`` whatever the
  backlog: one indexed query and one pipeline of HMGETs per page, no LRANGE.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

from django.conf import settings
from django.db import connections, transaction
from django.db.models import Q
from django.utils import timezone

from queues import broker
from queues.execution import retry_delay
from queues.models import (
    AtMost,
    CaptionTask,
    DatabaseNow,
    FleetEvent,
    TaskEvent,
    TaskStatus,
    database_now,
    database_now_expression,
)
from queues.operations.services import bulk_operations_recover
from queues.services import tasks_publish
from queues.signals import attempt_ended

logger = logging.getLogger(__name__)

# Seconds without a heartbeat after which an attempt is taken as abandoned. Workers beat every 2 s; the margin
# covers a database hiccup or a long pause of the worker's process.
TASK_LEASE_SECONDS = 15
# A published task younger than this is not judged: its job may be between BLPOP and the claim right now.
PUBLISHED_GRACE = timedelta(seconds=30)
# A lost job is published again only when a pass at least this many seconds after the first one still finds it lost.
CONFIRM_AFTER = 4.0
CHECK_PAGE = 1000
CHECKS_PER_PASS = 10_000
SUSPECTS_KEY = "portal:reconcile:suspects"
SEEN_KEY = "portal:reconcile:database-seen"
CURSOR_KEY = "portal:reconcile:cursor"
ENDED_JOB_STATES = {"started", "finished", "failed", "stopped", "canceled"}


@dataclass
class ReconcileResult:
    redriven: list[int] = field(default_factory=list)
    dead_lettered: list[int] = field(default_factory=list)
    republished: list[int] = field(default_factory=list)
    suspected: list[int] = field(default_factory=list)
    checked: int = 0
    bulk_resumed: list[int] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.redriven or self.dead_lettered or self.republished)


REDRIVE_FIELDS = ("pk", "priority", "attempts", "worker_name", "started_at", "claim_token", "correlation_id")


def task_redrive(*, task: CaptionTask, reason: str, result: ReconcileResult | None = None,
                 lease_expired_only: bool = False, judged_at: datetime | None = None, give_back: bool = False) -> bool:
    """Ends a ``PROCESSING`` attempt whose worker is gone. Returns False if the attempt had already ended (or, with
    ``lease_expired_only``, if its worker renewed the lease meanwhile, or if the statement only ran more than a
    second after ``judged_at``, the database's time of the judgement: it waited on a lock, and the workers' own
    renewals were waiting behind the same lock). ``give_back``: the worker was stopped on purpose (not the task's
    fault): the task is queued again at once without using a retry, as a worker's own give-back does."""
    now = timezone.now()
    exhausted = task.attempts > settings.RQ_MAX_RETRIES and not give_back
    message = f"worker {task.worker_name or '?'} stopped while running the task ({reason})"
    expect = {"status": TaskStatus.PROCESSING, "claim_token": task.claim_token}
    if lease_expired_only:
        expect["heartbeat_at"] = AtMost(DatabaseNow(-TASK_LEASE_SECONDS))
    not_after = judged_at + timedelta(seconds=1) if judged_at is not None else None
    with transaction.atomic():
        if exhausted:
            changed = CaptionTask.objects.transition(
                task.pk, expect=expect, database_now_at_most=not_after,
                changes={"status": TaskStatus.FAILED, "finished_at": now, "last_error_class": "WorkerLost",
                         "last_error_message": message, "updated_at": now})
            detail = f"worker lost on attempt {task.attempts}; no retries left"
        elif give_back:
            changed = CaptionTask.objects.transition(
                task.pk, expect=expect, database_now_at_most=not_after,
                changes={"status": TaskStatus.QUEUED, "published_at": None, "publish_after": now,
                         "attempts": max(0, task.attempts - 1), "updated_at": now})
            detail = "worker stopped; the attempt is given back without using a retry"
        else:
            delay = retry_delay(task.attempts)
            changed = CaptionTask.objects.transition(
                task.pk, expect=expect, database_now_at_most=not_after,
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
                correlation_id=task.correlation_id,  # the submitter's, not the supervisor's (it has none)
            )
    if not changed:
        return False
    try:
        broker.job_forget_execution(task.pk, task.priority)
        if exhausted:
            broker.job_dead_letter(task.pk, task.priority, f"WorkerLost: {message}",
                                   correlation_id=task.correlation_id)
    except (broker.BrokerUnavailable, *broker.REDIS_ERRORS):
        logger.warning("task %s re-driven, but Redis could not be tidied now", task.pk)
    attempt_ended.send(sender=CaptionTask, queue=task.priority, outcome="failed" if exhausted else "worker_lost",
                       processing_seconds=None, wait_seconds=None, error_class="WorkerLost")
    if result is not None:
        (result.dead_lettered if exhausted else result.redriven).append(task.pk)
    logger.warning("task %s: %s", task.pk, detail)
    return True


def tasks_recover_from_worker(*, worker_name: str, reason: str, give_back: bool = False) -> ReconcileResult:
    """Re-drives the tasks a known-dead worker was running (the supervisor calls this whenever its child exits).
    ``give_back``: the supervisor killed it after being told to stop at once (see ``task_redrive``)."""
    result = ReconcileResult()
    for task in CaptionTask.objects.filter(status=TaskStatus.PROCESSING, worker_name=worker_name) \
            .only(*REDRIVE_FIELDS):
        task_redrive(task=task, reason=reason, result=result, give_back=give_back)
    return result


def tasks_reconcile(*, now=None, budget: float | None = None, interval: float = 5.0) -> ReconcileResult:
    """One repair pass (see the module docstring). ``budget``: seconds after which the lost-job check stops for
    this pass; ``interval``: seconds between passes (how long a quiet database is normal). Raises
    BrokerUnavailable (or a Redis error) if Redis is unreachable."""
    now = now or timezone.now()
    result = ReconcileResult()
    _redrive_orphans(result, interval=interval)
    result.bulk_resumed = bulk_operations_recover().resumed
    _republish_lost(now, result, deadline=time.monotonic() + budget if budget is not None else None)
    if result.changed:
        FleetEvent.objects.create(
            kind=FleetEvent.Kind.TASKS_RECOVERED, reason="reconciler",
            figures={"redriven": len(result.redriven), "dead_lettered": len(result.dead_lettered),
                     "republished": len(result.republished)},
        )
    return result


def _redrive_orphans(result: ReconcileResult, *, interval: float) -> None:
    """Re-drives attempts whose lease expired, unless the database has just come back.

    After a database outage every lease looks expired: the workers could not renew them, and their first renewals
    are still on the way. Judging then would hand every running task to a second worker. So leases are judged only
    on a pass that follows a healthy pass: one that ran at most ``2 x interval + 5`` seconds of database time before
    (the reconciler reached the database meanwhile) and whose statements did not wait (more than a second in all).
    And each re-drive is refused if it runs more than a second after its judgement (it waited on a lock, behind
    which the workers' renewals were waiting too).
    """
    connection = connections[CaptionTask.objects.db]
    started = time.monotonic()
    judged_at = database_now(connection)
    previous_at, previous_healthy = _previous_pass()
    gap = (judged_at - previous_at).total_seconds() if previous_at else 0.0
    trusted = previous_healthy and gap <= 2 * interval + 5
    lease_start = database_now_expression(-TASK_LEASE_SECONDS, using=CaptionTask.objects.db)
    expired = list(CaptionTask.objects.filter(status=TaskStatus.PROCESSING, heartbeat_at__lt=lease_start)
                   .only(*REDRIVE_FIELDS)[:10_000])
    if expired and trusted and time.monotonic() - started <= 1.0:
        for task in expired:
            task_redrive(task=task, reason=f"no heartbeat for over {TASK_LEASE_SECONDS} s", result=result,
                         lease_expired_only=True, judged_at=judged_at)
    elif expired:
        logger.warning("the database was away or slow (%.1f s since the last pass); %d expired lease(s) are judged "
                       "on a later pass, after their workers had a chance to renew them", gap, len(expired))
    _record_pass(judged_at, healthy=time.monotonic() - started <= 1.0)


def _previous_pass() -> tuple[datetime | None, bool]:
    """The database time of the previous pass and whether it was healthy (unknown after a Redis flush: trusted)."""
    try:
        raw = broker.get_connection().get(SEEN_KEY)
    except broker.REDIS_ERRORS:
        return None, False
    if not raw:
        return None, True
    try:
        stamp, healthy = raw.decode().split("|")
        return datetime.fromisoformat(stamp), healthy == "1"
    except ValueError:
        return None, True


def _record_pass(at: datetime, *, healthy: bool) -> None:
    try:
        broker.get_connection().set(SEEN_KEY, f"{at.isoformat()}|{int(healthy)}", ex=3600)
    except broker.REDIS_ERRORS:
        pass


# --- jobs lost from Redis -----------------------------------------------------------------------------------------

def _job_states(task_ids: list[int]) -> list[tuple]:
    """(status, origin, enqueued_at) of each task's job hash, None where the hash is missing: one pipeline."""
    connection = broker.get_connection()
    pipe = connection.pipeline(transaction=False)
    for task_id in task_ids:
        pipe.hmget(broker.CaptionJob.redis_job_namespace_prefix + f"caption-{task_id}", "status", "origin",
                   "enqueued_at")
    states = []
    for status, origin, enqueued in pipe.execute():
        states.append(None if status is None else
                      (status.decode(), (origin or b"").decode(), (enqueued or b"").decode()))
    return states


def _queue_heads() -> dict[str, str | None]:
    """When the job at the head of each queue was enqueued: None for an empty queue, "" when unknown (the head is a
    stale entry whose job now belongs to another queue, or was deleted): O(queues)."""
    connection = broker.get_connection()
    pipe = connection.pipeline(transaction=False)
    for name in broker.QUEUE_NAMES:
        pipe.lindex(broker.Queue.redis_queue_namespace_prefix + name, 0)
    heads = pipe.execute()
    pipe = connection.pipeline(transaction=False)
    for head in heads:
        if head:
            pipe.hmget(broker.CaptionJob.redis_job_namespace_prefix + head.decode(), "enqueued_at", "origin", "status")
        else:
            pipe.echo("")
    found = {}
    for name, head, fields in zip(broker.QUEUE_NAMES, heads, pipe.execute()):
        if head is None:
            found[name] = None
            continue
        enqueued, origin, status = fields
        # Only a head whose job really waits in this queue says where the queue's FIFO has got to.
        usable = origin is not None and origin.decode() == name and status == b"queued" and enqueued
        found[name] = enqueued.decode() if usable else ""
    return found


def _is_lost(state, priority: str, heads: dict[str, str | None]) -> bool:
    if state is None:
        return True
    status, origin, enqueued_at = state
    if status in ENDED_JOB_STATES:
        return True
    if status != "queued":
        return False  # scheduled, deferred: not ours to judge
    queue = origin if origin in heads else priority
    head = heads.get(queue, "")
    if head is None:
        return True  # its queue is empty, yet the job says it waits there
    # rq writes enqueued_at as ISO text in UTC, so the strings compare in time order. A head enqueued later than
    # this job (by more than the publishers' possible skew) means this job was popped already.
    if not (head and enqueued_at):
        return False
    try:
        return _parse(enqueued_at) < _parse(head) - timedelta(seconds=5)
    except ValueError:
        return False  # a timestamp rq did not write: not evidence either way


def _parse(text: str) -> datetime:
    from rq.utils import utcparse

    return utcparse(text).replace(tzinfo=dt_timezone.utc)


def _republish_lost(now, result: ReconcileResult, *, deadline: float | None) -> None:
    connection = broker.get_connection()
    server_now = float(connection.time()[0])
    heads = _queue_heads()
    suspects = {int(key): float(value) for key, value in connection.hgetall(SUSPECTS_KEY).items()}
    known_suspects = dict(suspects)
    confirmed: list[tuple[int, str, datetime]] = []

    def judge(rows: list[tuple[int, str, datetime]]) -> None:
        states = _job_states([pk for pk, _, _ in rows])
        result.checked += len(rows)
        for (pk, priority, published_at), state in zip(rows, states):
            if not _is_lost(state, priority, heads):
                suspects.pop(pk, None)
            elif pk not in suspects:
                suspects[pk] = server_now
                result.suspected.append(pk)
            elif server_now - suspects[pk] >= CONFIRM_AFTER:
                confirmed.append((pk, priority, published_at))

    # Suspects first: each is judged again from its current row (gone from the candidates when it was claimed,
    # completed or republished meanwhile).
    cutoff = now - PUBLISHED_GRACE
    suspect_ids = sorted(suspects)
    judged = set(suspect_ids)
    for start in range(0, len(suspect_ids), CHECK_PAGE):
        page = suspect_ids[start:start + CHECK_PAGE]
        rows = list(CaptionTask.objects.filter(pk__in=page, status=TaskStatus.QUEUED, published_at__lt=cutoff)
                    .values_list("pk", "priority", "published_at"))
        for pk in set(page) - {row[0] for row in rows}:
            suspects.pop(pk, None)
        if rows:
            judge(rows)

    # Then new candidates, from where the previous pass stopped (oldest publication first).
    cursor = _read_cursor(connection)
    checked_new = 0
    while checked_new < CHECKS_PER_PASS and (deadline is None or time.monotonic() < deadline):
        queryset = CaptionTask.objects.filter(status=TaskStatus.QUEUED, published_at__lt=cutoff)
        if cursor is not None:
            queryset = queryset.filter(Q(published_at__gt=cursor[0]) | Q(published_at=cursor[0], pk__gt=cursor[1]))
        rows = [row for row in queryset.order_by("published_at", "pk")
                .values_list("pk", "priority", "published_at")[:CHECK_PAGE]]
        if not rows:
            cursor = None  # walked the whole backlog: start again from the oldest next pass
            break
        judge([row for row in rows if row[0] not in judged])
        checked_new += len(rows)
        cursor = (rows[-1][2], rows[-1][0])
    for pk, *_ in confirmed:
        suspects.pop(pk, None)
    try:
        # The reconciler's own notes. Losing them (Redis refusing writes, or a flush) only delays a verdict.
        _write_cursor(connection, cursor)
        if suspects != known_suspects:
            pipe = connection.pipeline(transaction=False)
            pipe.delete(SUSPECTS_KEY)
            if suspects:
                pipe.hset(SUSPECTS_KEY, mapping={str(pk): repr(seen) for pk, seen in suspects.items()})
                pipe.expire(SUSPECTS_KEY, 3600)
            pipe.execute()
    except broker.REDIS_ERRORS as error:
        logger.warning("could not keep the reconciler's notes in Redis: %s", error)
    if confirmed:
        _publish_again(confirmed, now, result)


def _publish_again(lost: list[tuple[int, str, datetime]], now, result: ReconcileResult) -> None:
    unpublished = []
    for pk, priority, published_at in lost:
        # Only the publication we judged: a task claimed, cancelled or published again since is left alone.
        if CaptionTask.objects.filter(pk=pk, status=TaskStatus.QUEUED, published_at=published_at) \
                .update(published_at=None, publish_after=now):
            unpublished.append((pk, priority))
    if not unpublished:
        return
    tasks_publish(tasks=unpublished)
    # Events only for what really went back to Redis; the rest the relay publishes when Redis takes writes again.
    published = list(CaptionTask.objects.filter(pk__in=[pk for pk, _ in unpublished], status=TaskStatus.QUEUED,
                                                published_at__isnull=False)
                     .values_list("pk", "priority", "correlation_id"))
    TaskEvent.objects.bulk_create([TaskEvent(task_id=pk, kind=TaskEvent.Kind.REPUBLISHED, at=now,
                                             detail=f"job missing from queue {priority}", correlation_id=correlation_id)
                                   for pk, priority, correlation_id in published])
    result.republished.extend(pk for pk, _, _ in published)
    logger.warning("published %d lost job(s) again", len(published))


def _read_cursor(connection) -> tuple[datetime, int] | None:
    raw = connection.get(CURSOR_KEY)
    if not raw:
        return None
    try:
        stamp, pk = raw.decode().split("|")
        return datetime.fromisoformat(stamp), int(pk)
    except ValueError:
        return None


def _write_cursor(connection, cursor: tuple[datetime, int] | None) -> None:
    if cursor is None:
        if connection.exists(CURSOR_KEY):
            connection.delete(CURSOR_KEY)
    else:
        connection.set(CURSOR_KEY, f"{cursor[0].isoformat()}|{cursor[1]}", ex=3600)
