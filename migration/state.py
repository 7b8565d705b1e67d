"""The state that every part of the move reads: the dispatch mode row (``system_mode``; locked for a change with
``mode_locked``, which also serialises the creation of runs), and the migration run that is open or that has drained
the pollers (``open_run``, ``blocking_run``). The dispatcher, the database poller and the runs all read these; none
of them is read through another.
"""

from __future__ import annotations

from django.conf import settings
from django.db.models import Exists, OuterRef

from migration.models import MigrationPhase, MigrationRun, Mode, SystemMode


def system_mode() -> SystemMode:
    """The dispatch mode row; until someone first changes it, an unsaved row with the defaults from the old system's
    variables (reading never writes: submissions, scrapes and the admin banner read this)."""
    row = SystemMode.objects.filter(pk=1).first()
    if row is not None:
        return row
    return SystemMode(pk=1, mode=seeded_mode(), hybrid_rq_percent=settings.RQ_HYBRID_RQ_PERCENT,
                      fallback_enabled=settings.RQ_FALLBACK_ENABLED, fallback_timeout=settings.RQ_FALLBACK_TIMEOUT)


def seeded_mode() -> str:
    """The mode the old system's switches (RQ_ENABLED, RQ_HYBRID_MODE) give the row when it is first written."""
    return Mode.LEGACY if not settings.RQ_ENABLED else (Mode.HYBRID if settings.RQ_HYBRID_MODE else Mode.RQ)


def system_mode_ensure() -> None:
    """Writes the row with the defaults if it is not there yet (before the first change of it)."""
    if not SystemMode.objects.filter(pk=1).exists():
        default = system_mode()
        SystemMode.objects.get_or_create(pk=1, defaults={
            field.attname: getattr(default, field.attname) for field in SystemMode._meta.concrete_fields
            if field.attname != "id"})


def mode_locked(run: MigrationRun | None = None) -> SystemMode:
    """The row, locked for the caller's transaction. With ``run`` (a change a migration run's phase makes), the run
    must still be this process's: see ``run_fenced``."""
    system_mode_ensure()
    row = SystemMode.objects.select_for_update().get(pk=1)
    if run is not None:
        run_fenced(run)
    return row


class LeaseLost(Exception):
    """Another process took the run over, or a rollback of it was created (this one was presumed dead): stop without
    writing."""


def run_fenced(run: MigrationRun) -> None:
    """LeaseLost unless ``run`` is still executed by this process (``run.executor``, as its lease was taken). Called
    under the row's lock: a rollback's creation takes that lock and clears the run's executor in the same
    transaction, so a phase frozen past its lease (a VM pause, a long GC) cannot write after the rollback, however
    late it wakes."""
    if not run.executor or not MigrationRun.objects.filter(pk=run.pk, executor=run.executor).exists():
        raise LeaseLost(f"{run} is no longer executed by this process: a rollback of it was created, or another "
                        "process took it over, while it was not heard from")


def blocking_run() -> MigrationRun | None:
    """The migration run that is draining the pollers, or has drained them and not yet cut over to RQ (running,
    stopped or failed in between): a poller started meanwhile (by hand, by a restart policy, the fallback) must
    claim nothing, or it would take tasks the run is waiting out, moving or has verified. From the cutover on, the
    run no longer needs the pollers idle: a run that failed later (at validate, say) leaves the fallback working."""
    cut_over = MigrationPhase.objects.filter(run=OuterRef("pk"), name="cutover", state=MigrationPhase.State.DONE)
    return MigrationRun.objects.filter(
        ~Exists(cut_over), kind=MigrationRun.Kind.MIGRATION,
        state__in=(MigrationRun.State.RUNNING, MigrationRun.State.STOPPED, MigrationRun.State.FAILED),
        phases__name="drain", phases__state__in=(MigrationPhase.State.RUNNING, MigrationPhase.State.DONE),
    ).order_by("-pk").first()


def pollers_blocked() -> bool:
    return blocking_run() is not None


OPEN_STATES = (MigrationRun.State.RUNNING, MigrationRun.State.STOPPED, MigrationRun.State.FAILED)


def open_run() -> MigrationRun | None:
    """The run that is not finished (running, stopped or failed), if any: at most one at a time."""
    return MigrationRun.objects.filter(state__in=OPEN_STATES).order_by("-pk").first()
