"""Counters and histograms shared by every process on every host, kept in Redis.

Workers record each ended attempt (one pipelined round trip); any portal process reads them at scrape time, so
every scrape of any portal process reports the same fleet-wide figures. prometheus_client's multiprocess mode was
the alternative, but it only adds up processes of one host sharing a directory, and our workers run on many hosts.

Histograms are stored as non-cumulative bucket counts plus sum and count; the collector makes them cumulative.
"""

from __future__ import annotations

import bisect
import logging
import threading

from queues import broker
from queues.errors import BrokerUnavailable

logger = logging.getLogger(__name__)

PREFIX = "portal:metrics:"
COUNTERS_KEY = PREFIX + "counters"
PROCESSING_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OUTCOME_STATUS = {"completed": "completed", "failed": "failed", "retry": "retried", "worker_lost": "worker_lost"}


def histogram_key(name: str, queue: str) -> str:
    return f"{PREFIX}hist:{name}:{queue}"


def bucket_field(buckets: tuple[float, ...], value: float) -> str:
    """The field of the smallest bucket the value fits in ("inf" above the last bound)."""
    index = bisect.bisect_left(buckets, value)
    return f"b{index}" if index < len(buckets) else "inf"


def record_attempt(*, queue: str, outcome: str, processing_seconds: float | None, wait_seconds: float | None,
                   **kwargs) -> None:
    """Receiver of queues.signals.attempt_ended."""
    try:
        pipe = broker.get_connection().pipeline(transaction=False)
        pipe.hincrby(COUNTERS_KEY, f"tasks:{OUTCOME_STATUS.get(outcome, outcome)}", 1)
        if outcome in ("retry", "worker_lost"):
            pipe.hincrby(COUNTERS_KEY, "retries", 1)
        for name, buckets, value in (("processing", PROCESSING_BUCKETS, processing_seconds),
                                     ("wait", WAIT_BUCKETS, wait_seconds)):
            if value is None:
                continue
            key = histogram_key(name, queue)
            pipe.hincrby(key, bucket_field(buckets, value), 1)
            pipe.hincrbyfloat(key, "sum", value)
            pipe.hincrby(key, "count", 1)
        flush_pending(pipe)
        pipe.execute()
    except (BrokerUnavailable, *broker.UNAVAILABLE_ERRORS):
        note_unavailable(service="redis", where="metrics")


# Errors reaching Redis cannot be counted in Redis at that moment: they wait in this process and are added with its
# next successful write.
_pending: dict[str, int] = {}
_pending_lock = threading.Lock()


def note_unavailable(*, service: str, where: str = "", **kwargs) -> None:
    """Receiver of queues.signals.service_unavailable (and used directly by monitoring's own checks)."""
    field = "redis_errors" if service == "redis" else "database_errors"
    with _pending_lock:
        _pending[field] = _pending.get(field, 0) + 1
    if service != "redis":
        try:
            pipe = broker.get_connection().pipeline(transaction=False)
            flush_pending(pipe)
            pipe.execute()
        except (BrokerUnavailable, *broker.UNAVAILABLE_ERRORS):
            pass


def flush_pending(pipe) -> None:
    with _pending_lock:
        pending = dict(_pending)
        _pending.clear()
    for field, count in pending.items():
        pipe.hincrby(COUNTERS_KEY, field, count)
