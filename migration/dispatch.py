"""The dispatch mode: which system new tasks go to, submission pauses, and the fallback to the database poller.

``ModePolicy`` is the policy queues asks (settings.TASK_DISPATCH_POLICY, see queues.dispatch). It reads the one
``SystemMode`` row on every submission (a primary-key read), so a pause or a mode change holds from the moment it
commits:

- ``legacy``: new tasks go to the database poller; ``rq``: to RQ; ``hybrid``: each new task goes to one of them,
  RQ for ``hybrid_rq_percent`` of them. A task's ``dispatch`` column says which; only that system can claim it
  (RQ's claim expects ``dispatch = rq``, the poller's ``database`` or ``fallback``), so no task runs in both.
- **Submission paused**: new tasks are committed with ``dispatch = held``; nobody claims them. Resuming (or the
  pause's end time passing, noticed by the relay) releases them to the mode's systems.
- **Fallback**: the relay calls ``maintain`` every pass. When Redis has been unreachable for ``fallback_timeout``
  seconds (on the database's clock) and the fallback is enabled, queued unpublished RQ tasks, and new ones, go to
  the database poller as ``dispatch = fallback``, and ``processes`` asks each supervisor to run a poller if none is
  alive. When Redis answers again the fallback ends: fallback tasks still queued go back to RQ (a conditional
  update, so a task the poller is claiming at that moment stays with the poller), and the pollers are stopped
  gracefully. Published tasks are never moved (their job may be in Redis): only unpublished ones.

Moving tasks between the systems (``tasks_move``) is always a conditional update on ``status = QUEUED`` and the
old dispatch, and clears ``published_at``; jobs of tasks moved away from RQ are deleted from Redis afterwards (a
stale entry a worker pops claims nothing anyway).
"""

from __future__ import annotations

import logging
import random
import re
import socket
import uuid
from datetime import timedelta

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from migration.models import LegacyWorker, MigrationEvent, Mode, SystemMode, polling_errors
from migration.state import blocking_run, mode_locked, open_run, pollers_blocked, system_mode, system_mode_ensure
from queues.audit import audit, audit_channel
from queues.dispatch import DispatchPolicy, DispatchStatus, PollersState
from queues.models import (
    POLLED_DISPATCH,
    CaptionTask,
    Dispatch,
    TaskStatus,
    UtcNow,
    database_now,
    database_now_expression,
)
from queues.services import tasks_publish

logger = logging.getLogger("migration.dispatch")

MOVE_BATCH = 1000


def targets_for(row: SystemMode, count: int) -> list[str]:
    if row.paused_now():
        return [Dispatch.HELD] * count
    if row.fallback_active and row.mode != Mode.LEGACY:
        return [Dispatch.FALLBACK] * count
    if row.mode == Mode.LEGACY:
        return [Dispatch.DATABASE] * count
    if row.mode == Mode.RQ:
        return [Dispatch.RQ] * count
    share = row.hybrid_rq_percent / 100
    return [Dispatch.RQ if random.random() < share else Dispatch.DATABASE for _ in range(count)]


class ModePolicy(DispatchPolicy):
    def assign(self, count: int) -> list[str]:
        return targets_for(system_mode(), count)

    def maintain(self, *, redis_up: bool) -> None:
        fallback_maintain(redis_up=redis_up)
        row = system_mode()
        held_release(row)
        if redis_up:
            stragglers_sweep(row)

    def processes(self, *, running: set[str]) -> dict[str, list[str]]:
        """A poller on this host while the fallback is on (the one already running, else a new one if no poller
        is alive anywhere). Once it is off, the supervisor stops its poller gracefully: the task in hand finishes
        there, the queued ones are back with RQ."""
        if not system_mode().fallback_active or pollers_blocked():
            return {}
        mine = sorted(name for name in running if name.startswith("poller."))
        if mine:
            return {mine[0]: _poller_arguments(mine[0])}
        if legacy_workers_alive().exists():
            return {}
        name = f"poller.{socket.gethostname()[:120]}.fallback.{uuid.uuid4().hex[:6]}"
        return {name: _poller_arguments(name)}

    def status(self) -> DispatchStatus:
        row = system_mode()
        return DispatchStatus(mode=row.mode, fallback_active=row.fallback_active,
                              submission_paused=row.paused_now(), paused_reason=row.paused_reason,
                              paused_until=row.paused_until.isoformat() if row.paused_until else None)

    def pollers_state(self) -> PollersState:
        row = system_mode()
        waiting = CaptionTask.objects.filter(status=TaskStatus.QUEUED, dispatch__in=POLLED_DISPATCH).count()
        blocking = blocking_run()
        return PollersState(needed=bool(waiting) or row.mode != Mode.RQ or row.fallback_active,
                            alive=legacy_workers_alive().count(), waiting=waiting, blocked_by=_blocked_by(blocking),
                            blocked_for_now=bool(blocking and blocking.state == blocking.State.RUNNING))


    def tasks_pinned(self) -> tuple[int, str]:
        run = open_run()
        if run is None or not run.baseline:
            return 0, ""
        return int(run.baseline["max_id"]), (f"{run} verifies tasks up to #{run.baseline['max_id']} against the "
                                              "baseline it took; requeue, reprioritise or clean them up once it has "
                                              "ended (resume it, or roll it back)")

    def pollers(self) -> list[dict]:
        alive = set(legacy_workers_alive().values_list("pk", flat=True))
        return [{"name": poller.name, "host": poller.host, "pid": poller.pid, "alive": poller.pk in alive,
                 "fallback": poller.fallback, "task_id": poller.current_task_id, "processed": poller.processed,
                 "failed": poller.failed, "started_at": poller.started_at, "heartbeat_at": poller.heartbeat_at}
                for poller in LegacyWorker.objects.filter(stopped_at__isnull=True).order_by("name")[:200]]


def _blocked_by(run) -> str:
    if run is None:
        return ""
    if run.state == run.State.RUNNING:
        return f"{run} has drained the pollers and is moving their tasks to RQ"
    return (f"{run} is {run.get_state_display().lower()} after draining the pollers: resume it (or roll it back) "
            "for its tasks to run")


def _poller_arguments(name: str) -> list[str]:
    return ["run_legacy_worker", "--name", name, "--fallback"]


def legacy_workers_alive():
    """Pollers whose heartbeat is recent (database clock) and that have not stopped."""
    recent = database_now_expression(-LegacyWorker.ALIVE_SECONDS)
    return LegacyWorker.objects.filter(stopped_at__isnull=True, heartbeat_at__gte=recent)


def legacy_workers_stale():
    """Poller registrations not closed whose heartbeat has stopped (the process died without saying so). A plain
    condition, not a subquery on the same table: MySQL refuses to update a table it selects from (error 1093)."""
    from django.db.models import Q

    recent = database_now_expression(-LegacyWorker.ALIVE_SECONDS)
    return LegacyWorker.objects.filter(Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=recent),
                                       stopped_at__isnull=True)


# --- operator services -----------------------------------------------------------------------------------------

def run_in_charge(*, exclude=None):
    """The open migration or rollback run (if any, other than ``exclude``): while one is open, the mode and the
    submission pause are its to change. Its phases set the mode, pause submission (taking over a pause already in
    force, end time removed, so that it cannot lapse mid-run) and resume it; anyone else is refused until the run
    ends (resumed to its end, or rolled back)."""
    run = open_run()
    return None if run is None or (exclude is not None and run.pk == exclude.pk) else run


class RunInCharge(ValidationError):
    """Refused because a migration run is open and does this itself: a conflict with the run, not bad input (the
    HTTP calls answer it 409, the forms show it like any other ValidationError)."""


def refuse_during_run(what: str, field: str, run=None) -> None:
    """RunInCharge (on ``field``) while a run other than ``run`` is open: it ``what`` itself."""
    current = run_in_charge(exclude=run)
    if current is not None:
        raise RunInCharge({field: f"{current} is {current.get_state_display().lower()}: it {what} itself. Resume "
                                      "it to its end, or roll it back, first."})


def mode_set(*, mode: str, user, hybrid_rq_percent: int | None = None, address: str | None = None,
             run=None, executing: bool = False) -> SystemMode:
    """Sets where new tasks go. Tasks already dispatched stay where they are (the migration run moves them).
    Refused while a run other than ``run`` is open (``run_in_charge``). ``executing``: this process executes ``run``
    (a phase of it), which must still be so when the row is locked (``state.run_fenced``)."""
    refuse_during_run("sets the mode", "mode", run)
    if mode not in Mode.values:
        raise ValidationError({"mode": f"Unknown mode {mode!r}: choose one of {', '.join(Mode.values)}."})
    if hybrid_rq_percent is not None and not 0 <= hybrid_rq_percent <= 100:
        raise ValidationError({"hybrid_rq_percent": "The RQ share must be between 0 and 100 percent."})
    if errors := polling_errors(mode=mode):
        raise ValidationError(errors)
    with transaction.atomic():
        row = mode_locked(run if executing else None)
        previous = row.mode, row.hybrid_rq_percent
        row.mode = mode
        if hybrid_rq_percent is not None:
            row.hybrid_rq_percent = hybrid_rq_percent
        row.changed_at, row.changed_by = timezone.now(), person(user)
        row.save()
        figures = {"from": previous[0], "to": mode, "hybrid_rq_percent": row.hybrid_rq_percent}
        MigrationEvent.objects.create(kind=MigrationEvent.Kind.MODE_CHANGED, user=person(user),
                                      detail=f"{previous[0]} -> {mode}", figures=figures)
        if person(user) or audit_channel():
            audit(user=user, action="dispatch_mode", target=mode, detail=figures, address=address)
    return row


DURATION = re.compile(r"^(\d+)\s*([a-z]+)$")
# 90s, 30m, 2h, 1d as the admin writes them; "2 hours", "30 minutes" as the old system's runbooks do.
DURATION_UNITS = {**dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1),
                  **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60),
                  **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600),
                  **dict.fromkeys(("d", "day", "days"), 86400)}


PAUSE_LONGEST = timedelta(days=365)


def duration_parse(text: str) -> timedelta:
    """A pause's length as operators write it: 90s, 30m, 2h or 1d (or "2 hours", "30 minutes"), at most a year.
    ValueError for anything else."""
    match = DURATION.match(text.strip().lower())
    if not match or int(match.group(1)) == 0 or match.group(2) not in DURATION_UNITS:
        raise ValueError(f"{text!r} is not a positive duration such as 90s, 30m, 2h, 1d or \"2 hours\"")
    seconds = int(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds > PAUSE_LONGEST.total_seconds():
        raise ValueError(f"{text!r} is longer than a year (365d); pause without a length to hold until resumed")
    return timedelta(seconds=seconds)


def submission_pause(*, reason: str, user, duration: timedelta | None = None,
                     address: str | None = None, run=None) -> SystemMode:
    """Holds new submissions (accepted and committed, dispatched to nobody) until resumed or ``duration`` ends.
    Refused while a run other than ``run`` is open (``run_in_charge``)."""
    refuse_during_run("pauses and resumes submission", "reason", run)
    reason = (reason or "").strip()
    if not reason:
        raise ValidationError({"reason": "Say why submission is paused (it is shown in the admin and in health)."})
    if duration is not None and duration.total_seconds() <= 0:
        raise ValidationError({"duration": "The pause must last a positive time."})
    with transaction.atomic():
        row = mode_locked()
        now = timezone.now()
        row.submission_paused, row.paused_reason, row.paused_at = True, reason[:300], now
        row.paused_until = now + duration if duration else None
        row.changed_at, row.changed_by = now, person(user)
        row.save()
        detail = reason[:300] + (f" (until {row.paused_until:%Y-%m-%d %H:%M:%S} UTC)" if row.paused_until else "")
        MigrationEvent.objects.create(kind=MigrationEvent.Kind.SUBMISSION_PAUSED, user=person(user), detail=detail)
        if person(user) or audit_channel():
            audit(user=user, action="submission_pause", target=reason[:300],
                  detail={"until": row.paused_until.isoformat() if row.paused_until else None}, address=address)
    return row


def submission_resume(*, user, reason: str = "", address: str | None = None, run=None,
                      executing: bool = False) -> int:
    """Ends a pause and releases the held tasks to the mode's systems. Returns how many were released. Refused
    while a run other than ``run`` is open (``run_in_charge``); ``executing`` as for ``mode_set``."""
    refuse_during_run("pauses and resumes submission", "submission", run)
    with transaction.atomic():
        row = mode_locked(run if executing else None)
        was_paused = row.submission_paused
        row.submission_paused, row.paused_until = False, None
        row.changed_at, row.changed_by = timezone.now(), person(user)
        row.save()
    released = tasks_release_held()
    if was_paused or released:
        MigrationEvent.objects.create(kind=MigrationEvent.Kind.SUBMISSION_RESUMED, user=person(user),
                                      detail=reason or "resumed", figures={"released": released})
        if person(user) or audit_channel():
            audit(user=user, action="submission_resume", count=released, address=address)
    return released


def submission_take_over(*, run, user) -> str:
    """The run's own pause, by the process that executes it (fenced: ``state.run_fenced``): submission paused (or a
    pause already in force kept, its end time removed so that it cannot lapse mid-run, its reason recorded). Returns
    what was done, for the run's log."""
    with transaction.atomic():
        row = mode_locked(run)
        if not row.paused_now():
            was = ""
        else:
            was = row.paused_reason + (f" (until {row.paused_until:%Y-%m-%d %H:%M:%S} UTC)" if row.paused_until
                                       else "")
        now = timezone.now()
        reason = f"{run} in progress" + (f"; paused before it: {was}" if was else "")
        row.submission_paused, row.paused_reason, row.paused_until = True, reason[:300], None
        row.paused_at = row.paused_at if was else now
        row.changed_at, row.changed_by = now, person(user)
        row.save()
        MigrationEvent.objects.create(kind=MigrationEvent.Kind.SUBMISSION_PAUSED, user=person(user),
                                      detail=reason[:500])
        if person(user) or audit_channel():
            audit(user=user, action="submission_pause", target=reason[:300], detail={"until": None, "run": run.pk})
    if was:
        return f"submission was already paused ({was}); {run} holds that pause now, with no end time"
    return "submission paused: new tasks are held until the run resumes it"


def held_release(row: SystemMode | None = None) -> int:
    """Whenever submission is open, tasks still held go to the mode's systems: a pause whose end time has passed is
    ended here (the relay's pass, and the database poller's, which may be all that runs in legacy mode); and held
    rows left behind with submission open (a submission that read "paused" and committed after the resume had
    released what it could see, a restored backup) are released. Cheap when there is nothing to do: one read of the
    mode row, one indexed existence check. Returns how many were released."""
    row = row or system_mode()
    if row.paused_now():
        return 0
    if row.submission_paused:  # a pause's own end, even with a run open (a run's own pause has no end time)
        return submission_resume(user=None, reason="the pause's end time has passed", run=run_in_charge())
    if not CaptionTask.objects.filter(dispatch=Dispatch.HELD, status=TaskStatus.QUEUED).exists():
        return 0
    released = tasks_release_held()
    if released:
        MigrationEvent.objects.create(kind=MigrationEvent.Kind.TASKS_MOVED, detail=f"held -> {row.mode}",
                                      figures={"released": released, "mode": row.mode,
                                               "why": "held with submission open"})
        logger.warning("%d task(s) were held with submission open (committed after the resume): released", released)
    return released


def tasks_held_open() -> int:
    """Held tasks that nothing holds any more: submission is open (verify counts them; the next pass releases)."""
    if system_mode().paused_now():
        return 0
    return CaptionTask.objects.filter(dispatch=Dispatch.HELD, status=TaskStatus.QUEUED).count()


def tasks_release_held() -> int:
    """Gives every held task its system (per the current mode), in batches, then publishes the RQ ones."""
    released = 0
    while True:
        ids = list(CaptionTask.objects.filter(dispatch=Dispatch.HELD, status=TaskStatus.QUEUED)
                   .order_by("pk").values_list("pk", flat=True)[:MOVE_BATCH])
        if not ids:
            break
        row = system_mode()
        if row.paused_now():
            break  # paused again meanwhile
        targets = targets_for(row, len(ids))
        by_target: dict[str, list[int]] = {}
        for task_id, target in zip(ids, targets):
            by_target.setdefault(target, []).append(task_id)
        for target, task_ids in by_target.items():
            released += CaptionTask.objects.filter(pk__in=task_ids, dispatch=Dispatch.HELD,
                                                   status=TaskStatus.QUEUED).update(
                dispatch=target, published_at=None, publish_after=timezone.now())
        rq_ids = by_target.get(Dispatch.RQ, [])
        if rq_ids:
            tasks_publish(tasks=CaptionTask.objects.filter(pk__in=rq_ids).values_list("pk", "priority"))
    return released


def tasks_move(*, source: tuple[str, ...], target: str, ids: list[int] | None = None,
               published: bool = False) -> list[tuple[int, str]]:
    """Moves queued tasks from the ``source`` systems to ``target``; returns the (id, priority) pairs moved.

    ``ids``: only these; ``published``: also tasks with a job in Redis (a rollback, which then deletes the jobs),
    otherwise only unpublished ones. A conditional update per batch: a task claimed meanwhile is not moved.
    """
    queryset = CaptionTask.objects.filter(status=TaskStatus.QUEUED, dispatch__in=source)
    if not published:
        queryset = queryset.filter(published_at__isnull=True)
    if ids is not None:
        queryset = queryset.filter(pk__in=ids)
    rows = list(queryset.order_by("pk").values_list("pk", "priority")[:MOVE_BATCH])
    if not rows:
        return []
    moved_ids = [pk for pk, _ in rows]
    with transaction.atomic():
        # publish_after stays: a retry moved to the other system still waits out its backoff there.
        again = CaptionTask.objects.filter(pk__in=moved_ids, status=TaskStatus.QUEUED, dispatch__in=source)
        if not published:
            again = again.filter(published_at__isnull=True)  # published meanwhile: its job is in Redis, it stays
        again.update(dispatch=target, published_at=None)
        moved = list(CaptionTask.objects.filter(pk__in=moved_ids, dispatch=target, status=TaskStatus.QUEUED)
                     .values_list("pk", "priority"))
    return moved


def stragglers_sweep(row: SystemMode) -> int:
    """Outside migration runs, queued unpublished tasks of the system the mode no longer uses go to the one it uses:
    in mode ``rq``, database tasks (a poller's retry after the drain, a restored backup) to RQ; in mode ``legacy``,
    RQ tasks (a retry coming back after a rollback) to the database poller. During a run, the run moves them."""
    if row.mode == Mode.HYBRID or row.fallback_active:
        return 0
    source, target = ((Dispatch.DATABASE,), Dispatch.RQ) if row.mode == Mode.RQ else ((Dispatch.RQ,), Dispatch.DATABASE)
    if not CaptionTask.objects.filter(status=TaskStatus.QUEUED, dispatch__in=source,
                                      published_at__isnull=True).exists() or open_run() is not None:
        return 0
    moved = _move_all(source, target)
    if moved:
        MigrationEvent.objects.create(kind=MigrationEvent.Kind.TASKS_MOVED, detail=f"{source[0]} -> {target}",
                                      figures={"moved": moved, "mode": row.mode})
    return moved


# --- the fallback ------------------------------------------------------------------------------------------------

def fallback_maintain(*, redis_up: bool) -> None:
    """One relay pass' look at Redis (see the module docstring). Safe from several processes at once."""
    from django.db import connection

    row = system_mode()
    if redis_up:
        if row.redis_down_since is not None or row.fallback_active:
            _fallback_end(row)
        else:
            # Fallback tasks that came back to the queue after the fallback ended (a retry on the poller).
            _move_all((Dispatch.FALLBACK,), _after_fallback(row))
        return
    now = database_now(connection)
    if row.redis_down_since is None:
        system_mode_ensure()
        SystemMode.objects.filter(pk=1, redis_down_since__isnull=True).update(redis_down_since=UtcNow())
        return
    if row.fallback_active:
        moved = _move_all((Dispatch.RQ,), Dispatch.FALLBACK)
        if moved:
            logger.warning("fallback: %d more task(s) sent to the database poller", moved)
        return
    down_for = (now - row.redis_down_since).total_seconds()
    if not row.fallback_enabled or row.mode == Mode.LEGACY or down_for < row.fallback_timeout:
        return
    if SystemMode.objects.filter(pk=1, fallback_active=False).update(fallback_active=True, fallback_since=UtcNow()):
        moved = _move_all((Dispatch.RQ,), Dispatch.FALLBACK)
        MigrationEvent.objects.create(kind=MigrationEvent.Kind.FALLBACK_STARTED,
                                      detail=f"Redis unreachable for {down_for:.0f} s",
                                      figures={"moved": moved, "down_for_seconds": round(down_for, 1)})
        logger.warning("Redis unreachable for %.0f s: fallback to the database poller (%d task(s) moved)",
                       down_for, moved)


def _fallback_end(row: SystemMode) -> None:
    was_active = row.fallback_active
    if not SystemMode.objects.filter(pk=1).exclude(redis_down_since=None, fallback_active=False).update(
            redis_down_since=None, fallback_active=False, fallback_since=None):
        return
    if was_active:
        target = _after_fallback(row)
        moved = _move_all((Dispatch.FALLBACK,), target)
        MigrationEvent.objects.create(kind=MigrationEvent.Kind.FALLBACK_ENDED, detail="Redis answers again",
                                      figures={"moved": moved, "to": target})
        logger.warning("Redis answers again: fallback over, %d queued task(s) to %s", moved, target)


def _after_fallback(row: SystemMode) -> str:
    """Where fallback tasks go once Redis is back: RQ, unless the mode became legacy meanwhile (a rollback)."""
    return Dispatch.DATABASE if row.mode == Mode.LEGACY else Dispatch.RQ


def _move_all(source: tuple[str, ...], target: str) -> int:
    total = 0
    while True:
        moved = tasks_move(source=source, target=target)
        if not moved:
            return total
        total += len(moved)
        if target == Dispatch.RQ:
            # Only those due: a retry still in its backoff waits for it, then the relay publishes it.
            due = CaptionTask.objects.filter(pk__in=[pk for pk, _ in moved], publish_after__lte=timezone.now())
            tasks_publish(tasks=list(due.values_list("pk", "priority")))


def person(user):
    """The user to record, or None for a command or the system."""
    return user if getattr(user, "pk", None) else None
