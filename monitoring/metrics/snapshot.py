"""One read of the queue system, shared by /metrics, the JSON APIs, the health report and the alert evaluator.

Each read makes two pipelined Redis round trips (queue lengths, registries, shared counters and histograms, server
INFO, the captioner problem flag, the processes' Redis pool reports; then one read per registered worker) and five
small database reads (an overdue unpublished task; the oldest of the few PROCESSING tasks, both indexed; the dispatch
mode row; the worker pools; the two rows of the portal's own monitors), whatever the number of jobs: no KEYS, no
listing of job ids, no registry cleanup."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import DatabaseError
from django.db.models import Count, Min
from django.utils import timezone
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.worker import Worker

from monitoring.metrics.hosts import host_use
from monitoring.metrics.monitors import monitors_read
from monitoring.metrics.recorder import (
    BUFFER,
    COUNTERS_KEY,
    POOLS_KEY,
    flush_pending,
    histogram_key,
    note_available,
    note_unavailable,
    pool_kinds,
    process_reports,
)
from queues import broker
from queues.dispatch import DispatchStatus, get_policy
from queues.errors import BrokerUnavailable
from queues.fleet.worker import alive_key
from queues.models import CaptionTask, Dispatch, TaskStatus, WorkerPool

# The relay publishes within about a second; unpublished tasks overdue by more than this mean Redis is not taking
# them (the old system's "fallback mode").
FALLBACK_AFTER_SECONDS = 30


@dataclass
class Snapshot:
    """Everything one scrape reads, shared by /metrics and the JSON APIs."""

    redis_ok: bool = False
    redis_error: str = ""
    database_ok: bool = False
    database_error: str = ""
    queue_lengths: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)  # jobs in each queue's started registry
    counters: dict[str, float] = field(default_factory=dict)
    histograms: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    redis_info: dict = field(default_factory=dict)
    maxclients: int | None = None
    workers: list[dict] = field(default_factory=list)
    tasks_by_status: dict[str, int] = field(default_factory=dict)
    overdue_unpublished: bool = False  # queued tasks unpublished for longer than FALLBACK_AFTER_SECONDS
    oldest_processing_started: datetime | None = None  # the oldest PROCESSING task's start (few rows, indexed)
    captioner_problem: dict | None = None  # a captioner misconfiguration reported in the last minutes
    pools: list[dict] = field(default_factory=list)  # name, desired, queue names: the worker pools' rows
    redis_pools: dict[str, dict] = field(default_factory=dict)  # process kind -> Redis pool use (recorder.pool_kinds)
    hosts: dict[str, dict] = field(default_factory=dict)  # host -> {"cpu", "memory"} (metrics.hosts.host_use)
    processes: dict[tuple[str, str], dict] = field(default_factory=dict)  # (kind, host) -> {"rss", "cpu", ...}
    dispatch: DispatchStatus = field(default_factory=DispatchStatus)  # mode, fallback, submission pause
    monitors: dict | None = None  # the sampler's and the evaluator's last passes (metrics.monitors); None: unread

    @property
    def publishing_fallback(self) -> bool:
        """Tasks are waiting in the database because Redis is not taking them, or the fallback to the database
        poller is on (migration.dispatch)."""
        return self.overdue_unpublished or not self.redis_ok or self.dispatch.fallback_active

    @property
    def outages(self) -> dict[str, str]:
        """What does not answer, with the reason: {"redis": ..., "database": ...}; empty when both answer."""
        found = {}
        if not self.redis_ok:
            found["redis"] = f"Redis is unreachable: {self.redis_error}"
        if not self.database_ok:
            found["database"] = f"the database is unreachable: {self.database_error}"
        return found

    @property
    def alive_workers(self) -> list[dict]:
        return [worker for worker in self.workers if worker["alive"]]

    @property
    def busy_ratio(self) -> float:
        """Busy caption slots over all caption slots of the alive workers (a one-slot worker: busy or not)."""
        alive = self.alive_workers
        slots = sum(worker["slots"] for worker in alive)
        return sum(worker["busy_slots"] for worker in alive) / slots if slots else 0.0


def _decode(mapping: dict) -> dict:
    return {(key.decode() if isinstance(key, bytes) else key): (value.decode() if isinstance(value, bytes) else value)
            for key, value in mapping.items()}


def take_snapshot(*, task_counts: bool = False) -> Snapshot:
    """``task_counts``: also count tasks by status (a GROUP BY over the whole table: the JSON API wants it, but a
    Prometheus scrape must not cost more as the table grows, so /metrics leaves it out)."""
    snapshot = Snapshot()
    try:
        _read_redis(snapshot)
        snapshot.redis_ok = True
        note_available(service="redis")
    except (BrokerUnavailable, *broker.UNAVAILABLE_ERRORS) as error:
        snapshot.redis_error = str(error) or type(error).__name__
        note_unavailable(service="redis", where="metrics")
    try:
        if task_counts:
            snapshot.tasks_by_status = dict(CaptionTask.objects.order_by().values_list("status")
                                            .annotate(count=Count("id")))
        overdue = timezone.now() - timedelta(seconds=FALLBACK_AFTER_SECONDS)
        snapshot.overdue_unpublished = CaptionTask.objects.filter(
            status=TaskStatus.QUEUED, dispatch=Dispatch.RQ, published_at__isnull=True,
            publish_after__lt=overdue).exists()
        snapshot.dispatch = get_policy().status()
        snapshot.pools = [{"name": pool.name, "desired": pool.desired, "queues": pool.queue_names, "slots": pool.slots}
                          for pool in WorkerPool.objects.only("name", "desired", "queues", "slots").order_by("name")]
        snapshot.oldest_processing_started = CaptionTask.objects.filter(status=TaskStatus.PROCESSING).order_by() \
            .aggregate(oldest=Min("started_at"))["oldest"]
        snapshot.monitors = monitors_read()
        snapshot.database_ok = True
        note_available(service="database")
    except DatabaseError as error:
        snapshot.database_error = str(error) or type(error).__name__
        note_unavailable(service="database", where="metrics")
    return snapshot


def _read_redis(snapshot: Snapshot) -> None:
    connection = broker.get_connection()
    with BUFFER.writing:  # after a flush under way: its increments are part of what this process reports
        values = _read_redis_once(connection)
    _fill(snapshot, connection, values)


def _read_redis_once(connection) -> list:
    pipe = connection.pipeline(transaction=False)
    pending = flush_pending(pipe)  # first: this process's buffered increments are part of what it reports
    for name in broker.QUEUE_NAMES:
        pipe.llen(f"rq:queue:{name}")
        pipe.zcard(FailedJobRegistry(name, connection=connection).key)
        pipe.zcard(StartedJobRegistry(name, connection=connection).key)
        pipe.hgetall(histogram_key("processing", name))
        pipe.hgetall(histogram_key("wait", name))
    pipe.hgetall(COUNTERS_KEY)
    pipe.info("memory")
    pipe.info("clients")
    pipe.get(broker.CAPTIONER_PROBLEM_KEY)
    pipe.smembers(Worker.redis_workers_keys)
    pipe.hgetall(POOLS_KEY)
    try:
        values = pipe.execute()
    except Exception:
        BUFFER.give_back(pending)
        raise
    return values[len(pending):]


def _fill(snapshot: Snapshot, connection, values: list) -> None:
    for index, name in enumerate(broker.QUEUE_NAMES):
        length, dead, running, processing, wait = values[index * 5:index * 5 + 5]
        snapshot.queue_lengths[name] = length
        snapshot.dead_letters[name] = dead
        snapshot.running[name] = running
        snapshot.histograms[("processing", name)] = {k: float(v) for k, v in _decode(processing).items()}
        snapshot.histograms[("wait", name)] = {k: float(v) for k, v in _decode(wait).items()}
    counters, memory, clients, problem, worker_keys, pools = values[-6:]
    reports, gone = process_reports(pools, time.time())
    snapshot.redis_pools = pool_kinds(reports)
    snapshot.hosts, snapshot.processes = host_use(reports)
    if gone:
        connection.hdel(POOLS_KEY, *gone)
    snapshot.captioner_problem = json.loads(problem) if problem else None
    snapshot.counters = {k: float(v) for k, v in _decode(counters).items()}
    snapshot.redis_info = {**memory, **clients}
    snapshot.maxclients = _maxclients(connection)

    keys = sorted(key.decode() for key in worker_keys)
    if not keys:
        return
    pipe = connection.pipeline(transaction=False)
    for key in keys:
        pipe.hmget(key, "state", "successful_job_count", "failed_job_count", "hostname")
        pipe.get(alive_key(key.removeprefix(Worker.redis_worker_namespace_prefix)))
    values = pipe.execute()
    for index, key in enumerate(keys):
        (state, done, failed, host), alive = values[index * 2], values[index * 2 + 1]
        payload = json.loads(alive) if alive else {}
        state_text = state.decode() if state else "unknown"
        slots = int(payload.get("slots") or 1)
        busy = (sum(1 for entry in payload.get("running") or [] if entry.get("job")) if slots > 1
                else int(state_text == "busy"))
        snapshot.workers.append({
            "name": key.removeprefix(Worker.redis_worker_namespace_prefix),
            "state": state.decode() if state else "unknown", "alive": bool(alive),
            "successful": int(done or 0), "failed": int(failed or 0),
            "host": host.decode() if host else payload.get("host", ""), "pool": payload.get("pool", ""),
            "rss": payload.get("rss"), "slots": slots, "busy_slots": busy,
        })


_maxclients_cache: dict = {"expires": 0.0, "value": None}


def _maxclients(connection) -> int | None:
    """CONFIG GET maxclients, read once a minute (it rarely changes; CONFIG is often disabled on managed Redis)."""
    now = time.monotonic()
    if now >= _maxclients_cache["expires"]:
        try:
            value = int(connection.config_get("maxclients").get("maxclients"))
        except Exception:
            value = None
        _maxclients_cache.update(value=value, expires=now + 60)
    return _maxclients_cache["value"]


