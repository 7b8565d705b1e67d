"""The queue system's Prometheus metrics, computed at scrape time from one snapshot (monitoring.metrics.snapshot).
Metric names of the old system are kept so existing dashboards work."""

from __future__ import annotations

import math

from django.conf import settings
from django.utils import timezone
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from monitoring.metrics.health import ORDER, health_report
from monitoring.metrics.recorder import ERROR_CLASSES, OUTCOME_STATUS, PROCESSING_BUCKETS, WAIT_BUCKETS
from monitoring.metrics.snapshot import Snapshot, take_snapshot
from queues import broker


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
    submitted = CounterMetricFamily("rq_tasks_submitted", "Tasks submitted (committed), by queue", labels=["queue"])
    timeouts = CounterMetricFamily("rq_task_timeouts", "Attempts that ran out of time (the captioner's limits or rq's "
                                   "hard limit on the job), by queue", labels=["queue"])
    for queue in broker.QUEUE_NAMES:
        submitted.add_metric([queue], snapshot.counters.get(f"submitted:{queue}", 0.0))
        timeouts.add_metric([queue], snapshot.counters.get(f"timeouts:{queue}", 0.0))
    yield submitted
    yield timeouts
    errors = CounterMetricFamily("rq_task_errors", "Attempts that ended in an error (failed, retried or lost with "
                                 "their worker), by the error's class (a fixed set; any other is 'other')",
                                 labels=["error_class"])
    for label in (*ERROR_CLASSES, "other"):
        errors.add_metric([label], snapshot.counters.get(f"errors:{label}", 0.0))
    yield errors
    for kind, name, text in (("worker_crashed", "rq_worker_crashes", "Workers that died (a signal or an exit code "
                              "other than 0), by pool"),
                             ("worker_restarted", "rq_worker_restarts", "Workers started again in a slot whose worker "
                              "had exited (after a crash or a requested restart), by pool")):
        family = CounterMetricFamily(name, text, labels=["pool"])
        prefix = f"fleet:{kind}:"
        counted = {field_name[len(prefix):]: amount for field_name, amount in snapshot.counters.items()
                   if field_name.startswith(prefix)}
        for pool in snapshot.pools:  # every pool from zero, so that increase() sees the first crash
            counted.setdefault(pool["name"], 0.0)
        for pool, amount in sorted(counted.items()):
            family.add_metric([pool], amount)
        yield family
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
    host_cpu = GaugeMetricFamily("rq_host_cpu_usage_ratio", "CPU in use on a host running portal processes (or in "
                                 "their container, against its quota), 0..1, as its processes last saw it",
                                 labels=["host"])
    host_memory = GaugeMetricFamily("rq_host_memory_usage_ratio", "Memory in use on a host running portal processes "
                                    "(or in their container, against its limit), 0..1", labels=["host"])
    for host, figures in sorted(snapshot.hosts.items()):
        if "cpu" in figures:
            host_cpu.add_metric([host], figures["cpu"])
        host_memory.add_metric([host], figures["memory"])
    yield host_cpu
    yield host_memory
    process_memory = GaugeMetricFamily("rq_portal_process_memory_bytes", "Resident memory of the portal's processes "
                                       "of a kind (web, supervisor, worker, sampler, command) on a host",
                                       labels=["kind", "host"])
    process_cpu = GaugeMetricFamily("rq_portal_process_cpu_usage_cores", "CPU the portal's processes of a kind on a "
                                    "host used over their last few seconds, in cores", labels=["kind", "host"])
    for (kind, host), figures in sorted(snapshot.processes.items()):
        process_memory.add_metric([kind, host], figures["rss"])
        process_cpu.add_metric([kind, host], figures["cpu"])
    yield process_memory
    yield process_cpu
    yield GaugeMetricFamily("rq_redis_pool_max_connections", "REDIS_MAX_CONNECTIONS: the most Redis connections one "
                            "process' pool opens", value=settings.REDIS_MAX_CONNECTIONS)
    yield CounterMetricFamily("rq_redis_pool_exhausted", "Times a caller found all of its process' Redis "
                              "connections in use for REDIS_POOL_TIMEOUT and got an error",
                              value=snapshot.counters.get("redis_pool_exhausted", 0.0))
    yield GaugeMetricFamily("rq_redis_up", "1 when Redis answers", value=1 if snapshot.redis_ok else 0)
    yield GaugeMetricFamily("rq_database_up", "1 when the database answers", value=1 if snapshot.database_ok else 0)
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
