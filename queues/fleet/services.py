"""Worker pools and the fleet: scaling, restarts, stopping jobs, suspension, autoscaling, and the fleet's state.

Entry points (admin views, ``manage.py workers``, the supervisor) call these services; every change leaves a
``FleetEvent`` row, and every operator action an ``AuditEntry`` too.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from queues import broker
from queues.audit import audit
from queues.broker import CaptionJob
from queues import control
from queues.models import QUEUE_ORDER, CaptionTask, FleetEvent, QueueState, TaskStatus, WorkerPool

logger = logging.getLogger(__name__)


class FleetError(Exception):
    """An operator's fleet action cannot be done (unknown worker, worker idle, ...); the message says why."""


def pool_get(name: str) -> WorkerPool:
    try:
        return WorkerPool.objects.get(name=name)
    except WorkerPool.DoesNotExist:
        known = ", ".join(WorkerPool.objects.values_list("name", flat=True)) or "none"
        raise FleetError(f"Unknown pool {name!r} (pools: {known})") from None


def pools_draining(queue: str) -> list[WorkerPool]:
    """The pools whose workers drain ``queue``, by name (the old system scaled workers per queue; the portal scales
    pools). None is a FleetError."""
    pools = [pool for pool in WorkerPool.objects.order_by("name") if queue in pool.queue_names]
    if not pools:
        raise FleetError(f"no worker pool drains the {queue} queue")
    return pools


def pool_scale(*, pool: WorkerPool, desired: int, user=None, reason: str = "", address: str | None = None,
               adjust_bounds: bool = False) -> WorkerPool:
    """Sets how many workers a pool should run. Supervisors follow within about a second.

    Raises ValidationError naming ``desired`` when it is outside the pool's minimum..maximum, unless
    ``adjust_bounds`` (the local runner's ``--workers``) widens them.
    """
    if desired < 0:
        raise ValidationError({"desired": "The number of workers cannot be negative."})
    with transaction.atomic():
        pool = WorkerPool.objects.select_for_update().get(pk=pool.pk)
        if adjust_bounds:
            pool.minimum, pool.maximum = min(pool.minimum, desired), max(pool.maximum, desired)
        elif not pool.minimum <= desired <= pool.maximum:
            raise ValidationError({"desired": f"Pool {pool.name!r} runs between {pool.minimum} and {pool.maximum} "
                                              f"workers; {desired} is outside that range."})
        previous = pool.desired
        pool.desired = desired
        pool.last_scaled_at = timezone.now()
        pool.save(update_fields=["desired", "minimum", "maximum", "last_scaled_at", "updated_at"])
        FleetEvent.objects.create(kind=FleetEvent.Kind.POOL_SCALED, pool=pool, user=_user(user),
                                  reason=reason or ("by " + str(user) if _user(user) else "scaled"),
                                  figures={"from": previous, "to": desired})
        if _user(user):
            audit(user=user, action="pool_scale", target=pool.name, count=desired,
                  detail={"from": previous, "to": desired}, address=address)
    return pool


def _user(user):
    return user if getattr(user, "pk", None) else None


@dataclass(frozen=True)
class AutoscaleDecision:
    pool: str
    queued: int
    previous: int
    desired: int
    reason: str


def pool_autoscale(*, pool: WorkerPool, queued: int, now: datetime | None = None) -> AutoscaleDecision | None:
    """Applies the pool's autoscaling policy to the current backlog: one worker process (its caption slots) up when
    more than ``scale_up_threshold`` jobs wait, one down when fewer than ``scale_down_threshold`` do, never outside
    minimum..maximum, and never sooner than the cooldown after the previous change. Records each change."""
    if not pool.autoscale:
        return None
    now = now or timezone.now()
    since = (now - pool.last_scaled_at).total_seconds() if pool.last_scaled_at else math.inf
    # One step is one worker process: its caption slots (a step of one slot would restart the last process, whose
    # slot count changes, at every decision).
    step = pool.slots
    target, reason = pool.desired, ""
    if pool.desired < pool.minimum or pool.desired > pool.maximum:
        target = min(max(pool.desired, pool.minimum), pool.maximum)
        reason = "back within minimum..maximum"
    elif queued > pool.scale_up_threshold and pool.desired < pool.maximum and since >= pool.scale_up_cooldown:
        target, reason = min(pool.desired + step, pool.maximum), f"{queued} jobs waiting > {pool.scale_up_threshold}"
    elif queued < pool.scale_down_threshold and pool.desired > pool.minimum and since >= pool.scale_down_cooldown:
        target, reason = max(pool.desired - step, pool.minimum), f"{queued} jobs waiting < {pool.scale_down_threshold}"
    if target == pool.desired:
        return None
    with transaction.atomic():
        # Conditional on the count we decided from, so two deciders never both apply a step.
        changed = WorkerPool.objects.filter(pk=pool.pk, desired=pool.desired).update(
            desired=target, last_scaled_at=now, updated_at=now)
        if not changed:
            return None
        FleetEvent.objects.create(kind=FleetEvent.Kind.AUTOSCALE, pool=pool, at=now, reason=reason, figures={
            "queued": queued, "from": pool.desired, "to": target, "scale_up_threshold": pool.scale_up_threshold,
            "scale_down_threshold": pool.scale_down_threshold, "seconds_since_last_change":
                None if since == math.inf else round(since)})
    decision = AutoscaleDecision(pool.name, queued, pool.desired, target, reason)
    pool.desired, pool.last_scaled_at = target, now
    return decision


def pool_backlog(pool: WorkerPool) -> int:
    lengths = broker.queue_lengths()
    return sum(lengths.get(name, 0) for name in pool.queue_names)


@dataclass
class WorkerRow:
    name: str
    host: str
    pid: int | None
    pool: str
    queues: list[str]
    state: str
    alive: bool
    task_id: int | None
    task_running_seconds: float | None
    heartbeat_age_seconds: float | None
    successful: int
    failed: int
    memory_bytes: int | None
    slots: int = 1  # caption slots of the process
    running: list[SlotRow] = field(default_factory=list)  # with several slots: each slot's task

    @property
    def busy_slots(self) -> int:
        return sum(1 for slot in self.running if slot.job_id) if self.slots > 1 else int(self.task_id is not None)


@dataclass
class SlotRow:
    index: int
    job_id: str | None
    task_id: int | None
    running_seconds: float | None


def fleet_workers() -> list[WorkerRow]:
    """The live worker list: rq's registrations plus our liveness keys, O(workers) Redis calls and one query."""
    workers = broker.workers()
    alive = broker.alive_states([worker.name for worker in workers])
    running = {row[0]: row[1:] for row in CaptionTask.objects.filter(
        status=TaskStatus.PROCESSING, worker_name__in=[worker.name for worker in workers]
    ).values_list("worker_name", "pk", "started_at")}
    now = timezone.now()
    rows = []
    for worker in workers:
        state = alive.get(worker.name)
        task = running.get(worker.name)
        heartbeat = worker.last_heartbeat
        slot_rows = [SlotRow(index=entry.get("slot", index), job_id=entry.get("job"),
                             task_id=_task_of(entry.get("job")),
                             running_seconds=max(0.0, time.time() - entry["since"]) if entry.get("since") else None)
                     for index, entry in enumerate((state or {}).get("running") or [])]
        rows.append(WorkerRow(
            name=worker.name, host=worker.hostname or (state or {}).get("host", ""), pid=worker.pid,
            pool=(state or {}).get("pool", ""), queues=worker.queue_names(),
            state=worker.get_state() if state else "lost", alive=state is not None,
            task_id=task[0] if task else None,
            task_running_seconds=(now - task[1]).total_seconds() if task and task[1] else None,
            heartbeat_age_seconds=(now - heartbeat).total_seconds() if heartbeat else None,
            successful=worker.successful_job_count, failed=worker.failed_job_count,
            memory_bytes=(state or {}).get("rss"), slots=int((state or {}).get("slots") or 1), running=slot_rows,
        ))
    return sorted(rows, key=lambda row: (row.pool, row.host, row.name))


def _task_of(job_id: str | None) -> int | None:
    prefix = "caption-"
    if job_id and job_id.startswith(prefix) and job_id[len(prefix):].isdigit():
        return int(job_id[len(prefix):])
    return None


def worker_runs_job(worker, job_id: str) -> bool:
    """Whether ``worker`` is running ``job_id`` now: its current job, or (with several caption slots) the job's own
    hash says it started on this worker and has not ended (written when a slot starts it)."""
    if worker.get_current_job_id() == job_id:
        return True
    status, worker_name = broker.get_connection().hmget(CaptionJob.redis_job_namespace_prefix + job_id, "status",
                                                        "worker_name")
    return status == b"started" and worker_name is not None and worker_name.decode() == worker.name


def _find_worker(worker_name: str):
    for worker in broker.workers():
        if worker.name == worker_name:
            return worker
    raise FleetError(f"No worker named {worker_name!r} is registered")


def worker_restart(*, worker_name: str, user=None, address: str | None = None) -> None:
    """Asks a worker to finish its current job and exit; its supervisor starts a fresh one in its place."""
    worker = _find_worker(worker_name)
    broker.send_worker_shutdown(worker.name)
    FleetEvent.objects.create(kind=FleetEvent.Kind.RESTART_REQUESTED, worker_name=worker.name,
                              host=worker.hostname or "", pid=worker.pid, user=_user(user), reason="worker restart")
    audit(user=user, action="worker_restart", target=worker.name, count=1, address=address)


def pool_restart(*, pool: WorkerPool, user=None, address: str | None = None) -> int:
    """Gracefully restarts every live worker of a pool (each finishes its job first). Returns how many."""
    names = [row.name for row in fleet_workers() if row.pool == pool.name and row.alive]
    for name in names:
        broker.send_worker_shutdown(name)
    FleetEvent.objects.create(kind=FleetEvent.Kind.RESTART_REQUESTED, pool=pool, user=_user(user),
                              reason=f"pool restart ({len(names)} workers)", figures={"workers": len(names)})
    audit(user=user, action="pool_restart", target=pool.name, count=len(names), address=address)
    return len(names)


def worker_stop_job(*, worker_name: str, job_id: str, user=None, address: str | None = None) -> str:
    """Stops ``job_id``, which the operator saw ``worker_name`` running; its task ends FAILED as stopped by an
    operator. Refuses if the worker is now running another job (it finished the one shown and took the next), so
    a stop never lands on a task nobody looked at. rq's stop command names the job too, and the worker ignores it
    if it has moved on in the moment between this check and the command. Returns the job id."""
    worker = _find_worker(worker_name)
    current = worker.get_current_job_id()
    if not current:
        raise FleetError(f"Worker {worker_name!r} is not running a job; nothing stopped")
    if not worker_runs_job(worker, job_id):
        raise FleetError(f"Worker {worker_name} is now running {current}, not {job_id}; nothing stopped")
    broker.send_stop_job(worker.name, job_id)
    FleetEvent.objects.create(kind=FleetEvent.Kind.JOB_STOP_REQUESTED, worker_name=worker.name,
                              host=worker.hostname or "", pid=worker.pid, user=_user(user), reason=f"stop {job_id}")
    audit(user=user, action="job_stop", target=job_id, count=1, detail={"worker": worker.name}, address=address)
    return job_id


def processing_set_suspended(*, suspended: bool, user=None, address: str | None = None) -> None:
    """Suspends (or resumes) all processing: workers finish their current job and take no new one; tasks wait."""
    control.processing_set_suspended_state(suspended=suspended, user=user)
    FleetEvent.objects.create(kind=FleetEvent.Kind.SUSPENDED if suspended else FleetEvent.Kind.RESUMED,
                              user=_user(user), reason="all processing")
    audit(user=user, action="suspend" if suspended else "resume", target="all queues", address=address)


# Before the pauses moved into the database (queues migration 0008), they lived in Redis only: a set of paused
# queue names and rq's suspension key. CARRIED_KEY says they have been carried into the rows of this deployment.
REDIS_PAUSED_KEY = "portal:queues:paused"
REDIS_SUSPENDED_KEY = "rq:suspended"
CARRIED_KEY = "portal:queues:pauses-carried"


def redis_pauses_adopt() -> int:
    """Carries the pauses and the suspension kept in Redis before migration 0008 into the rows, so an upgrade does
    not silently resume what an operator stopped. Run after every migrate (queues.apps), it acts once: it marks the
    carry-over done in Redis (CARRIED_KEY). A migrate that could not reach Redis, or that failed after applying 0008
    (Django then sends no post_migrate), leaves it to the next migrate. Returns how many rows it paused."""
    try:
        connection = broker.get_connection()
        if connection.exists(CARRIED_KEY):
            return 0
        paused = {name.decode() for name in connection.smembers(REDIS_PAUSED_KEY)}
        suspended = bool(connection.exists(REDIS_SUSPENDED_KEY))
    except Exception as error:
        logger.warning("the pauses kept in Redis before the move of pauses into the database could not be read "
                       "(%s); they are carried over after the next migrate that reaches Redis", error)
        return 0
    names = sorted(paused & set(QUEUE_ORDER)) + ([QueueState.ALL] if suspended else [])
    for name in names:
        QueueState.objects.update_or_create(queue=name, defaults={"paused": True})
    try:
        connection.set(CARRIED_KEY, timezone.now().isoformat())
    except Exception as error:  # carried, not marked: the next migrate carries the same pauses again (harmless)
        logger.warning("the carry-over of the Redis pauses could not be marked done (%s)", error)
    return len(names)
