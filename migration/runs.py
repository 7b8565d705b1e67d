"""Migration runs: the move from the database poller to RQ (and back) as ordered, resumable, recorded phases.

A ``MigrationRun`` has one ``MigrationPhase`` row per phase, in order. Executing a run (``run_execute``) takes the
run's lease (``executor`` and ``heartbeat_at`` on the run row, the database's clock, renewed by a thread), then runs
each phase not yet done: the phase row records its start, end, attempts, progress, counts, actor and log lines. A
phase that fails stops the run with its reason (``failed``); ``resume`` runs it again, and every phase is written so
that running it again is safe:

==================  =============================================================================================
preflight           Redis, eviction policy, memory, database, counts, backup disk, RQ workers (migration.preflight)
backup              every task row to a portable file with a manifest of counts and checksums (migration.backup)
hybrid              optional soak: mode ``hybrid`` for ``soak_seconds``; skipped when 0
pause_submission    new submissions are held (committed, dispatched to nobody)
drain               pollers are asked to stop after their task in hand; waits until no polled task runs; pollers
                    (on any host, through their rows) that overrun ``drain_timeout`` are told to give their attempt
                    back and exit; a dead poller's attempts are given back once their lease has run out
migrate             queued database tasks to RQ in batches of ``batch_size``, from the checkpoint (below)
verify              jobs against tasks, nothing left behind, counts and checksums against the baseline (migration.verify)
cutover             mode ``rq``
resume_submission   held tasks are released (to RQ)
validate            ``validate_tasks`` test tasks must complete through RQ within ``validate_timeout`` seconds
cleanup             poller registrations of stopped pollers are closed; what remains is reported
==================  =============================================================================================

**The migrate checkpoint.** The phase walks the task table by primary key from ``checkpoint``, a batch of
``batch_size`` rows at a time. Each batch is one transaction that moves the batch's queued database tasks
(``dispatch`` database -> rq, conditional on still being queued there, ``published_at`` stamped), advances
``checkpoint`` and records the moved ids as ``checkpoint_window``; then their jobs go to Redis in one MULTI/EXEC (all
or none, deterministic ids ``caption-<id>``). A process killed at any point leaves either a batch not moved (it is
taken again), or a batch moved with its window recorded: the resumed phase looks at the window's jobs and publishes
them if they are missing. Nothing is published twice and nothing is lost.

**Rollback** is a run of its own (kind ``rollback``, ``rollback_of`` the run it undoes): pause submission, mode
``legacy``, every queued RQ task back to the database poller (jobs deleted from Redis), wait for RQ workers to finish
what they run (a retry coming back is moved too), verify, resume submission. The undone run ends ``rolled_back``.
Creating the rollback fences the run it undoes: its lease is taken away in the same transaction, so a process still
executing it (frozen past its lease) stops at its next check instead of carrying on after the rollback.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.db.models import Q
from django.utils import timezone

from migration import dispatch
from migration.backup import BackupError, backup_write
from migration.dispatch import person
from migration.legacy import FORCE_GRACE_SECONDS
from migration.models import POLLING_DISABLED, LegacyWorker, MigrationLogLine, MigrationPhase, MigrationRun, Mode
from migration.preflight import preflight_report
from migration.state import LeaseLost, mode_locked, open_run
from migration.verify import baseline_take, verification
from queues import broker
from queues.audit import audit_channel
from queues.fleet.reconcile import TASK_LEASE_SECONDS, task_redrive
from queues.models import (
    POLLED_DISPATCH,
    CaptionTask,
    Dispatch,
    TaskStatus,
    UtcNow,
    database_now,
    database_now_expression,
)

logger = logging.getLogger("migration.runs")

DEFAULT_OPTIONS = {"soak_seconds": 0, "batch_size": 1000, "drain_timeout": 120, "validate_tasks": 5,
                   "validate_timeout": 120, "rollback_timeout": 300}
OPTION_LIMITS = {"soak_seconds": (0, 7 * 86400), "batch_size": (1, 10_000), "drain_timeout": (1, 86400),
                 "validate_tasks": (0, 1000), "validate_timeout": (1, 86400), "rollback_timeout": (1, 86400)}


class RunError(Exception):
    """A run cannot be started, resumed or rolled back now; the message says why."""


class PhaseFailed(Exception):
    """A phase found a reason to stop the run (the message is the reason shown to the operator)."""


@dataclass
class PhaseContext:
    run: MigrationRun
    phase: MigrationPhase
    actor: object
    executor: str
    on_progress: Callable[[MigrationPhase], None] | None = None
    on_log: Callable[[str, str], None] | None = None
    _last_progress: float = 0.0

    @property
    def options(self) -> dict:
        return {**DEFAULT_OPTIONS, **(self.run.options or {})}

    def log(self, message: str, level: str = MigrationLogLine.Level.INFO) -> None:
        MigrationLogLine.objects.create(run=self.run, phase=self.phase, level=level, message=message)
        getattr(logger, "warning" if level != "info" else "info")("run %s %s: %s", self.run.pk, self.phase.name,
                                                                  message)
        if self.on_log:
            self.on_log(level, message)

    def progress(self, done: int, total: int, *, force: bool = False) -> None:
        self.phase.progress_done, self.phase.progress_total = done, total
        if force or time.monotonic() - self._last_progress >= 0.5:
            self._last_progress = time.monotonic()
            self.check()
            MigrationPhase.objects.filter(pk=self.phase.pk).update(progress_done=done, progress_total=total)
        if self.on_progress:
            self.on_progress(self.phase)

    def check(self) -> None:
        _holds(self.run, self.executor)

    def wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        self.check()


# --- phases of a migration ---------------------------------------------------------------------------------------

def phase_preflight(ctx: PhaseContext) -> dict:
    report = preflight_report()
    MigrationRun.objects.filter(pk=ctx.run.pk).update(preflight=report.as_dict())
    for check in report.checks:
        ctx.log(f"{check.name}: {'ok' if check.ok else 'FAILED'}: {check.detail}",
                MigrationLogLine.Level.INFO if check.ok else MigrationLogLine.Level.ERROR)
    if not report.ok:
        raise PhaseFailed("preflight failed: " + "; ".join(check.detail for check in report.failures))
    return {"checks": len(report.checks)}


def phase_backup(ctx: PhaseContext) -> dict:
    try:
        manifest = backup_write(label=f"run{ctx.run.pk}", on_rows=lambda done, total: ctx.progress(done, total))
    except BackupError as error:
        raise PhaseFailed(str(error)) from None
    ctx.log(f"backup of {manifest['rows']} task(s) written to {manifest['path']}"
            + (f"; {len(manifest['pruned'])} older backup(s) deleted (MIGRATION_BACKUP_KEEP="
               f"{settings.MIGRATION_BACKUP_KEEP})" if manifest["pruned"] else ""))
    return {"rows": manifest["rows"], "path": manifest["path"], "by_status": manifest["by_status"]}


def phase_hybrid(ctx: PhaseContext) -> dict | None:
    soak = int(ctx.options["soak_seconds"])
    if soak <= 0:
        return None  # skipped
    dispatch.mode_set(mode=Mode.HYBRID, user=ctx.actor, run=ctx.run, executing=True)
    started = timezone.now()
    ctx.log(f"hybrid mode for {soak} s: new tasks split between RQ and the database poller")
    for elapsed in range(soak):
        ctx.progress(elapsed, soak)
        ctx.wait(1)
    ctx.progress(soak, soak, force=True)
    counts = {system: CaptionTask.objects.filter(dispatch=system, created_at__gte=started).count()
              for system in (Dispatch.RQ, Dispatch.DATABASE)}
    failed = CaptionTask.objects.filter(created_at__gte=started, status=TaskStatus.FAILED).count()
    ctx.log(f"soak over: {counts[Dispatch.RQ]} new task(s) to RQ, {counts[Dispatch.DATABASE]} to the database "
            f"poller, {failed} failed")
    return {"new_rq": counts[Dispatch.RQ], "new_database": counts[Dispatch.DATABASE], "failed": failed}


def phase_pause_submission(ctx: PhaseContext) -> dict:
    ctx.log(dispatch.submission_take_over(run=ctx.run, user=ctx.actor))
    return {}


def phase_drain(ctx: PhaseContext) -> dict:
    timeout = float(ctx.options["drain_timeout"])
    asked = LegacyWorker.objects.filter(stopped_at__isnull=True).update(stop_requested=True)
    ctx.log(f"{asked} database poller(s) asked to stop after their task in hand")
    started = time.monotonic()
    total = _drain_left()
    while _drain_left() and time.monotonic() - started < timeout:
        left = _drain_left()
        total = max(total, left)
        ctx.progress(total - left, total)
        ctx.wait(0.5)
    forced = _force_pollers(ctx) if _drain_left() else []
    running = _polled_running()
    alive = list(dispatch.legacy_workers_alive().values_list("name", flat=True))
    if running or alive:
        holders = sorted(set(CaptionTask.objects.filter(status=TaskStatus.PROCESSING, dispatch__in=POLLED_DISPATCH)
                             .values_list("worker_name", flat=True)) | set(alive))
        raise PhaseFailed(f"database poller(s) {', '.join(holders)} still run ({running} task(s) in hand) after "
                          f"{timeout:g} s and a forced stop; stop them on their hosts (SIGTERM twice, SIGKILL if that does "
                          "not end them), then resume the run")
    ctx.progress(total, total, force=True)
    return {"in_hand_at_start": total, "stopped_by_force": forced}


def _drain_left() -> int:
    """Tasks the pollers still run, plus pollers still alive (they may claim one more before they stop)."""
    return _polled_running() + dispatch.legacy_workers_alive().count()


def _polled_running() -> int:
    return CaptionTask.objects.filter(status=TaskStatus.PROCESSING, dispatch__in=POLLED_DISPATCH).count()


def _force_pollers(ctx: PhaseContext) -> list[str]:
    """Pollers that overran the drain timeout, on whatever host: ``stop_forced`` on their rows, which each poller
    reads at its next beat (migration.legacy). It gives its attempt back without using a retry and exits, or, stuck,
    kills itself after FORCE_GRACE_SECONDS. A poller whose heartbeat has gone stale (killed, frozen, its host
    gone) has its attempts given back here once their leases have run out (_give_back_stale); a frozen one that
    wakes finds its claim taken, writes nothing and stops."""
    names = list(dispatch.legacy_workers_alive().values_list("name", flat=True))
    LegacyWorker.objects.filter(name__in=names).update(stop_forced=True)
    ctx.log(f"drain timeout: {len(names)} database poller(s) told to give their task back and exit at once: "
            f"{', '.join(names) or '-'}", MigrationLogLine.Level.WARNING)
    deadline = time.monotonic() + FORCE_GRACE_SECONDS + max(LegacyWorker.ALIVE_SECONDS, TASK_LEASE_SECONDS) + 15
    while _drain_left() and time.monotonic() < deadline:
        for poller in dispatch.legacy_workers_stale():
            _give_back_stale(ctx, poller)
        _give_back_orphans(ctx)
        ctx.wait(0.5)
    return names


def _give_back_orphans(ctx: PhaseContext) -> None:
    """Polled attempts whose poller has no open registration (it exited on an error and closed its row with the
    task still in hand): given back once their lease has run out, as a stale poller's are."""
    from queues.fleet.reconcile import REDRIVE_FIELDS

    alive = dispatch.legacy_workers_alive().values_list("name", flat=True)
    stale = dispatch.legacy_workers_stale().values_list("name", flat=True)
    orphans = CaptionTask.objects.filter(status=TaskStatus.PROCESSING, dispatch__in=POLLED_DISPATCH) \
        .exclude(worker_name__in=list(alive)).exclude(worker_name__in=list(stale)).only(*REDRIVE_FIELDS)
    for task in orphans:
        if task_redrive(task=task, reason="its poller had exited with it in hand", give_back=True,
                        lease_expired_only=True, judged_at=database_now(connection)):
            ctx.log(f"task {task.pk} of poller {task.worker_name}, which had exited with it in hand, was given back",
                    MigrationLogLine.Level.WARNING)


def _give_back_stale(ctx: PhaseContext, poller: LegacyWorker) -> None:
    """A poller that stopped answering (killed, frozen, its host gone): each attempt it held goes back to the queue
    without using a retry (the drain stopped it, not the task) once the attempt's own lease has run out, as the
    reconciler judges it; then the registration is closed."""
    from queues.fleet.reconcile import REDRIVE_FIELDS

    held = CaptionTask.objects.filter(status=TaskStatus.PROCESSING, worker_name=poller.name).only(*REDRIVE_FIELDS)
    for task in held:
        task_redrive(task=task, reason="its poller stopped answering during the migration's drain", give_back=True,
                     lease_expired_only=True, judged_at=database_now(connection))
    if CaptionTask.objects.filter(status=TaskStatus.PROCESSING, worker_name=poller.name).exists():
        return  # a lease still runs: judged again on the next pass
    LegacyWorker.objects.filter(pk=poller.pk, stopped_at__isnull=True).update(stopped_at=timezone.now())
    ctx.log(f"poller {poller.name} on {poller.host} stopped answering; its task(s) were given back",
            MigrationLogLine.Level.WARNING)


def phase_migrate(ctx: PhaseContext) -> dict:
    run = ctx.run
    if not run.baseline:
        run.baseline = baseline_take(at=database_now(connection))
        MigrationRun.objects.filter(pk=run.pk).update(baseline=run.baseline)
        ctx.log(f"baseline: {sum(g['count'] for g in run.baseline['by_status'].values())} task(s), "
                f"ids up to {run.baseline['max_id']}")
    repaired = _republish_window(ctx)
    batch_size = int(ctx.options["batch_size"])
    done = int(ctx.phase.counts.get("migrated", 0)) if ctx.phase.counts else 0
    earlier = done  # moved by earlier attempts of this phase
    # Progress is the walk through the table by id (what takes the time), not the tasks moved: queued tasks may sit
    # anywhere in it (clustered at the newest ids, a bar of moved tasks would sit near 0 % for most of the walk).
    low = (CaptionTask.objects.order_by("pk").values_list("pk", flat=True).first() or 1) - 1
    high = CaptionTask.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    walk = max(high - low, 1)

    def walked() -> int:
        return min(max(run.checkpoint - low, 0), walk)

    ctx.progress(walked(), walk, force=True)
    while True:
        # The next rows by primary key, whatever their state: a range read that costs the same at any depth of the
        # backlog (a query for "queued database tasks after the checkpoint" made SQLite walk the dispatch index over
        # every remaining task, each batch). Rows not queued for the poller are passed over.
        rows = list(CaptionTask.objects.filter(pk__gt=run.checkpoint).order_by("pk")
                    .values_list("pk", "status", "dispatch")[:batch_size])
        if rows:
            ids = [pk for pk, status, system in rows if status == TaskStatus.QUEUED and system in POLLED_DISPATCH]
            upto = rows[-1][0]
        else:
            # At the end: tasks behind the checkpoint that came back to the database queue (a poller's retry that
            # landed late, a restore) are taken by id.
            ids = list(CaptionTask.objects.filter(status=TaskStatus.QUEUED, dispatch__in=POLLED_DISPATCH,
                                                  pk__lte=run.checkpoint).order_by("pk")
                       .values_list("pk", flat=True)[:batch_size])
            if not ids:
                break
            upto = run.checkpoint
        stamp = timezone.now()
        window = {"ids": ids, "stamp": stamp.isoformat()}
        moved_count = 0
        with transaction.atomic():
            if ids:
                batch = CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.QUEUED,
                                                   dispatch__in=POLLED_DISPATCH)
                # A retry still in its backoff moves unpublished: the relay publishes it when it is due.
                moved_count = batch.filter(publish_after__gt=stamp).update(dispatch=Dispatch.RQ, published_at=None)
                moved_count += batch.update(dispatch=Dispatch.RQ, published_at=stamp, publish_after=stamp)
            if MigrationRun.objects.filter(pk=run.pk, executor=ctx.executor).update(
                    checkpoint=upto, checkpoint_window=window if moved_count else None,
                    heartbeat_at=UtcNow()) != 1:
                raise LeaseLost(_lease_lost(run))
            done += moved_count
            ctx.phase.counts = {**(ctx.phase.counts or {}), "migrated": done}
            MigrationPhase.objects.filter(pk=ctx.phase.pk).update(counts=ctx.phase.counts)
        run.checkpoint = upto
        if moved_count:
            _publish_window(window)
        ctx.progress(walked(), walk)
    MigrationRun.objects.filter(pk=run.pk, executor=ctx.executor).update(checkpoint_window=None)
    ctx.progress(walk, walk, force=True)
    ctx.log(f"{done - earlier} task(s) moved to RQ" + (f" ({done} in all, with earlier attempts)" if earlier else "")
            + (f"; {repaired} republished from an interrupted batch" if repaired else ""))
    return {"migrated": done, "republished_after_interruption": repaired, "checkpoint": run.checkpoint}


def _window_tasks(window: dict) -> tuple[list[tuple[int, str]], dict[int, str]]:
    """The tasks of a batch this run moved and stamped: still queued for RQ with that publication; and their
    correlation ids (their jobs carry them, as every published job does)."""
    from django.utils.dateparse import parse_datetime

    rows = CaptionTask.objects.filter(pk__in=window["ids"], status=TaskStatus.QUEUED, dispatch=Dispatch.RQ,
                                      published_at=parse_datetime(window["stamp"])) \
        .values_list("pk", "priority", "correlation_id")
    tasks, correlation_ids = [], {}
    for pk, priority, correlation_id in rows:
        tasks.append((pk, priority))
        if correlation_id:
            correlation_ids[pk] = correlation_id
    return tasks, correlation_ids


def _publish_window(window: dict) -> None:
    tasks, correlation_ids = _window_tasks(window)
    try:
        broker.publish(tasks, atomic=True, correlation_ids=correlation_ids)
    except broker.BrokerUnavailable as error:
        # Redis refused: these tasks stay with RQ, unpublished; the relay publishes them once Redis takes writes.
        from django.utils.dateparse import parse_datetime

        CaptionTask.objects.filter(pk__in=[pk for pk, _ in tasks], published_at=parse_datetime(window["stamp"])) \
            .update(published_at=None)
        raise PhaseFailed(f"Redis refused the jobs of {len(tasks)} task(s) from {window['ids'][0]}: {error}") \
            from None


def _republish_window(ctx: PhaseContext) -> int:
    """After an interruption: the batch recorded as being published either has all its jobs or none."""
    window = MigrationRun.objects.filter(pk=ctx.run.pk).values_list("checkpoint_window", flat=True).first()
    if not window:
        return 0
    tasks, correlation_ids = _window_tasks(window)
    try:
        # A live job, not any hash: the task's earlier life may have left one (a dead letter requeued since).
        present = broker.jobs_waiting(tasks)
        missing = [task for task, exists in zip(tasks, present) if not exists]
        if missing:
            broker.publish(missing, atomic=True, correlation_ids=correlation_ids)
    except broker.BrokerUnavailable as error:
        raise PhaseFailed(f"Redis is unreachable while checking the interrupted batch: {error}") from None
    if missing:
        ctx.log(f"the interrupted batch from task {window['ids'][0]}: {len(missing)} job(s) were missing and are "
                "published now", MigrationLogLine.Level.WARNING)
    MigrationRun.objects.filter(pk=ctx.run.pk, executor=ctx.executor).update(checkpoint_window=None)
    return len(missing)


def phase_verify(ctx: PhaseContext) -> dict:
    run = ctx.run
    direction = "to_database" if run.kind == MigrationRun.Kind.ROLLBACK else "to_rq"
    baseline = run.baseline or None
    report = verification(direction=direction, baseline=baseline)
    MigrationRun.objects.filter(pk=run.pk).update(verification=report)
    for problem in report["problems"]:
        ctx.log(problem, MigrationLogLine.Level.ERROR)
    if not report["ok"]:
        # What a mover can fix (tasks left behind, jobs missing) is fixed by moving again: resume runs the move phase
        # again (safe), then this one.
        mover = "return_tasks" if run.kind == MigrationRun.Kind.ROLLBACK else "migrate"
        MigrationPhase.objects.filter(run=run, name=mover).update(state=MigrationPhase.State.PENDING)
        ctx.log(f"{mover} will run again when the run resumes", MigrationLogLine.Level.WARNING)
        raise PhaseFailed("verification failed: " + "; ".join(report["problems"]))
    ctx.log("verified: every queued task has exactly one job, nothing is left behind"
            + (", counts and checksums match the baseline" if baseline else ""))
    jobs = report.get("jobs", {})
    return {"waiting_tasks": jobs.get("waiting_tasks"), "queue_entries": jobs.get("queue_entries"),
            "ran_twice": report["ran_twice"]}


def phase_cutover(ctx: PhaseContext) -> dict:
    dispatch.mode_set(mode=Mode.RQ, user=ctx.actor, run=ctx.run, executing=True)
    ctx.log("mode is rq: new tasks go to RQ only")
    return {"mode": Mode.RQ}


def phase_resume_submission(ctx: PhaseContext) -> dict:
    released = dispatch.submission_resume(user=ctx.actor, reason=f"{ctx.run}", run=ctx.run, executing=True)
    ctx.log(f"submission resumed; {released} held task(s) released")
    return {"released": released}


def phase_validate(ctx: PhaseContext) -> dict | None:
    from queues.samples import ensure_samples
    from queues.services import TaskSpec, tasks_submit_many

    count, timeout = int(ctx.options["validate_tasks"]), float(ctx.options["validate_timeout"])
    if count <= 0:
        return None
    references = ensure_samples()
    specs = [TaskSpec(image_ref=references[index % len(references)], priority="high",
                      idempotency_key=f"migration-{ctx.run.pk}-validate-{ctx.phase.attempts}-{index}")
             for index in range(count)]
    result = tasks_submit_many(specs=specs)
    ids = result.created + result.existing
    dispatched = dict(CaptionTask.objects.filter(pk__in=ids).values_list("pk", "dispatch"))
    if any(system != Dispatch.RQ for system in dispatched.values()):
        raise PhaseFailed("the validation tasks were not dispatched to RQ: is submission still paused, or the "
                          "mode not rq?")
    started = time.monotonic()
    while True:
        statuses = dict(CaptionTask.objects.filter(pk__in=ids).values_list("pk", "status"))
        completed = sum(1 for status in statuses.values() if status == TaskStatus.COMPLETED)
        ctx.progress(completed, len(ids))
        failed = [pk for pk, status in statuses.items() if status in (TaskStatus.FAILED, TaskStatus.CANCELLED,
                                                                           TaskStatus.DISCARDED)]
        if failed:
            raise PhaseFailed(f"validation task(s) {failed} failed through RQ; see their timelines")
        if completed == len(ids):
            break
        if time.monotonic() - started > timeout:
            raise PhaseFailed(f"only {completed} of {len(ids)} validation task(s) completed through RQ within "
                              f"{timeout:g} s: are RQ workers running?")
        ctx.wait(0.25)
    seconds = time.monotonic() - started
    ctx.log(f"{len(ids)} validation task(s) completed through RQ in {seconds:.1f} s")
    return {"tasks": len(ids), "seconds": round(seconds, 2), "task_ids": ids}


def phase_cleanup(ctx: PhaseContext) -> dict:
    closed = dispatch.legacy_workers_stale().update(stopped_at=timezone.now())
    left = CaptionTask.objects.filter(status=TaskStatus.QUEUED, dispatch__in=POLLED_DISPATCH).count()
    ctx.log(f"{closed} stale poller registration(s) closed; {left} task(s) queued for the database poller")
    return {"closed_registrations": closed, "queued_for_database": left}


# --- phases of a rollback ------------------------------------------------------------------------------------------

def phase_switch_to_legacy(ctx: PhaseContext) -> dict:
    dispatch.mode_set(mode=Mode.LEGACY, user=ctx.actor, run=ctx.run, executing=True)
    ctx.log("mode is legacy: new tasks go to the database poller")
    return {"mode": Mode.LEGACY}


def phase_return_tasks(ctx: PhaseContext) -> dict:
    """Every queued RQ task back to the database poller, its job deleted; then waits for RQ workers to finish the
    tasks they run, moving those that come back to the queue (a retry)."""
    timeout = float(ctx.options["rollback_timeout"])
    moved_total = int((ctx.phase.counts or {}).get("returned", 0))
    started = time.monotonic()
    while True:
        # Counted before moving: a retry that comes back to the queue after the count is caught by the move below or,
        # if it comes back after the move too, by the next pass (the loop ends only when both were zero in turn).
        running = CaptionTask.objects.filter(status=TaskStatus.PROCESSING, dispatch=Dispatch.RQ).count()
        moved = dispatch.tasks_move(source=(Dispatch.RQ, Dispatch.FALLBACK), target=Dispatch.DATABASE,
                                    published=True)
        if moved:
            try:
                broker.jobs_delete((pk for pk, _ in moved), strict=True)
            except broker.BrokerUnavailable as error:
                raise PhaseFailed(f"{len(moved)} task(s) are back with the database poller, but their jobs could not "
                                  f"be deleted from Redis ({error}); resume the rollback once Redis answers") from None
            moved_total += len(moved)
            ctx.phase.counts = {"returned": moved_total}
            MigrationPhase.objects.filter(pk=ctx.phase.pk).update(counts=ctx.phase.counts)
            ctx.progress(moved_total, moved_total + _rq_active())
            continue
        if not running:
            break
        if time.monotonic() - started > timeout:
            raise PhaseFailed(f"{running} task(s) still run in RQ after {timeout:g} s; resume the rollback once "
                              "they have finished (or their workers are stopped)")
        ctx.progress(moved_total, moved_total + running)
        ctx.wait(0.5)
    purged = 0
    try:
        for name in broker.QUEUE_NAMES:
            purged += broker.queue_purge_missing(name)
        # Entries of tasks no longer queued for RQ on that queue: jobs of tasks moved by an attempt of this phase
        # that was killed (or whose deletion Redis refused) before it deleted them. A resumed phase no longer finds
        # those tasks among RQ's, so it goes by the queues instead.
        purged += _queues_purge_foreign()
    except (broker.BrokerUnavailable, *broker.REDIS_ERRORS) as error:
        raise PhaseFailed(f"the jobs' queue entries could not be removed from Redis: {error}") from None
    ctx.progress(moved_total, moved_total, force=True)
    ctx.log(f"{moved_total} task(s) returned to the database poller; {purged} queue entr(y/ies) removed from Redis")
    return {"returned": moved_total, "queue_entries_removed": purged}


def _queues_purge_foreign() -> int:
    removed = 0
    for name in broker.QUEUE_NAMES:
        listed = sorted(broker.queued_task_ids(name))
        waiting: set[int] = set()
        for start in range(0, len(listed), 5000):
            waiting.update(CaptionTask.objects.filter(
                pk__in=listed[start:start + 5000], status=TaskStatus.QUEUED, dispatch=Dispatch.RQ,
                published_at__isnull=False, priority=name).values_list("pk", flat=True))
        foreign = [pk for pk in listed if pk not in waiting]
        if foreign:
            removed += broker.queue_entries_remove(name, foreign)
    return removed


def _rq_active() -> int:
    return CaptionTask.objects.filter(status__in=(TaskStatus.QUEUED, TaskStatus.PROCESSING),
                                      dispatch=Dispatch.RQ).count()


def phase_rollback_baseline(ctx: PhaseContext) -> dict:
    if not ctx.run.baseline:
        ctx.run.baseline = baseline_take(at=database_now(connection))
        MigrationRun.objects.filter(pk=ctx.run.pk).update(baseline=ctx.run.baseline)
    return {"max_id": ctx.run.baseline["max_id"]}


MIGRATION_PHASES: list[tuple[str, Callable]] = [
    ("preflight", phase_preflight), ("backup", phase_backup), ("hybrid", phase_hybrid),
    ("pause_submission", phase_pause_submission), ("drain", phase_drain), ("migrate", phase_migrate),
    ("verify", phase_verify), ("cutover", phase_cutover), ("resume_submission", phase_resume_submission),
    ("validate", phase_validate), ("cleanup", phase_cleanup),
]
ROLLBACK_PHASES: list[tuple[str, Callable]] = [
    ("pause_submission", phase_pause_submission), ("baseline", phase_rollback_baseline),
    ("switch_to_legacy", phase_switch_to_legacy), ("return_tasks", phase_return_tasks),
    ("verify", phase_verify), ("resume_submission", phase_resume_submission),
]
PHASE_TITLES = {
    "preflight": "Preflight checks", "backup": "Backup", "hybrid": "Hybrid soak", "pause_submission":
    "Pause submission", "drain": "Drain the database pollers", "migrate": "Migrate queued tasks",
    "verify": "Verify", "cutover": "Cut over to RQ", "resume_submission": "Resume submission",
    "validate": "Validate through RQ", "cleanup": "Clean up", "baseline": "Baseline",
    "switch_to_legacy": "Switch to the database poller", "return_tasks": "Return tasks to the database poller",
}


def _phases_of(kind: str) -> dict[str, Callable]:
    return dict(ROLLBACK_PHASES if kind == MigrationRun.Kind.ROLLBACK else MIGRATION_PHASES)


def options_clean(options: dict | None) -> dict:
    cleaned = dict(DEFAULT_OPTIONS)
    for name, value in (options or {}).items():
        if name not in DEFAULT_OPTIONS:
            raise RunError(f"unknown option {name!r}; options are {', '.join(DEFAULT_OPTIONS)}")
        low, high = OPTION_LIMITS[name]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise RunError(f"{name} must be a whole number from {low} to {high}")
        cleaned[name] = value
    return cleaned


def run_create(*, user, options: dict | None = None, kind: str = MigrationRun.Kind.MIGRATION,
               rollback_of: MigrationRun | None = None) -> MigrationRun:
    """A new run with its phases pending. Refuses while another run is open (a rollback may undo an open run)."""
    cleaned = options_clean(options)
    with transaction.atomic():
        mode_locked()  # serialises run creation
        current = open_run()
        if current is not None and not (kind == MigrationRun.Kind.ROLLBACK and rollback_of == current):
            raise RunError(f"{current} is {current.get_state_display().lower()}: resume it or roll it back first")
        if rollback_of is not None:
            rollback_of.refresh_from_db()
            if _lease_held(rollback_of):  # under the same lock run_execute takes a lease with
                raise RunError(f"{rollback_of} is being executed by {rollback_of.executor}; wait for its phase to "
                               "end or stop that process first")
        run = MigrationRun.objects.create(kind=kind, options=cleaned, started_by=person(user),
                                          rollback_of=rollback_of)
        MigrationPhase.objects.bulk_create([MigrationPhase(run=run, name=name, order=index)
                                            for index, (name, _) in enumerate(
                                                ROLLBACK_PHASES if kind == MigrationRun.Kind.ROLLBACK
                                                else MIGRATION_PHASES)])
        MigrationLogLine.objects.create(run=run, message=f"{run} created by {user or audit_channel() or 'a command'}")
        if rollback_of is not None:
            # The fence: the run being undone loses its lease in the same transaction. A process still executing it
            # (frozen, partitioned: its lease went stale, so the rollback was allowed) finds its executor gone at its
            # next check and stops without writing; it cannot finish the run or cut over after the rollback.
            MigrationRun.objects.filter(pk=rollback_of.pk, state__in=(
                MigrationRun.State.RUNNING, MigrationRun.State.STOPPED, MigrationRun.State.FAILED)).update(
                state=MigrationRun.State.STOPPED, executor="", heartbeat_at=None)
        from queues.audit import audit

        if person(user) or audit_channel():
            audit(user=user, action="migration_run_create", target=str(run), detail={"options": cleaned})
    return run


def rollback_create(*, user, of: MigrationRun | None = None, options: dict | None = None) -> MigrationRun:
    """A rollback run undoing ``of`` (default: the open run, or else the latest succeeded migration)."""
    if not settings.DATABASE_POLLING_ENABLED:
        raise RunError(f"A rollback returns the tasks to the database poller. {POLLING_DISABLED}; set it to true on "
                       "every host first")
    target = of or open_run() or MigrationRun.objects.filter(kind=MigrationRun.Kind.MIGRATION,
                                                             state=MigrationRun.State.SUCCEEDED).first()
    if target is not None and target.kind == MigrationRun.Kind.ROLLBACK:
        if target.is_open or target.state == MigrationRun.State.FAILED:
            raise RunError(f"{target} is itself a rollback that has not finished: resume it")
        target = None
    return run_create(user=user, kind=MigrationRun.Kind.ROLLBACK, rollback_of=target, options=options)


def lease_age(run: MigrationRun) -> float | None:
    """Seconds since the run's executor last renewed its lease (the database's clock), or None without one."""
    if not run.executor or run.heartbeat_at is None:
        return None
    return max(0.0, (database_now(connection) - run.heartbeat_at).total_seconds())


def _lease_held(run: MigrationRun) -> bool:
    age = lease_age(run)
    return age is not None and age < settings.MIGRATION_RUN_LEASE_SECONDS


def run_execute(*, run: MigrationRun, user=None, one_phase: bool = False,
                on_progress: Callable[[MigrationPhase], None] | None = None,
                on_log: Callable[[str, str], None] | None = None,
                on_phase: Callable[[MigrationPhase], None] | None = None) -> MigrationRun:
    """Runs the run's remaining phases (``one_phase``: only the next one). Returns the run as it ended."""
    executor = f"{socket.gethostname()[:120]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    stale = database_now_expression(-settings.MIGRATION_RUN_LEASE_SECONDS)
    with transaction.atomic():
        mode_locked()  # the lock run_create takes: a rollback cannot be created between check and lease
        if run.kind == MigrationRun.Kind.MIGRATION:
            rollback = run.rollbacks.exclude(state=MigrationRun.State.SUCCEEDED).first()
            if rollback is not None:
                raise RunError(f"{run} is being rolled back by {rollback}: resume the rollback instead")
        taken = MigrationRun.objects.filter(
            Q(executor="") | Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=stale),
            pk=run.pk, state__in=(MigrationRun.State.STOPPED, MigrationRun.State.FAILED, MigrationRun.State.RUNNING),
        ).update(executor=executor, heartbeat_at=UtcNow(), state=MigrationRun.State.RUNNING, failure_reason="")
    if not taken:
        run.refresh_from_db()
        if run.state in (MigrationRun.State.SUCCEEDED, MigrationRun.State.ROLLED_BACK):
            raise RunError(f"{run} has already {run.get_state_display().lower()}")
        raise RunError(f"{run} is being executed by {run.executor} (heartbeat {run.heartbeat_at:%H:%M:%S} UTC); "
                       f"a run is taken over only after {settings.MIGRATION_RUN_LEASE_SECONDS} s without a "
                       "heartbeat")
    run.refresh_from_db()
    beat_stop = threading.Event()
    beat_every = max(1.0, settings.MIGRATION_RUN_LEASE_SECONDS / 6)
    beat = threading.Thread(target=_beat, args=(run.pk, executor, beat_stop, beat_every), daemon=True,
                            name="run-lease")
    beat.start()
    functions = _phases_of(run.kind)
    try:
        for phase in run.phases.order_by("order"):
            if phase.state in (MigrationPhase.State.DONE, MigrationPhase.State.SKIPPED):
                continue
            _run_phase(run, phase, functions[phase.name], user, executor, on_progress, on_log)
            if on_phase:
                on_phase(phase)
            run.refresh_from_db()
            if run.state == MigrationRun.State.FAILED:
                return run
            if one_phase and run.phases.exclude(state__in=(MigrationPhase.State.DONE,
                                                           MigrationPhase.State.SKIPPED)).exists():
                MigrationRun.objects.filter(pk=run.pk, executor=executor).update(
                    state=MigrationRun.State.STOPPED, executor="", heartbeat_at=None)
                run.refresh_from_db()
                return run
        _finish(run, executor)
    except LeaseLost as error:
        logger.warning("%s", error)
        raise RunError(f"{error}; this process stopped without writing more") from None
    finally:
        beat_stop.set()
        beat.join(beat_every + 5)
        MigrationRun.objects.filter(pk=run.pk, executor=executor).update(executor="", heartbeat_at=None)
    run.refresh_from_db()
    return run


def _holds(run, executor) -> None:
    if not MigrationRun.objects.filter(pk=run.pk, executor=executor).exists():
        raise LeaseLost(_lease_lost(run))


def _lease_lost(run: MigrationRun) -> str:
    """Why this process no longer executes ``run``: a rollback of it was created, or another process took it over."""
    rollback = MigrationRun.objects.filter(rollback_of_id=run.pk).order_by("-pk").first()
    if rollback is not None:
        return (f"{run} is being rolled back by {rollback} (created while this process was not heard from for over "
                f"{settings.MIGRATION_RUN_LEASE_SECONDS} s)")
    return f"{run} was taken over by another process"


def _run_phase(run, phase, function, user, executor, on_progress, on_log) -> None:
    _holds(run, executor)
    MigrationPhase.objects.filter(pk=phase.pk).update(
        state=MigrationPhase.State.RUNNING, attempts=phase.attempts + 1, started_at=phase.started_at or timezone.now(),
        finished_at=None, message="", actor=person(user))
    phase.refresh_from_db()
    ctx = PhaseContext(run=run, phase=phase, actor=user, executor=executor, on_progress=on_progress, on_log=on_log)
    if phase.attempts > 1:
        ctx.log(f"phase started again (attempt {phase.attempts})", MigrationLogLine.Level.WARNING)
    try:
        counts = function(ctx)
    except LeaseLost:
        raise
    except PhaseFailed as error:
        _fail(run, phase, executor, str(error), ctx)
        return
    except Exception as error:  # a bug, or an outage in the middle of a phase: stop the run, keep the reason
        logger.exception("run %s phase %s", run.pk, phase.name)
        close_old_connections()
        _fail(run, phase, executor, f"{type(error).__name__}: {error}", ctx)
        return
    state = MigrationPhase.State.SKIPPED if counts is None else MigrationPhase.State.DONE
    _holds(run, executor)
    MigrationPhase.objects.filter(pk=phase.pk).update(state=state, finished_at=timezone.now(),
                                                      counts={**(phase.counts or {}), **(counts or {})})
    phase.refresh_from_db()


def _fail(run, phase, executor, reason: str, ctx: PhaseContext) -> None:
    _holds(run, executor)
    try:
        ctx.log(reason, MigrationLogLine.Level.ERROR)
    except Exception:
        pass
    MigrationPhase.objects.filter(pk=phase.pk).update(state=MigrationPhase.State.FAILED, finished_at=timezone.now(),
                                                      message=reason[:5000])
    MigrationRun.objects.filter(pk=run.pk, executor=executor).update(state=MigrationRun.State.FAILED,
                                                                     failure_reason=reason[:5000])


def _finish(run: MigrationRun, executor: str) -> None:
    with transaction.atomic():
        if not MigrationRun.objects.filter(pk=run.pk, executor=executor, state=MigrationRun.State.RUNNING).update(
                state=MigrationRun.State.SUCCEEDED, finished_at=timezone.now()):
            raise LeaseLost(_lease_lost(run))
        MigrationLogLine.objects.create(run=run, message=f"{run} succeeded")
        if run.kind == MigrationRun.Kind.ROLLBACK and run.rollback_of_id:
            MigrationRun.objects.filter(pk=run.rollback_of_id).update(state=MigrationRun.State.ROLLED_BACK,
                                                                      finished_at=timezone.now())
            MigrationLogLine.objects.create(run_id=run.rollback_of_id, message=f"rolled back by {run}")


def _beat(run_id: int, executor: str, stop: threading.Event, every: float) -> None:
    try:
        while not stop.wait(every):
            try:
                MigrationRun.objects.filter(pk=run_id, executor=executor).update(heartbeat_at=UtcNow())
            except Exception:
                logger.warning("could not renew the lease of run %s", run_id, exc_info=True)
                connection.close()
    finally:
        connection.close()




def run_status_lines(run: MigrationRun) -> list[str]:
    """The run as text (``migrate_to_rq status``)."""
    lines = [f"{run}: {run.get_state_display()}" + (f" -- {run.failure_reason}" if run.failure_reason else "")]
    for phase in run.phases.order_by("order"):
        progress = f" {phase.progress_done}/{phase.progress_total}" if phase.progress_total else ""
        took = f" {phase.duration_seconds:.1f} s" if phase.duration_seconds is not None else ""
        lines.append(f"  {phase.order + 1:>2}. {PHASE_TITLES.get(phase.name, phase.name):<38} {phase.state:<8}"
                     f"{progress}{took}{(' -- ' + phase.message) if phase.message else ''}")
    return lines

