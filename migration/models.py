"""The migration app's rows: the dispatch mode, the database pollers, migration runs with their phases and logs.

``SystemMode`` is one row (pk 1), read by every submission (migration.dispatch): where new tasks go, whether
submission is paused, and the state of the fallback to the database poller. Every change of it is a
``MigrationEvent`` (and, when a person made it, an audit entry).
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone


class Mode(models.TextChoices):
    LEGACY = "legacy", "Legacy (database poller only)"
    HYBRID = "hybrid", "Hybrid (new tasks split between both)"
    RQ = "rq", "RQ only"


POLLING_DISABLED = ("DATABASE_POLLING_ENABLED is false here: the database poller may not run outside the Redis "
                    "fallback")


def polling_errors(*, mode: str | None = None) -> dict[str, str]:
    """The fields that send tasks to a database poller where DATABASE_POLLING_ENABLED forbids one."""
    if settings.DATABASE_POLLING_ENABLED or mode not in (Mode.LEGACY, Mode.HYBRID):
        return {}
    return {"mode": f"The {mode} mode dispatches to the database poller. {POLLING_DISABLED}."}


class SystemMode(models.Model):
    """Where new tasks go. One row; its defaults come from the old system's variables (settings.RQ_ENABLED ...)."""

    mode = models.CharField(max_length=8, choices=Mode.choices, default=Mode.RQ)
    hybrid_rq_percent = models.PositiveSmallIntegerField(
        "RQ share in hybrid mode (%)", default=50,
        help_text="In hybrid mode, the percentage of new tasks sent to RQ; the rest go to the database poller.")
    fallback_enabled = models.BooleanField(
        default=True, help_text="Send new and unpublished tasks to the database poller while Redis is unreachable.")
    fallback_timeout = models.PositiveIntegerField(
        "fallback after (s)", default=30, help_text="Seconds Redis must be unreachable before the fallback starts.")
    submission_paused = models.BooleanField(default=False)
    paused_reason = models.CharField(max_length=300, blank=True)
    paused_until = models.DateTimeField(null=True, blank=True, help_text="Empty: paused until resumed.")
    paused_at = models.DateTimeField(null=True, blank=True)
    # Fallback state, kept by the relay (migration.dispatch.ModePolicy.maintain) on the database's clock.
    redis_down_since = models.DateTimeField(null=True, blank=True)
    fallback_active = models.BooleanField(default=False)
    fallback_since = models.DateTimeField(null=True, blank=True)
    changed_at = models.DateTimeField(default=timezone.now)
    changed_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")

    class Meta:
        verbose_name = "dispatch mode"
        verbose_name_plural = "dispatch mode"
        default_permissions = ("view", "change")
        permissions = [("pause_submission", "Can pause and resume task submission")]
        constraints = [models.CheckConstraint(condition=models.Q(hybrid_rq_percent__lte=100),
                                              name="mode_hybrid_percent_le_100")]

    def __str__(self) -> str:
        return self.get_mode_display()

    def clean(self) -> None:
        """What this installation allows: with ``DATABASE_POLLING_ENABLED`` false no database poller may run, so
        nothing may be dispatched to one."""
        errors = polling_errors(mode=self.mode)
        if errors:
            raise ValidationError(errors)

    def paused_now(self, now=None) -> bool:
        now = now or timezone.now()
        return self.submission_paused and (self.paused_until is None or self.paused_until > now)


class MigrationEvent(models.Model):
    """One change of the system's dispatch: mode set, submission paused or resumed, fallback started or ended, held
    tasks released, tasks moved between the systems, a backup restored."""

    class Kind(models.TextChoices):
        MODE_CHANGED = "mode_changed", "Mode changed"
        SUBMISSION_PAUSED = "submission_paused", "Submission paused"
        SUBMISSION_RESUMED = "submission_resumed", "Submission resumed"
        FALLBACK_STARTED = "fallback_started", "Fallback to the database poller started"
        FALLBACK_ENDED = "fallback_ended", "Fallback ended, RQ took over again"
        TASKS_MOVED = "tasks_moved", "Tasks moved between systems"
        RESTORED = "restored", "Backup restored"

    at = models.DateTimeField(default=timezone.now, db_index=True)
    kind = models.CharField(max_length=20, choices=Kind.choices)
    detail = models.CharField(max_length=500, blank=True)
    figures = models.JSONField(default=dict, blank=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="+")

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.get_kind_display()}: {self.detail}"


class LegacyWorker(models.Model):
    """A database poller (``manage.py run_legacy_worker``): registered when it starts, its heartbeat on the
    database's clock while it runs (it works without Redis, so it cannot register there)."""

    ALIVE_SECONDS = 15

    name = models.CharField(max_length=200, unique=True)
    host = models.CharField(max_length=200)
    pid = models.PositiveIntegerField()
    fallback = models.BooleanField(default=False, help_text="Started by a supervisor for the Redis fallback.")
    started_at = models.DateTimeField(default=timezone.now)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    stopped_at = models.DateTimeField(null=True, blank=True)
    current_task_id = models.BigIntegerField(null=True, blank=True)
    processed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    stop_requested = models.BooleanField(default=False, help_text="Asked to stop after its current task.")
    stop_forced = models.BooleanField(
        default=False, help_text="Told to give its task in hand back and exit at once (the drain's timeout ran out); "
                                 "read by the poller itself, so it works on any host.")

    class Meta:
        ordering = ["-started_at"]
        verbose_name = "database poller"
        indexes = [models.Index(fields=["stopped_at", "heartbeat_at"], name="legacyworker_alive_idx")]

    def __str__(self) -> str:
        return self.name


class MigrationRun(models.Model):
    """One run of the migration (or of a rollback): its ordered phases, a checkpoint, and the lease of the process
    executing it (migration.runs)."""

    class Kind(models.TextChoices):
        MIGRATION = "migration", "Migration to RQ"
        ROLLBACK = "rollback", "Rollback to the database poller"

    class State(models.TextChoices):
        RUNNING = "running", "Running"
        STOPPED = "stopped", "Stopped (resume to continue)"
        FAILED = "failed", "Failed"
        SUCCEEDED = "succeeded", "Succeeded"
        ROLLED_BACK = "rolled_back", "Rolled back"

    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.MIGRATION)
    state = models.CharField(max_length=12, choices=State.choices, default=State.STOPPED)
    rollback_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="rollbacks")
    options = models.JSONField(default=dict, blank=True)
    preflight = models.JSONField(default=dict, blank=True, help_text="The preflight report.")
    baseline = models.JSONField(default=dict, blank=True,
                                help_text="Counts and checksums per status before the tasks were migrated.")
    verification = models.JSONField(default=dict, blank=True)
    checkpoint = models.BigIntegerField(default=0, help_text="The last task id migrated.")
    # The last batch moved: {"ids": [...], "stamp": iso}. Set in the transaction that moves a batch to RQ (with the
    # checkpoint), replaced by the next; a resumed run publishes that batch's jobs if they are missing.
    checkpoint_window = models.JSONField(null=True, blank=True)
    failure_reason = models.TextField(blank=True)
    started_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The executing process: its identity and heartbeat (database clock). A run whose heartbeat is older than
    # settings.MIGRATION_RUN_LEASE_SECONDS has no live executor and may be resumed.
    executor = models.CharField(max_length=200, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        permissions = [("run_migration", "Can start, advance, resume and roll back migration runs")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} #{self.pk}"

    @property
    def is_open(self) -> bool:
        return self.state in (self.State.RUNNING, self.State.STOPPED)


class MigrationPhase(models.Model):
    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        SKIPPED = "skipped", "Skipped"
        FAILED = "failed", "Failed"

    run = models.ForeignKey(MigrationRun, on_delete=models.CASCADE, related_name="phases")
    name = models.CharField(max_length=24)
    order = models.PositiveSmallIntegerField()
    state = models.CharField(max_length=8, choices=State.choices, default=State.PENDING)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0, help_text="Times the phase has been started.")
    progress_done = models.PositiveBigIntegerField(default=0)
    progress_total = models.PositiveBigIntegerField(default=0)
    counts = models.JSONField(default=dict, blank=True)
    message = models.TextField(blank=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="+")

    class Meta:
        ordering = ["run", "order"]
        constraints = [models.UniqueConstraint(fields=["run", "order"], name="phase_run_order_unique")]

    def __str__(self) -> str:
        return f"{self.name} ({self.state})"

    @property
    def percent(self) -> int | None:
        if not self.progress_total:
            return None
        return min(100, int(100 * self.progress_done / self.progress_total))

    @property
    def duration_seconds(self) -> float | None:
        if not self.started_at:
            return None
        return ((self.finished_at or timezone.now()) - self.started_at).total_seconds()


class MigrationLogLine(models.Model):
    class Level(models.TextChoices):
        INFO = "info", "Info"
        WARNING = "warning", "Warning"
        ERROR = "error", "Error"

    run = models.ForeignKey(MigrationRun, on_delete=models.CASCADE, related_name="log_lines")
    phase = models.ForeignKey(MigrationPhase, null=True, blank=True, on_delete=models.CASCADE,
                              related_name="log_lines")
    at = models.DateTimeField(default=timezone.now)
    level = models.CharField(max_length=8, choices=Level.choices, default=Level.INFO)
    message = models.TextField()

    class Meta:
        ordering = ["at", "id"]
        indexes = [models.Index(fields=["run", "at"], name="migrationlog_run_at_idx")]

    def __str__(self) -> str:
        return self.message[:80]
