"""Caption tasks: the source of truth for what must happen. Redis only carries ``caption-<id>`` jobs that point here."""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import connections, models, transaction
from django.db.models.functions import Now
from django.utils import timezone

from queues import correlation


def _writers_turn(connection):
    """The SQLite writers' lock (portal/sqlite3) around a statement whose rows are fetched after it runs; nothing
    on other databases."""
    turn = getattr(connection, "writers_turn", None)
    return turn() if turn is not None else contextlib.nullcontext()


def _converted(connection, names: tuple[str, ...], row) -> list:
    """A raw row of CaptionTask columns as model values (the database's converters, as a query would apply)."""
    values = []
    for name, value in zip(names, row):
        column = _ColumnOf(CaptionTask._meta.get_field(name))
        converters = connection.ops.get_db_converters(column) + column.output_field.get_db_converters(connection)
        for converter in converters:
            value = converter(value, column, connection)
        values.append(value)
    return values


def _update_returning(connection) -> bool:
    if connection.vendor == "postgresql":
        return True
    return connection.vendor == "sqlite" and sqlite3.sqlite_version_info >= (3, 35)


def database_now(connection) -> datetime:
    """The database's clock now (aware, UTC)."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {database_now_sql(connection)}", [])
        value = cursor.fetchone()[0]
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=dt_timezone.utc) if value.tzinfo is None else value


def database_now_sql(connection, *, offset_seconds: int = 0) -> str:
    """SQL for "now" on the database's own clock, in UTC, shifted by ``offset_seconds``.

    Task leases are written and judged with this, never with a host's clock: worker hosts and the reconciler's host
    may disagree by seconds (clock skew), and the database is the one clock they share. The text goes into
    statements executed with parameters, so ``%`` is doubled.
    """
    offset = int(offset_seconds)
    if connection.vendor == "sqlite":
        shift = f", '{offset:+d} seconds'" if offset else ""
        return f"STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'now'{shift})"
    if connection.vendor == "mysql":
        return "UTC_TIMESTAMP(6)" + (f" + INTERVAL {offset} SECOND" if offset else "")
    return "STATEMENT_TIMESTAMP()" + (f" + INTERVAL '{offset} seconds'" if offset else "")


def database_now_expression(offset_seconds: int = 0, *, using: str = "default"):
    """``database_now_sql`` as an expression for ``filter()`` (lease and heartbeat ages on the database's clock)."""
    from django.db.models.expressions import RawSQL

    return RawSQL(database_now_sql(connections[using], offset_seconds=offset_seconds), (),
                  output_field=models.DateTimeField())


class UtcNow(Now):
    """``database_now_sql`` as an ORM expression (Django's Now is the server's local time on MySQL), for
    ``filter()``/``update()`` where the heartbeats of background operations are written and judged."""

    def as_mysql(self, compiler, connection, **extra_context):
        return self.as_sql(compiler, connection, template="UTC_TIMESTAMP(6)", **extra_context)


class DatabaseNow:
    """A value for ``transition`` meaning the database's current time plus ``offset_seconds`` (see
    ``database_now_sql``): as a change, or inside ``AtMost`` as a condition."""

    def __init__(self, offset_seconds: int = 0):
        self.offset_seconds = offset_seconds

    def sql(self, connection) -> str:
        return database_now_sql(connection, offset_seconds=self.offset_seconds)

    def __repr__(self):
        return f"DatabaseNow({self.offset_seconds:+d} s)"


class _NotNull:
    """An expected value for ``transition`` meaning the column must not be NULL."""

    def __repr__(self):
        return "NOT_NULL"


class AtMost:
    """An expected value for ``transition``: the column must be at most this value."""

    def __init__(self, value):
        self.value = value


DATABASE_NOW = DatabaseNow()
NOT_NULL = _NotNull()


class _ColumnOf:
    """The minimal expression Django's database converters expect (they read ``output_field``)."""

    def __init__(self, field):
        self.output_field = field
        self.target = field


class Priority(models.TextChoices):
    URGENT = "urgent", "Urgent"
    HIGH = "high", "High"
    NORMAL = "normal", "Normal"
    LOW = "low", "Low"


class TaskStatus(models.TextChoices):
    QUEUED = "QUEUED", "Queued"
    PROCESSING = "PROCESSING", "Processing"
    COMPLETED = "COMPLETED", "Completed"
    FAILED = "FAILED", "Failed"
    CANCELLED = "CANCELLED", "Cancelled"
    # A dead letter an operator has dealt with: failed for good, out of the failed-job registries and the dead-letter
    # counts (and so out of the dead-letter alert); kept as history until the cleanup, and requeueable.
    DISCARDED = "DISCARDED", "Discarded"


class Dispatch(models.TextChoices):
    """Which system runs a task. Every task is in exactly one; only that system's workers can claim it."""

    RQ = "rq", "RQ"
    DATABASE = "database", "Database poller"
    # Sent to the database poller because Redis was unreachable for longer than RQ_FALLBACK_TIMEOUT; RQ takes such
    # tasks back (while they are queued) when Redis answers again.
    FALLBACK = "fallback", "Database poller (Redis fallback)"
    # Submitted while submission is paused: committed, run by nobody until submission resumes.
    HELD = "held", "Held (submission paused)"


POLLED_DISPATCH = (Dispatch.DATABASE, Dispatch.FALLBACK)


_CONSECUTIVE_IDS: dict[str, bool] = {}


def _consecutive_ids(connection) -> bool:
    """Whether one multi-row INSERT on this MySQL/MariaDB server gets consecutive ids from LAST_INSERT_ID() on: InnoDB
    allocates a "simple insert"'s values at once when ``innodb_autoinc_lock_mode`` is 0 or 1 (MariaDB's default),
    one apart when ``auto_increment_increment`` is 1. Read once per server (the lock mode cannot change while it
    runs); otherwise, and on other databases without RETURNING, rows go in one by one."""
    if connection.vendor != "mysql":
        return False
    known = _CONSECUTIVE_IDS.get(connection.alias)
    if known is None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT @@innodb_autoinc_lock_mode, @@auto_increment_increment")
            mode, increment = cursor.fetchone()
        known = _CONSECUTIVE_IDS[connection.alias] = int(mode) in (0, 1) and int(increment) == 1
    return known


class CaptionTaskQuerySet(models.QuerySet):
    INSERT_BATCH = 1000
    SEARCHED = ("image_ref", "last_error_message", "idempotency_key")

    def search(self, term: str):
        """The task list's search (the admin's and the API's ``q``). A number is a task id or a caller's all-digit
        correlation id (both indexed matches, no scan of the text columns); other text is a substring of the image
        reference, the error message or the idempotency key, each word somewhere (as the admin's search box reads
        words, quoted phrases kept whole), or a request's correlation id (indexed)."""
        from django.utils.text import smart_split, unescape_string_literal

        term = term.strip()
        if not term:
            return self
        if term.isascii() and term.isdigit():  # "²" is a digit to isdigit, not to int()
            match = models.Q(correlation_id=term)
            if int(term) < 2 ** 63:  # beyond, no primary key (a signed 64-bit integer) can have it
                match |= models.Q(pk=int(term))
            return self.filter(match)
        words = models.Q()
        for word in smart_split(term):
            if word[:1] in "\"'" and word[-1:] == word[:1] and len(word) > 1:
                word = unescape_string_literal(word)
            anywhere = models.Q()
            for name in self.SEARCHED:
                anywhere |= models.Q(**{f"{name}__icontains": word})
            words &= anywhere
        if correlation.sane(term):
            words |= models.Q(correlation_id=term)
        return self.filter(words)

    def insert_new(self, rows: list[tuple[str, str, str | None]], *, publish_after,
                   dispatch: list[str] | None = None) -> list[int]:
        """Inserts queued tasks from (image_ref, priority, idempotency_key) tuples in one statement and returns
        their ids in order. ``dispatch``: each row's system (default RQ for all).

        Bulk submission's hot path. Django's bulk_create costs about 100 µs a row here (a model instance per row,
        per-field value preparation, and SQLite batches capped at 999 parameters); this writes the same columns
        with one multi-row ``INSERT ... RETURNING id``. MySQL/MariaDB, which cannot return them, get the multi-row
        INSERT too where the server hands one statement consecutive ids (``_consecutive_ids``); else row by row.
        """
        if not rows:
            return []
        dispatch = dispatch or [Dispatch.RQ] * len(rows)
        connection = connections[self.db]
        returning = connection.features.can_return_rows_from_bulk_insert
        if not returning and not _consecutive_ids(connection):
            objects = [CaptionTask(image_ref=ref, priority=priority, idempotency_key=key, publish_after=publish_after,
                                   dispatch=system, correlation_id=correlation.current())
                       for (ref, priority, key), system in zip(rows, dispatch)]
            for obj in objects:
                obj.save(force_insert=True, using=self.db)
            return [obj.pk for obj in objects]
        now = timezone.now()
        fixed = {
            "status": TaskStatus.QUEUED, "attempts": 0, "caption": "", "last_error_class": "",
            "last_error_message": "", "worker_name": "", "claim_token": "", "correlation_id": correlation.current(),
            "created_at": connection.ops.adapt_datetimefield_value(now),
            "publish_after": connection.ops.adapt_datetimefield_value(publish_after),
            "updated_at": connection.ops.adapt_datetimefield_value(now),
        }
        columns = ["image_ref", "priority", "idempotency_key", "dispatch", *fixed]
        quote = connection.ops.quote_name
        row_sql = "(" + ", ".join(["%s"] * len(columns)) + ")"
        head = f"INSERT INTO {quote(CaptionTask._meta.db_table)} ({', '.join(quote(c) for c in columns)}) VALUES "
        constants = tuple(fixed.values())
        ids = []
        with _writers_turn(connection), connection.cursor() as cursor:
            for start in range(0, len(rows), self.INSERT_BATCH):  # 13 parameters a row, well under the limits
                chunk = rows[start:start + self.INSERT_BATCH]
                values = [value for row, system in zip(chunk, dispatch[start:start + len(chunk)])
                          for value in (*row, system, *constants)]
                if returning:
                    cursor.execute(head + ", ".join([row_sql] * len(chunk)) + f" RETURNING {quote('id')}", values)
                    ids.extend(row[0] for row in cursor.fetchall())
                else:  # MySQL/MariaDB: one multi-row INSERT's ids are consecutive from LAST_INSERT_ID()
                    cursor.execute(head + ", ".join([row_sql] * len(chunk)), values)
                    first = cursor.lastrowid
                    ids.extend(range(first, first + len(chunk)))
        return ids

    def transition_statement(self, pk: int, *, expect: dict, changes: dict, increment_attempts: bool = False,
                             database_now_at_most=None) -> tuple[str, list]:
        """The UPDATE ``transition`` runs, with its parameters: a caller that must run it inside a transaction
        compiles it first (``queues.execution._record_end``)."""
        connection = connections[self.db]
        meta, quote = CaptionTask._meta, connection.ops.quote_name
        assignments, params = [], []
        for name, value in changes.items():
            field = meta.get_field(name)
            if isinstance(value, DatabaseNow):
                assignments.append(f"{quote(field.column)} = {value.sql(connection)}")
                continue
            assignments.append(f"{quote(field.column)} = %s")
            params.append(field.get_db_prep_save(value, connection))
        if increment_attempts:
            assignments.append(f"{quote('attempts')} = {quote('attempts')} + 1")
        conditions = [f"{quote(meta.pk.column)} = %s"]
        params.append(pk)
        for name, value in expect.items():
            field = meta.get_field(name)
            if value is NOT_NULL:
                conditions.append(f"{quote(field.column)} IS NOT NULL")
                continue
            if value is None:
                conditions.append(f"{quote(field.column)} IS NULL")
                continue
            operator = "="
            if isinstance(value, AtMost):
                operator, value = "<=", value.value
                if isinstance(value, DatabaseNow):
                    conditions.append(f"{quote(field.column)} <= {value.sql(connection)}")
                    continue
            conditions.append(f"{quote(field.column)} {operator} %s")
            params.append(field.get_db_prep_value(value, connection))
        if database_now_at_most is not None:
            conditions.append(f"{database_now_sql(connection)} <= %s")
            params.append(connection.ops.adapt_datetimefield_value(database_now_at_most))
        sql = (f"UPDATE {quote(meta.db_table)} SET {', '.join(assignments)} "
               f"WHERE {' AND '.join(conditions)}")
        return sql, params

    def transition(self, pk: int, *, expect: dict, changes: dict, increment_attempts: bool = False,
                   returning: tuple[str, ...] = (), database_now_at_most=None):
        """Sets ``changes`` on one row if it still has the values in ``expect``; returns whether it changed.

        ``expect`` values are compared for equality (``None``: IS NULL), or are ``NOT_NULL`` or ``AtMost(value)``
        (the value may be a ``DatabaseNow``); a ``changes`` value may be a ``DatabaseNow``. ``database_now_at_most``
        (a datetime): change nothing if the database's clock, when the statement runs, is past it (a statement that
        waited on a lock).

        The conditional update every state change of a task goes through (claim, complete, retry, fail). Written
        as one parameterised UPDATE instead of ``filter().update()`` because it runs several times per job in
        every worker, and compiling the ORM query costs about three times the statement itself.

        With ``returning`` (field names) it returns the changed row as a task with only those fields loaded, or
        None: one ``UPDATE ... RETURNING`` where the database has it (SQLite >= 3.35, PostgreSQL), otherwise the
        UPDATE and a SELECT of the row in the same transaction.
        """
        connection = connections[self.db]
        meta, quote = CaptionTask._meta, connection.ops.quote_name
        sql, params = self.transition_statement(pk, expect=expect, changes=changes,
                                                increment_attempts=increment_attempts,
                                                database_now_at_most=database_now_at_most)
        if not returning:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.rowcount == 1
        wanted = {"id", *returning}  # from_db takes the values in the model's field order
        names = tuple(field.attname for field in meta.concrete_fields if field.name in wanted)
        columns = ", ".join(quote(meta.get_field(name).column) for name in names)
        if _update_returning(connection):
            # Fetched inside the writers' turn (portal/sqlite3): the statement commits once its row is read.
            with _writers_turn(connection), connection.cursor() as cursor:
                cursor.execute(f"{sql} RETURNING {columns}", params)
                row = cursor.fetchone()
        elif changes.get("claim_token") and connection.get_autocommit() and not any(
                isinstance(changes[name], DatabaseNow) for name in returning if name in changes):
            # A claim (a fresh token) without a transaction, which on MariaDB costs three more round trips (autocommit
            # off, COMMIT, autocommit on): the row is read first, and the UPDATE also expects every returned column it
            # does not set to be as read, so the row it wrote is the row read with its changes. The UPDATE is the
            # last statement: an error before it (or a refusal) has claimed nothing.
            with connection.cursor() as cursor:
                cursor.execute(f"SELECT {columns} FROM {quote(meta.db_table)} WHERE {quote(meta.pk.column)} = %s",
                               [pk])
                before = cursor.fetchone()
                if before is None:
                    return None
                read = dict(zip(names, _converted(connection, names, before)))
                # The caller's expectations stand (an UPDATE that finds them unmet refuses); a NOT NULL one becomes
                # the value read, which is not NULL.
                combined = dict(expect)
                for name, value in read.items():
                    if name not in changes and name != "id" and (name not in combined or combined[name] is NOT_NULL):
                        combined[name] = value
                sql, params = self.transition_statement(pk, expect=combined, changes=changes,
                                                        increment_attempts=increment_attempts,
                                                        database_now_at_most=database_now_at_most)
                cursor.execute(sql, params)
                if cursor.rowcount != 1:
                    return None
            read.update({name: value for name, value in changes.items() if name in read})
            if increment_attempts and "attempts" in read:
                read["attempts"] += 1
            return CaptionTask.from_db(self.db, names, [read[name] for name in names])
        else:
            with transaction.atomic(using=self.db), connection.cursor() as cursor:
                cursor.execute(sql, params)
                row = None
                if cursor.rowcount == 1:
                    cursor.execute(f"SELECT {columns} FROM {quote(meta.db_table)} "
                                   f"WHERE {quote(meta.pk.column)} = %s", [pk])
                    row = cursor.fetchone()
        if row is None:
            return None
        return CaptionTask.from_db(self.db, names, _converted(connection, names, row))

    def due_for_publishing(self, now=None):
        """Queued tasks with no job in Redis whose publish time has come (the relay's work list)."""
        now = now or timezone.now()
        return self.filter(status=TaskStatus.QUEUED, dispatch=Dispatch.RQ, published_at__isnull=True,
                           publish_after__lte=now)

    def dead_letters(self):
        return self.filter(status=TaskStatus.FAILED)


class CaptionTask(models.Model):
    image_ref = models.CharField(
        "image reference", max_length=2048,
        help_text="An http(s) URL, or a path relative to the media root (e.g. samples/red.png).",
    )
    priority = models.CharField(max_length=8, choices=Priority.choices, default=Priority.NORMAL)
    status = models.CharField(max_length=10, choices=TaskStatus.choices, default=TaskStatus.QUEUED)
    dispatch = models.CharField(max_length=10, choices=Dispatch.choices, default=Dispatch.RQ,
                                help_text="The system that runs this task (see migration.dispatch).")
    attempts = models.PositiveIntegerField(default=0, help_text="Times a worker has started this task.")
    caption = models.TextField(blank=True)
    last_error_class = models.CharField("error class", max_length=200, blank=True)
    last_error_message = models.TextField("error message", blank=True)
    idempotency_key = models.CharField(max_length=200, unique=True, null=True, blank=True)
    correlation_id = models.CharField(
        max_length=64, blank=True, default=correlation.current, db_index=True,
        help_text="The submitting request's X-Correlation-ID (queues.correlation): in its job, log lines, attempts "
                  "and audit entries too.")
    worker_name = models.CharField(max_length=200, blank=True, help_text="Worker of the latest attempt.")
    # The running attempt's identity and lease. A claim writes a fresh token; every later change of that attempt
    # (its outcome, a re-drive) expects the token, so a late worker can never end a newer attempt. The worker
    # renews heartbeat_at every couple of seconds on the database's clock while the attempt runs; the reconciler
    # re-drives a PROCESSING task only when its heartbeat is older than the lease (queues.fleet.reconcile), never
    # because something in Redis is missing.
    claim_token = models.CharField(max_length=32, blank=True, default="")
    heartbeat_at = models.DateTimeField(null=True, blank=True, help_text="Last heartbeat of the running attempt.")

    created_at = models.DateTimeField(default=timezone.now)
    # Publication: NULL means no job is known to be in Redis for this task; the relay publishes such tasks once
    # publish_after has passed (a grace period for fresh tasks, the backoff for retries).
    published_at = models.DateTimeField(null=True, blank=True)
    publish_after = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = CaptionTaskQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]
        permissions = [
            ("requeue_task", "Can requeue tasks and retry them now"),
            ("cancel_task", "Can cancel queued tasks"),
            ("change_task_priority", "Can change the priority of queued tasks"),
            ("pause_queue", "Can pause and resume queues, and run queue maintenance"),
            ("empty_queue", "Can empty a queue"),
            ("discard_task", "Can discard dead letters (failed tasks)"),
        ]
        indexes = [
            # The relay's query: queued, unpublished, due.
            models.Index(fields=["status", "published_at", "publish_after"], name="task_relay_idx"),
            # The admin's filters, newest first.
            models.Index(fields=["status", "-created_at"], name="task_status_created_idx"),
            models.Index(fields=["priority", "status"], name="task_priority_status_idx"),
            # The task list filtered by status, newest first: without it MariaDB walks the primary key backwards
            # through every newer row of other statuses (1.7 s at 1,000,000 rows; bench/admin.py).
            models.Index(fields=["status", "id"], name="task_status_id_idx"),
            # Dead letters by error class (the dead-letter page).
            models.Index(fields=["status", "last_error_class"], name="task_status_error_idx"),
            # The task list's error-class filter (failed tasks and those waiting to retry), newest first; it walked
            # the whole table at 1,000,000 rows. Rows change it only when an attempt fails or succeeds after one.
            models.Index(fields=["last_error_class", "id"], name="task_error_id_idx"),
            # The queues overview: oldest queued task per queue, and what finished in the last minutes.
            models.Index(fields=["status", "priority", "created_at"], name="task_status_priority_idx"),
            models.Index(fields=["status", "finished_at"], name="task_status_finished_idx"),
            models.Index(fields=["worker_name", "status"], name="task_worker_idx"),
            # Waiting to retry, per queue (the overview), without walking every queued row.
            models.Index(fields=["status", "published_at", "priority", "attempts"], name="task_unpublished_idx"),
            # The database poller's claim (queued, its dispatch, a priority, due: a seek per priority, highest first)
            # and the migration's per-system counts.
            models.Index(fields=["dispatch", "status", "priority", "publish_after"], name="task_dispatch_priority_idx"),
        ]

    def __str__(self) -> str:
        return f"Task {self.pk} ({self.status.lower()})"

    @property
    def job_id(self) -> str:
        return job_id_for(self.pk)

    @property
    def is_finished(self) -> bool:
        return self.status in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.DISCARDED)

    @property
    def waiting_to_retry(self) -> bool:
        return (self.status == TaskStatus.QUEUED and self.attempts > 0 and self.published_at is None
                and self.publish_after > timezone.now())

    def image_path(self):
        """The local file of a media-root reference, or None for URLs."""
        if "://" in self.image_ref:
            return None
        return settings.MEDIA_ROOT / self.image_ref


def job_id_for(task_id: int) -> str:
    return f"caption-{task_id}"


class TaskEvent(models.Model):
    """One state change of a task: the task's timeline is the list of these rows.

    Attempts are recorded when they end (completed, retry scheduled, failed), each with when it started, its
    worker and its duration; a task's submission and publication are on the task row itself.
    """

    class Kind(models.TextChoices):
        COMPLETED = "completed", "Completed"
        RETRY_SCHEDULED = "retry_scheduled", "Retry scheduled"
        FAILED = "failed", "Failed"
        WORKER_LOST = "worker_lost", "Worker lost during the attempt"
        REPUBLISHED = "republished", "Job missing from Redis, published again"
        REQUEUED = "requeued", "Requeued"
        CANCELLED = "cancelled", "Cancelled"
        PRIORITY_CHANGED = "priority_changed", "Priority changed"
        RETRY_NOW = "retry_now", "Retry brought forward"
        HELD = "held", "Held: the captioner is misconfigured"
        DISCARDED = "discarded", "Dead letter discarded"

    task = models.ForeignKey(CaptionTask, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=20, choices=Kind.choices)
    at = models.DateTimeField(default=timezone.now)
    attempt = models.PositiveIntegerField(default=0)
    started_at = models.DateTimeField(null=True, blank=True, help_text="When the attempt began.")
    worker_name = models.CharField(max_length=200, blank=True)
    duration_ms = models.PositiveIntegerField("duration ms", null=True, blank=True)
    error_class = models.CharField(max_length=200, blank=True)
    error_message = models.TextField(blank=True)
    correlation_id = models.CharField(max_length=64, blank=True, default=correlation.current)
    traceback = models.TextField(blank=True)
    detail = models.CharField(max_length=500, blank=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                              help_text="The operator, for changes made by a person.")

    class Meta:
        ordering = ["at", "id"]
        indexes = [models.Index(fields=["task", "at"], name="taskevent_task_at_idx")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} (task {self.task_id}, attempt {self.attempt})"


QUEUE_ORDER = ("urgent", "high", "normal", "low")


def validate_queue_list(value: str) -> None:
    from django.core.exceptions import ValidationError

    names = value.split()
    if not names:
        raise ValidationError("Name at least one queue.")
    unknown = [name for name in names if name not in QUEUE_ORDER]
    if unknown:
        raise ValidationError(f"Unknown queue(s): {', '.join(unknown)}. Queues are {', '.join(QUEUE_ORDER)}.")
    if len(set(names)) != len(names):
        raise ValidationError("A queue is listed twice.")


MAX_SLOTS = 64  # caption slots in one worker process (each a thread with a database connection)


class WorkerPool(models.Model):
    """A named set of identical workers: which queues they drain, in order, and how many should run."""

    name = models.SlugField(max_length=50, unique=True)
    queues = models.CharField(max_length=100, default="urgent high normal low", validators=[validate_queue_list],
                              help_text="Space-separated, drained in this order.")
    desired = models.PositiveIntegerField("desired workers", default=2, help_text=(
        "Counted in caption slots, like minimum and maximum: with 4 slots per process, 8 desired run 2 processes."))
    minimum = models.PositiveIntegerField("minimum", default=2)
    maximum = models.PositiveIntegerField("maximum", default=10)
    slots = models.PositiveSmallIntegerField(
        "caption slots per process", default=1, validators=[MinValueValidator(1), MaxValueValidator(MAX_SLOTS)],
        help_text=(f"Captions one worker process runs at once (1 to {MAX_SLOTS}). More than 1 suits a captioner that "
                   "mostly waits on a server (Ollama): each slot costs a thread and a database connection instead "
                   "of a whole process."))
    autoscale = models.BooleanField(default=False)
    scale_up_threshold = models.PositiveIntegerField(default=100, help_text="Scale up when more jobs than this wait.")
    scale_down_threshold = models.PositiveIntegerField(default=20, help_text="Scale down when fewer jobs wait.")
    scale_up_cooldown = models.PositiveIntegerField(default=300, help_text="Seconds between scale-ups.")
    scale_down_cooldown = models.PositiveIntegerField(default=600, help_text="Seconds between scale-downs.")
    last_scaled_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        permissions = [("manage_fleet", "Can scale pools, restart and stop workers, suspend processing")]
        constraints = [
            models.CheckConstraint(condition=models.Q(minimum__lte=models.F("maximum")), name="pool_min_le_max"),
            models.CheckConstraint(
                condition=models.Q(desired__gte=models.F("minimum"), desired__lte=models.F("maximum")),
                name="pool_desired_within_bounds"),
            models.CheckConstraint(condition=models.Q(slots__gte=1, slots__lte=MAX_SLOTS), name="pool_slots_in_range"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def queue_names(self) -> list[str]:
        return self.queues.split()

    def clean(self):
        from django.core.exceptions import ValidationError

        errors = {}
        if self.minimum > self.maximum:
            errors["minimum"] = f"The minimum ({self.minimum}) is above the maximum ({self.maximum})."
        elif not self.minimum <= self.desired <= self.maximum:
            errors["desired"] = f"Desired workers must be between {self.minimum} and {self.maximum}."
        if self.scale_down_threshold >= self.scale_up_threshold:
            errors["scale_down_threshold"] = "Must be below the scale-up threshold, or the pool would flap."
        if errors:
            raise ValidationError(errors)


class FleetEvent(models.Model):
    """One change in the worker fleet: the fleet history page is a list of these rows."""

    class Kind(models.TextChoices):
        SUPERVISOR_STARTED = "supervisor_started", "Supervisor started"
        SUPERVISOR_STOPPED = "supervisor_stopped", "Supervisor stopped"
        WORKER_STARTED = "worker_started", "Worker started"
        WORKER_STOPPED = "worker_stopped", "Worker stopped"
        WORKER_CRASHED = "worker_crashed", "Worker crashed"
        WORKER_RESTARTED = "worker_restarted", "Worker restarted"
        POOL_SCALED = "pool_scaled", "Pool scaled"
        AUTOSCALE = "autoscale", "Autoscale decision"
        RESTART_REQUESTED = "restart_requested", "Restart requested"
        JOB_STOP_REQUESTED = "job_stop_requested", "Job stop requested"
        SUSPENDED = "suspended", "Processing suspended"
        RESUMED = "resumed", "Processing resumed"
        TASKS_RECOVERED = "tasks_recovered", "Tasks recovered"

    at = models.DateTimeField(default=timezone.now, db_index=True)
    kind = models.CharField(max_length=24, choices=Kind.choices)
    pool = models.ForeignKey(WorkerPool, null=True, blank=True, on_delete=models.SET_NULL, related_name="events")
    host = models.CharField(max_length=200, blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)
    worker_name = models.CharField(max_length=200, blank=True)
    reason = models.CharField(max_length=500, blank=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    figures = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["kind", "-at"], name="fleetevent_kind_at_idx")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.worker_name or self.pool or ''}".strip()


class AuditEntry(models.Model):
    """Who did what, when, from where: one row per operator action."""

    at = models.DateTimeField(default=timezone.now, db_index=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    action = models.CharField(max_length=50, db_index=True)
    target = models.CharField(max_length=300, blank=True)
    count = models.PositiveIntegerField(default=0)
    detail = models.JSONField(default=dict, blank=True)
    address = models.GenericIPAddressField(null=True, blank=True)
    correlation_id = models.CharField(max_length=64, blank=True, default=correlation.current, db_index=True)

    class Meta:
        ordering = ["-at", "-id"]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        return f"{self.user or 'system'}: {self.action} {self.target}"


class QueueState(models.Model):
    """Whether a queue is paused, or (``queue = "*"``) all processing is suspended: the database holds it, Redis
    only caches it for the workers (queues.control), so a Redis flush or failover never silently resumes work."""

    ALL = "*"

    queue = models.CharField(max_length=8, unique=True)
    paused = models.BooleanField(default=False)
    changed_at = models.DateTimeField(default=timezone.now)
    changed_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)

    class Meta:
        default_permissions = ()

    def __str__(self) -> str:
        what = "all processing" if self.queue == self.ALL else f"queue {self.queue}"
        return f"{what}: {'paused' if self.paused else 'running'}"


class LiveWorker(models.Model):
    """No table: the admin's live worker page hangs off this model (its look, login, permissions)."""

    class Meta:
        managed = False
        verbose_name = "live worker"
        default_permissions = ("view",)


class BulkOperation(models.Model):
    """An operator's action on many tasks, run in the background by a worker, with its progress."""

    class Kind(models.TextChoices):
        REQUEUE = "requeue", "Requeue"
        CANCEL = "cancel", "Cancel"
        PRIORITY = "priority", "Change priority"
        RETRY_NOW = "retry_now", "Retry now"
        EMPTY_QUEUE = "empty_queue", "Empty queue"
        DISCARD = "discard", "Discard dead letters"

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    kind = models.CharField(max_length=12, choices=Kind.choices)
    state = models.CharField(max_length=8, choices=State.choices, default=State.PENDING)
    # What it acts on: the ids of a "selected" action, or (every task matching a filter, a queue being emptied) a
    # description of the filter that the run re-evaluates batch by batch (operations.services.selection_describe).
    task_ids = models.TextField(blank=True, help_text="Comma-separated ids of a 'selected' action.")
    selection = models.JSONField(null=True, blank=True,
                                 help_text="The filter of an 'all matching' action, limited to the tasks it applies to.")
    params = models.JSONField(default=dict, blank=True)
    total = models.PositiveIntegerField(default=0)
    processed = models.PositiveIntegerField(default=0)
    changed = models.PositiveIntegerField(default=0)
    refused = models.PositiveIntegerField(default=0)
    refused_by_status = models.JSONField(default=dict, blank=True)
    message = models.TextField(blank=True)
    # Resuming: each batch commits together with checkpoint (the last task id done) and heartbeat_at (the database's
    # clock). A run whose heartbeat is older than the lease is taken over from the checkpoint by a new run
    # (operations.services.bulk_operations_recover); every write of a run expects its run number, so a late one stops.
    checkpoint = models.PositiveBigIntegerField(default=0)
    runs = models.PositiveIntegerField(default=0, help_text="Times a worker has started it.")
    worker_name = models.CharField(max_length=200, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    address = models.GenericIPAddressField(null=True, blank=True)
    correlation_id = models.CharField(
        max_length=64, blank=True, default=correlation.current,
        help_text="The request that started it: its audit entries, task events and log lines carry this id.")
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} of {self.total} task(s)"

    @property
    def percent(self) -> int:
        # Tasks that became eligible after the start are acted on too (a filter is re-evaluated), so cap it.
        return min(100, int(100 * self.processed / self.total)) if self.total else 100

    def ids(self) -> list[int]:
        return [int(value) for value in self.task_ids.split(",") if value]


class QueueOverview(models.Model):
    """No table: the admin's queues overview and dead-letter pages hang off this model."""

    class Meta:
        managed = False
        verbose_name = "queue overview"
        verbose_name_plural = "queues overview"
        default_permissions = ("view",)


LAST_USED_EVERY = timedelta(minutes=1)


class ApiTokenQuerySet(models.QuerySet):
    def authenticate(self, raw: str):
        """The live token ``raw`` is, with its user, or None. Compared by digest: the table holds no token."""
        if not raw or len(raw) > 200:
            return None
        token = self.select_related("user").filter(digest=ApiToken.digest_of(raw), revoked_at__isnull=True).filter(
            models.Q(expires_at__isnull=True) | models.Q(expires_at__gt=timezone.now())).order_by().first()
        now = timezone.now()
        if token is not None and (token.last_used_at is None or now - token.last_used_at > LAST_USED_EVERY):
            # A minute's precision: a script calling many times a second costs no UPDATE per call.
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return token


class ApiToken(models.Model):
    """A token for scripts calling the HTTP API (``/api/v1/``, the fleet calls ``/api/rq/workers/*`` and the old
    system's maintenance paths).

    It is not the metrics token: it acts as its user, with that user's permissions, and every change is audited as
    that user via the token's name. Only the SHA-256 of the token is stored; the token itself is shown once, when
    ``manage.py api_token create`` issues it."""

    name = models.CharField(max_length=100, unique=True, help_text="What uses it, e.g. 'runbook cron on ops-1'.")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    digest = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(max_length=12, editable=False, help_text="The token's first characters, to tell "
                                                                          "tokens apart.")
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Refused from then on; empty: never expires.")
    rate_limit = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(10000)],
        help_text="Requests a second this token may make on /api/v1/ (bursts of twice that); empty: API_RATE_LIMIT.")

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…, {self.user})"

    @staticmethod
    def digest_of(raw: str) -> str:
        import hashlib

        return hashlib.sha256(raw.encode()).hexdigest()

    @classmethod
    def issue(cls, *, name: str, user, expires_at=None, rate_limit: int | None = None) -> tuple["ApiToken", str]:
        """A new token for ``user``: the row and the token (to show once)."""
        import secrets

        raw = "rqo_" + secrets.token_urlsafe(32)
        return cls.objects.create(name=name, user=user, digest=cls.digest_of(raw), prefix=raw[:10],
                                  expires_at=expires_at, rate_limit=rate_limit), raw
