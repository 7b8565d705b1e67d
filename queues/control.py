"""Queue pauses and the suspension of all processing: rows in the database (``QueueState``), not keys in Redis.

A flush, restart or failover of Redis must never silently resume work an operator stopped, so the state lives
with the tasks. Workers read it through a per-process cache of one second (``paused_queues_cached``,
``processing_suspended_cached``): a pause or resume takes effect within about a second and costs one indexed query
per second per worker, not one per job. If the database cannot be read, a worker keeps what it knew last.
"""

from __future__ import annotations

import logging
import time

from django.db import DatabaseError, close_old_connections
from django.utils import timezone

from queues.models import QUEUE_ORDER, QueueState

logger = logging.getLogger(__name__)

CACHE_SECONDS = 1.0
# Until the database has been read once, a worker takes itself as suspended: a worker started while the database is
# away must not work through queues an operator paused.
_cache: dict = {"until": 0.0, "paused": frozenset({QueueState.ALL})}


def clear_cache() -> None:
    """This process sees the next read at once (the services call it after a change; tests between cases)."""
    _cache["until"] = 0.0


def _paused_rows() -> frozenset[str]:
    return frozenset(QueueState.objects.filter(paused=True).values_list("queue", flat=True))


def _cached() -> frozenset[str]:
    now = time.monotonic()
    if _cache["until"] <= now:
        try:
            close_old_connections()
            _cache["paused"] = _paused_rows()
        except DatabaseError:
            logger.warning("could not read queue pauses; keeping the last known ones", exc_info=True)
        _cache["until"] = now + CACHE_SECONDS
    return _cache["paused"]


def paused_queues_cached() -> frozenset[str]:
    return _cached() - {QueueState.ALL}


def processing_suspended_cached() -> bool:
    return QueueState.ALL in _cached()


def paused_queues() -> set[str]:
    return set(_paused_rows() - {QueueState.ALL})


def processing_suspended() -> bool:
    return QueueState.objects.filter(queue=QueueState.ALL, paused=True).exists()


def _set(name: str, paused: bool, user) -> None:
    QueueState.objects.update_or_create(queue=name, defaults={
        "paused": paused, "changed_at": timezone.now(), "changed_by": user if getattr(user, "pk", None) else None})
    clear_cache()


def queue_set_paused(*, queue: str, paused: bool, user=None) -> None:
    if queue not in QUEUE_ORDER:
        raise ValueError(f"unknown queue {queue!r}; queues are {', '.join(QUEUE_ORDER)}")
    _set(queue, paused, user)


def processing_set_suspended_state(*, suspended: bool, user=None) -> None:
    _set(QueueState.ALL, suspended, user)
