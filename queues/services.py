"""Submitting and publishing caption tasks.

The row is committed first; its job is published after commit. Publication is claimed with a conditional update
(``published_at`` from NULL to a timestamp) before the job goes to Redis, so the submitter and the relay never both
publish the same task. If Redis is unreachable the claim is undone and the relay publishes the task later.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import urlparse

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import DatabaseError, IntegrityError, transaction
from django.utils import timezone

from portal.db import retry_lock_conflicts
from queues import broker, correlation
from queues.captioners.fetch import ALLOWED_SCHEMES, is_remote, media_path
from queues.errors import BrokerUnavailable, PermanentCaptionError
from queues.dispatch import get_policy
from queues.models import CaptionTask, Dispatch, Priority, TaskStatus
from queues.signals import service_unavailable, tasks_submitted

logger = logging.getLogger(__name__)

SUBMIT_BATCH_SIZE = 1000
RELAY_BATCH_SIZE = 1000


@dataclass(frozen=True)
class TaskSpec:
    image_ref: str
    priority: str = Priority.NORMAL
    idempotency_key: str | None = None


@dataclass
class SubmitResult:
    created: list[int] = field(default_factory=list)
    existing: list[int] = field(default_factory=list)

    @property
    def created_count(self) -> int:
        return len(self.created)


def validate_image_ref(image_ref: str | None) -> str:
    """Returns the cleaned reference or raises ValidationError naming ``image_ref``."""
    image_ref = (image_ref or "").strip()
    if not image_ref:
        raise ValidationError({"image_ref": "An image reference is required: an http(s) URL or a media file path."})
    if len(image_ref) > CaptionTask._meta.get_field("image_ref").max_length:
        raise ValidationError({"image_ref": "The image reference is longer than 2048 characters."})
    if is_remote(image_ref):
        parsed = urlparse(image_ref)
        if parsed.scheme not in ALLOWED_SCHEMES:
            raise ValidationError({"image_ref": f"Unsupported URL scheme {parsed.scheme!r}: use http or https."})
        if not parsed.hostname:
            raise ValidationError({"image_ref": f"The URL {image_ref!r} has no host."})
        return image_ref
    try:
        path = media_path(image_ref)
    except PermanentCaptionError as error:
        raise ValidationError({"image_ref": str(error)}) from None
    try:
        if not path.is_file():
            raise ValidationError({"image_ref": f"No file {image_ref!r} under the media root "
                                                f"({settings.MEDIA_ROOT})."})
        size = path.stat().st_size
    except OSError as error:  # a name too long for the file system, a folder it may not read
        raise ValidationError({"image_ref": f"The file {image_ref[:100]!r} cannot be read: "
                                            f"{error.strerror or error}."}) from None
    if size > settings.IMAGE_MAX_BYTES:
        raise ValidationError({"image_ref": f"The image is {size} bytes, larger than the limit of "
                                            f"{settings.IMAGE_MAX_BYTES} bytes (IMAGE_MAX_BYTES)."})
    return image_ref


def validate_spec(spec: TaskSpec, *, image_ref: str | None = None) -> TaskSpec:
    """Cleans a spec or raises ValidationError naming each bad field. ``image_ref``: already validated."""
    errors: dict[str, str] = {}
    if spec.priority not in Priority.values:
        errors["priority"] = f"Unknown priority {spec.priority!r}: choose one of {', '.join(Priority.values)}."
    key = spec.idempotency_key
    if key is not None and (not key.strip() or len(key) > 200):
        errors["idempotency_key"] = "The idempotency key must be 1 to 200 characters."
    try:
        image_ref = image_ref or validate_image_ref(spec.image_ref)
    except ValidationError as error:
        errors.update({name: messages[0] for name, messages in error.message_dict.items()})
        image_ref = spec.image_ref
    if errors:
        raise ValidationError(errors)
    return TaskSpec(image_ref=image_ref, priority=spec.priority, idempotency_key=key.strip() if key else None)


def task_submit(*, image_ref: str, priority: str = Priority.NORMAL, idempotency_key: str | None = None) -> CaptionTask:
    """Creates one task and publishes it after commit. A known idempotency key returns the existing task."""
    return task_submit_or_find(image_ref=image_ref, priority=priority, idempotency_key=idempotency_key)[0]


def task_submit_or_find(*, image_ref: str, priority: str = Priority.NORMAL, idempotency_key: str | None = None
                        ) -> tuple[CaptionTask, bool]:
    """``task_submit``, saying whether the task is new (False: the idempotency key's existing task)."""
    return _submit_one(validate_spec(TaskSpec(image_ref=image_ref, priority=priority,
                                              idempotency_key=idempotency_key)))


def _submit_one(spec: TaskSpec) -> tuple[CaptionTask, bool]:
    if spec.idempotency_key:
        existing = CaptionTask.objects.filter(idempotency_key=spec.idempotency_key).first()
        if existing:
            return existing, False
    try:
        # A savepoint only where an IntegrityError can come (a key another submission took), so that the caller's
        # transaction stays usable for the lookup below.
        with transaction.atomic(savepoint=bool(spec.idempotency_key)):
            system = get_policy().assign(1)[0]
            task = CaptionTask.objects.create(
                image_ref=spec.image_ref, priority=spec.priority, idempotency_key=spec.idempotency_key,
                publish_after=_due_time(system), dispatch=system,
            )
            if task.dispatch == Dispatch.RQ:
                transaction.on_commit(lambda: tasks_publish(tasks=[(task.pk, task.priority)], fresh=True,
                                                            correlation_id=task.correlation_id))
            transaction.on_commit(lambda: tasks_submitted.send(sender=CaptionTask, counts={task.priority: 1}))
    except IntegrityError:
        # Another submission with the same key committed between our lookup and our insert. Read it with a locking
        # read: under MySQL's REPEATABLE READ a plain SELECT inside the caller's transaction (the admin's add view
        # runs in one) still sees the snapshot taken before that commit, and would find nothing.
        existing = _existing_with_key(spec.idempotency_key)
        if existing is None:
            raise
        return existing, False
    return task, True


def _due_time(system: str):
    """When a new task becomes due: an RQ task after the relay's grace (its submitter publishes it first), a task for
    the database poller at once."""
    if system == Dispatch.RQ:
        return timezone.now() + timedelta(seconds=settings.RELAY_GRACE_SECONDS)
    return timezone.now()


def _existing_with_key(key: str) -> CaptionTask | None:
    queryset = CaptionTask.objects.filter(idempotency_key=key)
    if transaction.get_connection().in_atomic_block:
        queryset = queryset.select_for_update()
    return queryset.first()


def tasks_submit_many(*, specs: Sequence[TaskSpec], batch_size: int = SUBMIT_BATCH_SIZE,
                      on_batch: Callable[[int], None] | None = None) -> SubmitResult:
    """Creates many tasks in batches: one INSERT and, after its commit, one Redis pipeline per batch.

    Every spec is validated before anything is written; a ValidationError names the item and the field.
    ``on_batch(n)`` is called after each batch with the number of specs it handled (for progress bars).
    """
    cleaned, valid_refs = [], {}
    for index, spec in enumerate(specs):
        # Bulk submissions usually share a few references: check each distinct one once (a stat per file).
        if spec.image_ref not in valid_refs:
            try:
                valid_refs[spec.image_ref] = validate_image_ref(spec.image_ref)
            except ValidationError:
                valid_refs[spec.image_ref] = None  # validate_spec below reports it with the other fields
        try:
            cleaned.append(validate_spec(spec, image_ref=valid_refs[spec.image_ref]))
        except ValidationError as error:
            raise ValidationError({f"item {index}: {name}": messages
                                   for name, messages in error.message_dict.items()}) from None
    result = SubmitResult()
    for start in range(0, len(cleaned), batch_size):
        batch = cleaned[start:start + batch_size]
        _submit_batch(batch, result)
        if on_batch:
            on_batch(len(batch))
    return result


def _submit_batch(batch: list[TaskSpec], result: SubmitResult) -> None:
    keys = [spec.idempotency_key for spec in batch if spec.idempotency_key]
    try:
        with transaction.atomic():
            known = dict(CaptionTask.objects.filter(idempotency_key__in=keys).values_list("idempotency_key", "pk")) \
                if keys else {}
            new_rows, seen_keys, repeats = [], set(), []
            for spec in batch:
                if spec.idempotency_key:
                    if spec.idempotency_key in known:
                        continue
                    if spec.idempotency_key in seen_keys:
                        repeats.append(spec.idempotency_key)  # an earlier item's key: that item's task
                        continue
                    seen_keys.add(spec.idempotency_key)
                new_rows.append((spec.image_ref, spec.priority, spec.idempotency_key))
            systems = get_policy().assign(len(new_rows))
            ids = CaptionTask.objects.insert_new(new_rows, publish_after=_due_time(Dispatch.RQ), dispatch=systems)
            to_publish = [(task_id, priority) for task_id, (_, priority, _), system in zip(ids, new_rows, systems)
                          if system == Dispatch.RQ]
            if len(to_publish) < len(ids):
                # Tasks for the database poller are due at once (the grace is the submitter's time to publish).
                CaptionTask.objects.filter(pk__in=[task_id for task_id, system in zip(ids, systems)
                                                   if system != Dispatch.RQ]).update(publish_after=timezone.now())
            if to_publish:
                correlation_id = correlation.current()
                transaction.on_commit(lambda: tasks_publish(tasks=to_publish, fresh=True,
                                                            correlation_id=correlation_id))
            counts = Counter(priority for _, priority, _ in new_rows)
            if counts:
                transaction.on_commit(lambda: tasks_submitted.send(sender=CaptionTask, counts=dict(counts)))
    except IntegrityError:
        # A concurrent submission used one of our idempotency keys: fall back to one task at a time.
        for spec in batch:
            task, created = _submit_one(spec)
            (result.created if created else result.existing).append(task.pk)
        return
    result.created.extend(ids)
    result.existing.extend(known[spec.idempotency_key] for spec in batch if spec.idempotency_key in known)
    if repeats:
        created_with = {key: task_id for (_, _, key), task_id in zip(new_rows, ids) if key}
        result.existing.extend(created_with[key] for key in repeats)


def tasks_publish(*, tasks: Iterable[tuple[int, str]], fresh: bool = False, correlation_id: str = "") -> int:
    """Publishes the jobs of (task id, priority) pairs that are still queued and unpublished.

    ``fresh``: the tasks were just created, so no earlier job of theirs can linger in Redis.

    Returns how many were published. Never raises for an unreachable Redis: the tasks stay unpublished and the
    relay publishes them later (the submission has already succeeded).
    """
    tasks = list(tasks)
    if not tasks:
        return 0
    ids = [task_id for task_id, _ in tasks]
    stamp = timezone.now()
    # Publication makes a task due: a fresh task's relay grace no longer applies once its job is in Redis.
    # On MariaDB this claim can lose a lock cycle to a poller's claim or a worker's update of the same rows: it is
    # one statement, so it runs again. A submitter whose claim still fails has nonetheless submitted (the rows are
    # committed): the relay publishes them after the grace period, so the submitter is not told it failed.
    try:
        claimed = retry_lock_conflicts(lambda: CaptionTask.objects.filter(
            pk__in=ids, status=TaskStatus.QUEUED, dispatch=Dispatch.RQ, published_at__isnull=True).update(
            published_at=stamp, publish_after=stamp))
    except DatabaseError as error:
        if not fresh:
            raise
        logger.warning("Could not claim %d new task(s) for publishing, left for the relay: %s", len(ids), error)
        return 0
    if claimed == 0:
        return 0
    correlation_ids = None
    if not fresh:
        # Published again (the relay, a retry, a requeue, a lost job): each job carries its task's own correlation
        # id. The same read keeps only ours if someone else (a concurrent relay) published part of these.
        rows = CaptionTask.objects.filter(pk__in=ids, published_at=stamp) \
            .values_list("pk", "priority", "correlation_id")
        tasks = [(pk, priority) for pk, priority, _ in rows]
        correlation_ids = {pk: value for pk, _, value in rows if value}
    elif claimed < len(ids):
        # Someone else (the relay, or a concurrent submitter) published part of these; ours carry our stamp.
        tasks = list(CaptionTask.objects.filter(pk__in=ids, published_at=stamp).values_list("pk", "priority"))
    try:
        return broker.publish(tasks, fresh=fresh, correlation_id=correlation_id, correlation_ids=correlation_ids)
    except BrokerUnavailable as error:
        # These tasks were due (we were publishing them): the relay publishes them as soon as Redis takes writes
        # again, not after a fresh task's grace period.
        CaptionTask.objects.filter(pk__in=[task_id for task_id, _ in tasks], published_at=stamp).update(
            published_at=None, publish_after=stamp)
        logger.warning("Redis unreachable, %d task(s) left for the relay: %s", len(tasks), error)
        service_unavailable.send(sender=CaptionTask, service="redis", where="publish")
        return 0


def tasks_relay_once(*, batch_size: int = RELAY_BATCH_SIZE, now=None, budget: float | None = None) -> int:
    """Publishes every queued task that has no job in Redis and is due. Returns how many were published.

    ``budget``: stop after about this many seconds (the rest waits for the next pass), so a pass after a long outage
    does not hold the relay lock longer than its expiry.

    Raises BrokerUnavailable if Redis is unreachable, so the relay can report it. Before anything, the dispatch
    policy keeps its state (queues.dispatch): the fallback to the database poller starts and ends here.
    """
    redis_up = broker.ping()
    get_policy().maintain(redis_up=redis_up)
    if not redis_up:
        raise BrokerUnavailable("Redis does not answer PING")
    if broker.captioner_problem():
        # The captioner is misconfigured: every task would only be held again. One task per pass probes whether it
        # has been fixed (its success clears the problem); the rest wait.
        batch_size, budget = 1, 0.0
    published = 0
    deadline = time.monotonic() + budget if budget is not None else None
    while published == 0 or deadline is None or time.monotonic() < deadline:
        batch = list(CaptionTask.objects.due_for_publishing(now).order_by("publish_after", "pk")
                     .values_list("pk", "priority")[:batch_size])
        if not batch:
            return published
        count = tasks_publish(tasks=batch)
        if count == 0:
            if not broker.ping():
                raise BrokerUnavailable("Redis stopped answering while publishing")
            # Redis answers but took none of them (out of memory, read-only), or another relay took them all:
            # either way this pass is over; the tasks are still due for the next one.
            return published
        published += count
        if len(batch) < batch_size:
            return published
    return published
