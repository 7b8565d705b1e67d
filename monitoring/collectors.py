"""The queue system's Prometheus metrics, computed at scrape time.

Each scrape makes two pipelined Redis round trips (queue lengths, registries, shared counters and histograms, server
INFO, the captioner problem flag, the processes' Redis pool reports; then one read per registered worker) and five
small database reads (an overdue unpublished task; the oldest of the few PROCESSING tasks, both indexed; the dispatch
mode row; the worker pools; the two rows of the portal's own monitors), whatever the number of jobs: no KEYS, no
listing of job ids, no registry cleanup. The alert evaluator judges its rules on the same snapshot. Metric names of
the old system are kept so existing dashboards work."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DatabaseError
from django.db.models import Count, Min
from django.utils import timezone
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.worker import Worker

from monitoring.monitors import monitors_read
from monitoring.recorder import (
    BUFFER,
    COUNTERS_KEY,
    OUTCOME_STATUS,
    POOLS_KEY,
    PROCESSING_BUCKETS,
    WAIT_BUCKETS,
    flush_pending,
    histogram_key,
    note_available,
    note_unavailable,
    pool_use,
)
from queues import broker
from queues.dispatch import DispatchStatus, get_policy
from queues.errors import BrokerUnavailable
from queues.models import CaptionTask, Dispatch, TaskStatus, WorkerPool
from queues.worker import alive_key


def _unregister_django_rq_summary() -> None:
    """django-rq defines a Summary named ``rq_request_processing_seconds_total`` in prometheus_client's global
    registry as soon as its stats views are imported (the admin's autodiscovery imports django_rq.admin, which
    imports them), and /metrics serves that registry. The summary times django-rq's own collector, which /metrics
    never runs (it is always zero here), and promtool rejects its name (only counters may end in ``_total``): take
    it out. Importing the module here first makes this independent of import order."""
    try:
        from django_rq.contrib.prometheus import RQCollector
    except ImportError:
        return
    summary = getattr(RQCollector, "summary", None)
    if summary is not None:
        try:
            REGISTRY.unregister(summary)
        except KeyError:  # already out
            pass


_unregister_django_rq_summary()

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
    redis_pools: dict[str, dict] = field(default_factory=dict)  # process kind -> Redis pool use (recorder.pool_use)
    dispatch: DispatchStatus = field(default_factory=DispatchStatus)  # mode, fallback, submission pause
    monitors: dict | None = None  # the sampler's and the evaluator's last passes (monitoring.monitors); None: unread

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
    snapshot.redis_pools, gone = pool_use(pools, time.time())
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


def _histogram(name: str, documentation: str, buckets: tuple[float, ...], snapshot: Snapshot, kind: str):
    family = HistogramMetricFamily(name, documentation, labels=["queue"])
    for queue in broker.QUEUE_NAMES:
        raw = snapshot.histograms.get((kind, queue), {})
        cumulative, points = 0.0, []
        for index, bound in enumerate(buckets):
            cumulative += raw.get(f"b{index}", 0.0)
            points.append((repr(float(bound)), cumulative))
        cumulative += raw.get("inf", 0.0)
        points.append(("+Inf", cumulative))
        family.add_metric([queue], points, sum_value=raw.get("sum", 0.0))
    return family


class QueueSystemCollector:
    def describe(self):
        return []  # registration must not touch Redis; families are produced at scrape time

    def collect(self):
        snapshot = take_snapshot()
        yield from families(snapshot)


def families(snapshot: Snapshot):
    length = GaugeMetricFamily("rq_queue_length", "Jobs waiting in the queue", labels=["queue"])
    dead = GaugeMetricFamily("rq_dead_letter_size", "Jobs in the queue's failed-job registry", labels=["queue"])
    for queue in broker.QUEUE_NAMES:
        if snapshot.redis_ok:
            length.add_metric([queue], snapshot.queue_lengths.get(queue, 0))
            dead.add_metric([queue], snapshot.dead_letters.get(queue, 0))
    yield length
    yield dead

    alive = snapshot.alive_workers
    yield GaugeMetricFamily("rq_workers_active", "Workers alive (liveness key present)", value=len(alive))
    yield GaugeMetricFamily("rq_worker_busy_ratio", "Share of the alive workers' caption slots running a task",
                            value=snapshot.busy_ratio)
    # Per pool and host, not per worker: worker names carry a random suffix, so a label per worker would start new
    # series at every restart (and Prometheus keeps each for its whole retention).
    finished = GaugeMetricFamily(
        "rq_worker_tasks", "Jobs the alive workers of a pool on a host have finished, by outcome (a gauge: each "
        "worker counts from zero when it starts)", labels=["pool", "host", "outcome"])
    memory = GaugeMetricFamily("rq_worker_memory_bytes", "Resident memory of the alive workers of a pool on a host",
                               labels=["pool", "host"])
    slots = GaugeMetricFamily("rq_worker_slots", "Caption slots of the alive workers of a pool on a host (jobs they "
                              "can run at once)", labels=["pool", "host"])
    busy_slots = GaugeMetricFamily("rq_worker_slots_busy", "Caption slots of the alive workers of a pool on a host "
                                   "that are running a task", labels=["pool", "host"])
    groups: dict[tuple[str, str], dict] = {}
    for worker in alive:
        group = groups.setdefault((worker["pool"], worker["host"]),
                                  {"successful": 0, "failed": 0, "rss": None, "slots": 0, "busy_slots": 0})
        group["successful"] += worker["successful"]
        group["failed"] += worker["failed"]
        group["slots"] += worker["slots"]
        group["busy_slots"] += worker["busy_slots"]
        if worker["rss"]:
            group["rss"] = (group["rss"] or 0) + worker["rss"]
    for (pool, host), group in sorted(groups.items()):
        finished.add_metric([pool, host, "successful"], group["successful"])
        finished.add_metric([pool, host, "failed"], group["failed"])
        slots.add_metric([pool, host], group["slots"])
        busy_slots.add_metric([pool, host], group["busy_slots"])
        if group["rss"] is not None:
            memory.add_metric([pool, host], group["rss"])
    yield finished
    yield memory
    yield slots
    yield busy_slots

    yield _histogram("rq_task_processing_seconds", "Time a caption attempt took", PROCESSING_BUCKETS, snapshot,
                     "processing")
    yield _histogram("rq_task_wait_seconds", "Time from publication to a worker starting the task", WAIT_BUCKETS,
                     snapshot, "wait")

    tasks = CounterMetricFamily("rq_tasks", "Ended task attempts by outcome", labels=["status"])
    for status in OUTCOME_STATUS.values():
        tasks.add_metric([status], snapshot.counters.get(f"tasks:{status}", 0.0))
    yield tasks
    yield CounterMetricFamily("rq_task_retries", "Attempts that will be retried", value=snapshot.counters.get(
        "retries", 0.0))
    last_pass = GaugeMetricFamily("rq_monitor_last_pass_timestamp_seconds", "When the portal's own monitor (the "
                                  "sampler, the active alert evaluator) last did its work, Unix time",
                                  labels=["monitor"])
    interval = GaugeMetricFamily("rq_monitor_interval_seconds", "How often the portal's own monitor does its work "
                                 "when it runs", labels=["monitor"])
    for name, state in sorted((snapshot.monitors or {}).items()):
        last_pass.add_metric([name], state.at.timestamp())
        interval.add_metric([name], state.interval)
    yield last_pass
    yield interval
    yield CounterMetricFamily("rq_redis_connection_errors", "Outages of Redis seen by portal, worker and supervisor "
                              "processes (each process counts an outage once)",
                              value=snapshot.counters.get("redis_errors", 0.0))
    yield CounterMetricFamily("rq_database_connection_errors", "Outages of the database seen by portal, worker and "
                              "supervisor processes (each process counts an outage once)",
                              value=snapshot.counters.get("database_errors", 0.0))

    info = snapshot.redis_info
    if snapshot.redis_ok:
        yield GaugeMetricFamily("rq_redis_used_memory_bytes", "Redis used_memory", value=info.get("used_memory", 0))
        yield GaugeMetricFamily("rq_redis_max_memory_bytes", "Redis maxmemory (0: no limit)",
                                value=info.get("maxmemory", 0))
        yield GaugeMetricFamily("rq_redis_connected_clients", "Redis connected_clients",
                                value=info.get("connected_clients", 0))
        if snapshot.maxclients is not None:
            yield GaugeMetricFamily("rq_redis_maxclients", "Redis maxclients", value=snapshot.maxclients)
        in_use = GaugeMetricFamily(
            "rq_redis_pool_connections_in_use", "Most Redis connections in use at once in one process of the kind "
            "over its last 5 s (each process' pool holds at most rq_redis_pool_max_connections)", labels=["kind"])
        for kind, use in sorted(snapshot.redis_pools.items()):
            in_use.add_metric([kind], use["in_use"])
        yield in_use
    yield GaugeMetricFamily("rq_redis_pool_max_connections", "REDIS_MAX_CONNECTIONS: the most Redis connections one "
                            "process' pool opens", value=settings.REDIS_MAX_CONNECTIONS)
    yield CounterMetricFamily("rq_redis_pool_exhausted", "Times a caller found all of its process' Redis "
                              "connections in use for REDIS_POOL_TIMEOUT and got an error",
                              value=snapshot.counters.get("redis_pool_exhausted", 0.0))
    yield GaugeMetricFamily("rq_redis_up", "1 when Redis answers", value=1 if snapshot.redis_ok else 0)
    yield GaugeMetricFamily("rq_database_up", "1 when the database answers", value=1 if snapshot.database_ok else 0)
    from monitoring.health import ORDER, health_report  # health builds on this module

    yield GaugeMetricFamily("rq_health_status", "The health report: 0 healthy, 1 warning, 2 unhealthy",
                            value=ORDER[health_report(snapshot)["status"]])
    if snapshot.database_ok:
        started = snapshot.oldest_processing_started
        yield GaugeMetricFamily("rq_task_oldest_processing_seconds", "Age of the oldest PROCESSING task (0: none)",
                                value=max(0.0, (timezone.now() - started).total_seconds()) if started else 0.0)
    healthy = snapshot.redis_ok and snapshot.database_ok and bool(alive)
    yield GaugeMetricFamily("rq_system_health", "1 when Redis and the database answer and workers are alive",
                            value=1 if healthy else 0)
    yield GaugeMetricFamily("rq_fallback_active", "1 while tasks cannot be published to Redis or the database "
                            "poller runs them in Redis' place", value=1 if snapshot.publishing_fallback else 0)
    if snapshot.database_ok:
        # For a cluster's own scaler (deploy/kubernetes: HPA through the Prometheus adapter, or KEDA): the desired
        # count our autoscaler decided, and the jobs waiting in the pool's queues.
        desired = GaugeMetricFamily("rq_pool_desired_workers", "Workers the pool should run (the pool's desired "
                                    "count, set by the autoscaler or an operator)", labels=["pool"])
        processes = GaugeMetricFamily("rq_pool_desired_processes", "Worker processes the pool should run: its desired "
                                      "caption slots over the slots per process, rounded up", labels=["pool"])
        backlog = GaugeMetricFamily("rq_pool_backlog", "Jobs waiting in Redis in the pool's queues", labels=["pool"])
        for pool in snapshot.pools:
            desired.add_metric([pool["name"]], pool["desired"])
            processes.add_metric([pool["name"]], math.ceil(pool["desired"] / pool["slots"]))
            if snapshot.redis_ok:
                backlog.add_metric([pool["name"]], sum(snapshot.queue_lengths.get(name, 0) for name in pool["queues"]))
        yield desired
        yield processes
        yield backlog
        yield GaugeMetricFamily("rq_submission_paused", "1 while new submissions are held (maintenance)",
                                value=1 if snapshot.dispatch.submission_paused else 0)
