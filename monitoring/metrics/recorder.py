"""Counters and histograms shared by every process on every host, kept in Redis.

Workers record each ended attempt into an in-process buffer that a daemon thread adds to Redis every second (and
at exit), so recording costs no round trip on the job's path; any portal process reads the sums at scrape time, so
every scrape of any portal process reports the same fleet-wide figures. prometheus_client's multiprocess mode was
the alternative, but it only adds up processes of one host sharing a directory, and our workers run on many hosts.
Errors reaching Redis are buffered the same way and arrive once Redis is back.

The connection-error counters count outages, not failed calls: each process counts one when a service it last
reached stops answering (``Reachability``), however many flushes, scrapes or relay passes fail while the outage
lasts, and counts again only after it has reached the service once more.

Histograms are stored as non-cumulative bucket counts plus sum and count; the collector makes them cumulative.
"""

from __future__ import annotations

import atexit
import bisect
import json
import logging
import os
import socket
import threading
import time
from collections import defaultdict

from django.db.backends.signals import connection_created

from monitoring.metrics import hosts
from portal import redis_pools
from queues import broker
from queues.errors import BrokerUnavailable

logger = logging.getLogger(__name__)

PREFIX = "portal:metrics:"
COUNTERS_KEY = PREFIX + "counters"
# 300 and 600 were appended for the "p95 caption time above 5 minutes" alert (appending keeps the stored bucket
# fields b0..b11 meaning what they meant; earlier attempts above 120 s stay in "inf").
PROCESSING_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0, 300.0, 600.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OUTCOME_STATUS = {"completed": "completed", "failed": "failed", "retry": "retried", "worker_lost": "worker_lost"}
FLUSH_INTERVAL = 1.0
# Each process' Redis pool use: {"<host>:<pid>": {"kind", "peak", "max", "at"}}, written every POOL_REPORT_INTERVAL
# by the process' flusher; reports older than POOL_REPORT_STALE are a process that is gone.
POOLS_KEY = PREFIX + "redis_pools"
POOL_REPORT_INTERVAL = 5.0
POOL_REPORT_STALE = 30.0


def histogram_key(name: str, queue: str) -> str:
    return f"{PREFIX}hist:{name}:{queue}"


def queue_counter(queue: str, status: str) -> str:
    """The counter field of one queue's ended attempts of one status (the fleet-wide one is ``tasks:<status>``)."""
    return f"queue:{queue}:{status}"


def bucket_field(buckets: tuple[float, ...], value: float) -> str:
    """The field of the smallest bucket the value fits in ("inf" above the last bound)."""
    index = bisect.bisect_left(buckets, value)
    return f"b{index}" if index < len(buckets) else "inf"


class Buffer:
    """Increments waiting to be added to Redis: {(key, field): amount}."""

    def __init__(self):
        self._lock = threading.Lock()
        # Held from taking increments until Redis has them (a flush, or a scrape's pipeline): a scrape that ran
        # while the flusher held taken increments in hand would report counters without them.
        self.writing = threading.Lock()
        # Held by the flusher for each round (pool report, then flush): a caller that must read the pool's counters
        # without the flusher taking them first, or using a connection meanwhile, holds it.
        self.cycle = threading.Lock()
        self._amounts: dict[tuple[str, str], float] = defaultdict(float)
        self._flusher_pid: int | None = None

    def add(self, key: str, field: str, amount: float = 1) -> None:
        with self._lock:
            self._amounts[(key, field)] += amount
        self._ensure_flusher()

    def take(self) -> dict[tuple[str, str], float]:
        with self._lock:
            taken, self._amounts = dict(self._amounts), defaultdict(float)
        return taken

    def give_back(self, amounts: dict[tuple[str, str], float]) -> None:
        with self._lock:
            for item, amount in amounts.items():
                self._amounts[item] += amount

    def write(self, pipe, amounts: dict[tuple[str, str], float]) -> None:
        for (key, field), amount in amounts.items():
            if float(amount).is_integer():
                pipe.hincrby(key, field, int(amount))
            else:
                pipe.hincrbyfloat(key, field, amount)

    def flush(self) -> bool:
        with self.writing:
            amounts = self.take()
            if not amounts:
                return True
            try:
                pipe = broker.get_connection().pipeline(transaction=False)
                self.write(pipe, amounts)
                pipe.execute()
            except (BrokerUnavailable, *broker.UNAVAILABLE_ERRORS):
                self.give_back(amounts)
                note_unavailable(service="redis", where="metrics flush")
                return False
        note_available(service="redis")
        return True

    def _ensure_flusher(self) -> None:
        if self._flusher_pid == os.getpid():
            return
        self._flusher_pid = os.getpid()  # one flusher per process, started again in a forked child
        threading.Thread(target=self._flush_forever, name="metrics-flusher", daemon=True).start()
        atexit.register(self._at_exit)

    def _flush_forever(self) -> None:
        stop = threading.Event()
        next_report = 0.0
        while not stop.wait(FLUSH_INTERVAL):
            with self.cycle:
                try:
                    if time.monotonic() >= next_report:
                        next_report = time.monotonic() + POOL_REPORT_INTERVAL
                        report_pool_use()
                    self.flush()
                except Exception:  # never let the flusher die
                    logger.debug("metrics flush failed", exc_info=True)

    def _at_exit(self) -> None:
        self.flush()
        try:
            broker.get_connection().hdel(POOLS_KEY, process_id())
        except Exception:
            pass  # Redis is gone: the report goes stale and is ignored


BUFFER = Buffer()
# Every process that opens its Redis pool runs the flusher, so every process reports its pool's use.
broker.CONNECTION_HOOKS.append(BUFFER._ensure_flusher)


def process_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def report_pool_use() -> None:
    """Puts this process' Redis pool use (the most connections in use at once since the last report) where the
    scrape reads it, and counts the times a caller waited out REDIS_POOL_TIMEOUT."""
    connection = broker.get_connection()
    pool = connection.connection_pool
    if not isinstance(pool, redis_pools.CappedPool | redis_pools.CappedSentinelPool):
        return
    _, peak, exhausted = pool.take_use()
    if exhausted:
        BUFFER.add(COUNTERS_KEY, "redis_pool_exhausted", exhausted)
    report = {"kind": redis_pools.process_kind(), "peak": peak, "max": pool.max_connections, "at": time.time(),
              "host": socket.gethostname()}
    try:
        report.update(hosts.figures())  # this process' memory and CPU, its host's (or container's) CPU and memory
    except Exception:  # psutil cannot read them here: the pool's figures still go
        logger.debug("host figures unavailable", exc_info=True)
    try:
        connection.hset(POOLS_KEY, process_id(), json.dumps(report))
    except (BrokerUnavailable, *broker.UNAVAILABLE_ERRORS):
        pass  # the next report, once Redis answers


def process_reports(raw: dict, now: float) -> tuple[list[dict], list]:
    """From POOLS_KEY: the live processes' reports, and the fields of processes that stopped reporting (to delete)."""
    reports, gone = [], []
    for field, value in raw.items():
        try:
            report = json.loads(value)
            if now - float(report["at"]) > POOL_REPORT_STALE:
                gone.append(field)
                continue
            report["peak"], report["kind"] = int(report["peak"]), str(report["kind"])
            reports.append(report)
        except (ValueError, KeyError, TypeError):
            gone.append(field)  # not a report this version writes
    return reports, gone


def pool_kinds(reports: list[dict]) -> dict[str, dict]:
    """{kind: {"in_use": the highest peak among its live processes, "processes": how many}} (``process_reports``)."""
    kinds: dict[str, dict] = {}
    for report in reports:
        kind = kinds.setdefault(report["kind"], {"in_use": 0, "processes": 0})
        kind["in_use"] = max(kind["in_use"], report["peak"])
        kind["processes"] += 1
    return kinds



class Reachability:
    """The backing services this process found unreachable and has not reached since."""

    def __init__(self):
        self._lock = threading.Lock()
        self._down: set[str] = set()

    def went_down(self, service: str) -> bool:
        """Marks ``service`` unreachable; True if it was reachable until now (an outage begins)."""
        with self._lock:
            if service in self._down:
                return False
            self._down.add(service)
            return True

    def came_back(self, service: str) -> None:
        with self._lock:
            self._down.discard(service)


REACHABILITY = Reachability()


# The error classes rq_task_errors_total names (a fixed set, so the series stay few); any other is "other".
ERROR_CLASSES = ("PermanentCaptionError", "TransientCaptionError", "CaptionTimeout", "JobTimeoutException",
                 "JobStopped", "WorkerLost")
# Attempts that ran out of time: the captioner's own limits (CaptionTimeout) or rq's hard limit on the job.
TIMEOUT_CLASSES = ("CaptionTimeout", "JobTimeoutException")
# Fleet events counted per pool (rq_worker_crashes_total, rq_worker_restarts_total).
COUNTED_FLEET_EVENTS = ("worker_crashed", "worker_restarted")


def error_label(error_class: str) -> str:
    return error_class if error_class in ERROR_CLASSES else "other"


def record_attempt(*, queue: str, outcome: str, processing_seconds: float | None, wait_seconds: float | None,
                   error_class: str = "", **kwargs) -> None:
    """Receiver of queues.signals.attempt_ended."""
    status = OUTCOME_STATUS.get(outcome, outcome)
    BUFFER.add(COUNTERS_KEY, f"tasks:{status}")
    BUFFER.add(COUNTERS_KEY, queue_counter(queue, status))
    if outcome in ("retry", "worker_lost"):
        BUFFER.add(COUNTERS_KEY, "retries")
    if outcome != "completed":
        BUFFER.add(COUNTERS_KEY, f"errors:{error_label(error_class)}")
        if error_class in TIMEOUT_CLASSES:
            BUFFER.add(COUNTERS_KEY, f"timeouts:{queue}")
    for name, buckets, value in (("processing", PROCESSING_BUCKETS, processing_seconds),
                                 ("wait", WAIT_BUCKETS, wait_seconds)):
        if value is None:
            continue
        key = histogram_key(name, queue)
        BUFFER.add(key, bucket_field(buckets, value))
        BUFFER.add(key, "sum", value)
        BUFFER.add(key, "count")


def record_submitted(*, counts: dict[str, int], **kwargs) -> None:
    """Receiver of queues.signals.tasks_submitted: rq_tasks_submitted_total{queue}."""
    for queue, count in counts.items():
        BUFFER.add(COUNTERS_KEY, f"submitted:{queue}", count)


def record_fleet_event(*, kind: str, pool: str, **kwargs) -> None:
    """Receiver of queues.signals.fleet_event: crashes and restarts of workers, per pool. In memory only (the
    supervisor's main loop sends it)."""
    if kind in COUNTED_FLEET_EVENTS:
        BUFFER.add(COUNTERS_KEY, f"fleet:{kind}:{pool}")


def note_unavailable(*, service: str, where: str = "", **kwargs) -> None:
    """Receiver of queues.signals.service_unavailable (and used by monitoring's own checks): counts an outage of
    ``service`` ("redis" or "database") if this process could reach it until now."""
    if REACHABILITY.went_down(service):
        BUFFER.add(COUNTERS_KEY, "redis_errors" if service == "redis" else "database_errors")


def note_available(*, service: str) -> None:
    """This process reached ``service``: its next failure is a new outage."""
    REACHABILITY.came_back(service)


def _database_connected(**kwargs) -> None:
    # Components that report database failures (relay, supervisor) never say when the database is back; a new
    # connection is the sign: Django reconnects after an error and sends connection_created only when it succeeds.
    note_available(service="database")


connection_created.connect(_database_connected, dispatch_uid="monitoring.metrics.recorder.database_connected")


def flush_pending(pipe) -> dict:
    """Adds this process's buffered increments to ``pipe`` (a scrape reads them in the same round trip). Call it
    holding ``BUFFER.writing`` until the pipeline has run."""
    amounts = BUFFER.take()
    BUFFER.write(pipe, amounts)
    return amounts
