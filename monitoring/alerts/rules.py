"""The figures alert rules watch ("signals"), how the portal computes each, and the PromQL Prometheus uses for it.

A rule row (monitoring.models.AlertRule) names a signal, a comparison and a threshold. The portal's evaluator
(alerts.evaluate) reads every signal from one ``Readings`` per pass; ``export_prometheus_rules`` turns the same
rows into Prometheus alerting rules through each signal's PromQL, so both judge the same figure against the same
threshold. Window figures (rates, percentiles) cover the last ``WINDOW_MINUTES`` in both: Prometheus with
``rate(...[5m])``, the portal from the per-minute metric samples.

What one pass costs, whatever the number of tasks: one metrics snapshot (two pipelined Redis round trips, an indexed
EXISTS and an indexed MIN over the few PROCESSING rows), one read of the health report's captioner flag and one
indexed read of the last minutes' fleet samples.

A signal answers with a ``Reading``: a value, or "does not apply" (no task ended in the window: no success rate;
nothing waits: no throughput problem), which counts as the condition not holding, exactly as an empty PromQL result
does; or None: the figure cannot be known now (Redis does not answer, so queue lengths are unknown), and the alert
keeps the state it had rather than resolving and firing again after the outage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property

from django.db import DatabaseError
from django.utils import timezone

from monitoring.metrics.monitors import MONITORS, expected_interval, monitor_silent_intervals

WINDOW_MINUTES = 5
CRASH_LOOP_STARTS, CRASH_LOOP_GRACES = 5, 5  # see Readings.fleet_starting


@dataclass(frozen=True)
class Reading:
    value: float | None
    applies: bool = True
    detail: str = ""

    @classmethod
    def not_applicable(cls, detail: str = "") -> Reading:
        return cls(None, applies=False, detail=detail)


class Readings:
    """Everything one evaluation pass reads, each part read once and only if a rule needs it."""

    def __init__(self, *, now: datetime | None = None, snapshot=None, started_at: datetime | None = None):
        self.now = now or timezone.now()
        self._snapshot = snapshot
        self.started_at = started_at  # when the evaluating process started (None: long ago)

    @cached_property
    def snapshot(self):
        if self._snapshot is None:
            from monitoring.metrics.snapshot import take_snapshot

            self._snapshot = take_snapshot()
        return self._snapshot

    @cached_property
    def health(self) -> dict:
        from monitoring.metrics.health import health_report

        return health_report(self.snapshot)

    @cached_property
    def window(self) -> dict | None:
        """Sums over the fleet's minute samples of the last WINDOW_MINUTES; None when the database does not answer
        or no sample covers the window (the sampler does not run)."""
        from monitoring.models import MetricSample

        since = self.now - timedelta(minutes=WINDOW_MINUTES + 1)
        try:
            rows = list(MetricSample.objects.filter(queue="", resolution=MetricSample.Resolution.MINUTE,
                                                    at__gte=since).order_by()
                        .values("at", "depth", "completed", "failed", "retried", "minutes", "processing_count",
                                "processing_p95", "wait_p95"))
        except DatabaseError:
            return None
        if not rows:
            return None
        total = {key: sum(row[key] for row in rows) for key in ("completed", "failed", "retried", "minutes",
                                                                "processing_count")}
        # The backlog's change per minute across the window (first and last sample), None with a single sample.
        rows.sort(key=lambda row: row["at"])
        span = (rows[-1]["at"] - rows[0]["at"]).total_seconds() / 60
        total["depth_growth"] = (rows[-1]["depth"] - rows[0]["depth"]) / span if span > 0 else None
        for key in ("processing_p95", "wait_p95"):
            weighted = [(row[key], max(1, row["processing_count"])) for row in rows if row[key] is not None]
            total[key] = sum(value * weight for value, weight in weighted) / sum(w for _, w in weighted) \
                if weighted else None
        return total

    @cached_property
    def fleet_starting(self) -> bool:
        """Whether the fleet is (re)starting: a supervisor or this evaluator started less than FLEET_START_GRACE
        seconds ago, Redis answers, and fewer caption slots are alive than the pools desire. The supervisor's own
        record says when it started (its SUPERVISOR_STARTED event, written as it starts its workers); the evaluator
        counts its own start because at a fresh start it may run before the supervisor has written anything."""
        from django.conf import settings

        from queues.models import FleetEvent

        grace = timedelta(seconds=settings.FLEET_START_GRACE)
        if not grace or not self.snapshot.redis_ok:
            return False  # with Redis down no worker can start: Redis is the page, the rest are its consequences
        try:
            desired = sum(pool["desired"] for pool in self.snapshot.pools)  # read with the snapshot
            alive = sum(int(worker.get("slots") or 1) for worker in self.snapshot.alive_workers)
            if not desired or alive >= desired:
                return False
            if self.started_at is not None and self.now - self.started_at < grace:
                return True
            # A supervisor that keeps restarting (a crash loop writes a start event each time) is no start: with
            # more than CRASH_LOOP_STARTS starts in CRASH_LOOP_GRACES graces the workers are judged.
            starts = list(FleetEvent.objects.filter(kind=FleetEvent.Kind.SUPERVISOR_STARTED,
                                                    at__gt=self.now - CRASH_LOOP_GRACES * grace)
                          .order_by("-at").values_list("at", flat=True)[:CRASH_LOOP_STARTS + 1])
            return bool(starts) and self.now - starts[0] < grace and len(starts) <= CRASH_LOOP_STARTS
        except DatabaseError:
            return False

    @cached_property
    def oldest_processing_seconds(self) -> float | None:
        if not self.snapshot.database_ok:
            return None
        oldest = self.snapshot.oldest_processing_started
        return max(0.0, (self.now - oldest).total_seconds()) if oldest else 0.0


def _redis(readings: Readings, compute: Callable) -> Reading | None:
    return Reading(float(compute(readings.snapshot))) if readings.snapshot.redis_ok else None


def _ratio(numerator, denominator) -> Reading:
    return Reading(numerator / denominator) if denominator else Reading.not_applicable("no limit set")


def _window(readings: Readings, compute: Callable) -> Reading | None:
    window = readings.window
    if window is None:
        return None
    return compute(window)


def _queue_length(readings: Readings, rule) -> Reading | None:
    queue = (rule.labels or {}).get("queue")
    if not readings.snapshot.redis_ok:
        return None
    if queue:
        return Reading(float(readings.snapshot.queue_lengths.get(queue, 0)))
    return Reading(float(sum(readings.snapshot.queue_lengths.values())))


def _throughput_while_waiting(readings: Readings, rule) -> Reading | None:
    if not readings.snapshot.redis_ok:
        return None
    if not sum(readings.snapshot.queue_lengths.values()):
        return Reading.not_applicable("nothing waits")
    window = readings.window
    if window is None:
        return None
    return Reading(window["completed"] / max(1, window["minutes"]))


def _monitoring_silent(readings: Readings, rule) -> Reading | None:
    """How many of its intervals the sampler or the evaluator (the more silent) has been quiet; None when the
    database does not answer, "does not apply" before either has ever run. One that never ran has no pass to age:
    it counts as silent since the other began its present run of passes (a deployment without a sampler read only
    the evaluator's age, about 0, and never fired)."""
    monitors = readings.snapshot.monitors
    if monitors is None or not readings.snapshot.database_ok:
        return None
    if not monitors:
        return Reading.not_applicable("neither the sampler nor the evaluator has run yet")
    silent, worst = max((monitor_silent_intervals(monitors, name, readings.now), name) for name in MONITORS)
    state = monitors.get(worst)
    if state is None:
        other = next(monitors[name] for name in MONITORS if name in monitors)
        return Reading(round(silent, 2), detail=f"the {worst} has never run; the {other.name} has passed for "
                                                f"{other.passing_for(readings.now):.0f} s (the {worst} passes every "
                                                f"{expected_interval(worst):g} s when it runs)")
    return Reading(round(silent, 2), detail=f"the {worst} last passed {state.age(readings.now):.0f} s ago "
                                            f"(every {state.interval:g} s when it runs)")


def _error_rate(window: dict) -> Reading:
    ended = window["completed"] + window["failed"] + window["retried"]
    return Reading((window["failed"] + window["retried"]) / ended) if ended else Reading.not_applicable("idle")


def _success_rate(window: dict) -> Reading:
    ended = window["completed"] + window["failed"]
    return Reading(window["completed"] / ended) if ended else Reading.not_applicable("idle")


def _backlog_growth(window: dict) -> Reading:
    growth = window["depth_growth"]
    return Reading(round(growth, 3)) if growth is not None else Reading.not_applicable("one sample so far")


def _retries_per_task(window: dict) -> Reading:
    ended = window["completed"] + window["failed"]
    return Reading(window["retried"] / ended) if ended else Reading.not_applicable("no task ended")


def _tasks_per_worker(readings: Readings, rule) -> Reading | None:
    snapshot = readings.snapshot
    if not snapshot.redis_ok:
        return None
    if not snapshot.alive_workers:
        return Reading.not_applicable("no worker")  # no-active-workers says so
    running = sum(int(worker.get("busy_slots") or 0) for worker in snapshot.alive_workers)
    slots = sum(int(worker.get("slots") or 1) for worker in snapshot.alive_workers)
    return Reading((sum(snapshot.queue_lengths.values()) + running) / slots)


def _host_figure(key: str) -> Callable[[Readings, object], Reading | None]:
    def compute(readings: Readings, rule) -> Reading | None:
        snapshot = readings.snapshot
        if not snapshot.redis_ok:
            return None
        measured = {host: figures[key] for host, figures in snapshot.hosts.items() if key in figures}
        if not measured:
            return Reading.not_applicable("no portal process has reported its host yet")
        host = max(measured, key=measured.get)
        return Reading(measured[host], detail=f"host {host}")

    return compute


def _redis_pool_use(readings: Readings, rule) -> Reading | None:
    from django.conf import settings

    snapshot = readings.snapshot
    if not snapshot.redis_ok:
        return None
    if not snapshot.redis_pools:
        return Reading.not_applicable("no process has reported its pool yet")
    kind, use = max(snapshot.redis_pools.items(), key=lambda item: item[1]["in_use"])
    return Reading(use["in_use"] / settings.REDIS_MAX_CONNECTIONS,
                   detail=f"{use['in_use']} of {settings.REDIS_MAX_CONNECTIONS} in a {kind} process")


def _percentile(key: str) -> Callable[[dict], Reading]:
    def compute(window: dict) -> Reading:
        value = window[key]
        return Reading(value) if value is not None else Reading.not_applicable("no attempt timed")

    return compute


@dataclass(frozen=True)
class Signal:
    key: str
    label: str
    unit: str
    compute: Callable[[Readings, object], Reading | None]
    # PromQL for the figure; "{queue}" is replaced by the rule's queue label where the signal is per queue.
    promql: str
    # Extra condition Prometheus must also see (ANDed), mirroring a Reading that does not apply.
    promql_also: str = ""
    notes: str = field(default="", compare=False)
    # About the workers: not judged while the fleet starts (Readings.fleet_starting), so a start does not page.
    about_workers: bool = False

    def condition(self, rule) -> str:
        queue = (rule.labels or {}).get("queue")
        expression = self.promql
        if queue and self.key == "queue_backlog":
            quoted = queue.replace("\\", "\\\\").replace('"', '\\"')  # a PromQL string (the rule admits only queues)
            expression = f'sum(rq_queue_length{{queue="{quoted}"}})'
        condition = f"({expression}) {rule.comparison} {rule.threshold:g}"
        if self.promql_also:
            condition = f"({condition}) and on() ({self.promql_also})"
        return condition


_SUCCESS = 'sum(rate(rq_tasks_total{status="completed"}[5m]))'
_ENDED = 'sum(rate(rq_tasks_total{status=~"completed|failed"}[5m]))'
_ALL_ENDED = 'sum(rate(rq_tasks_total{status=~"completed|failed|retried|worker_lost"}[5m]))'

SIGNALS: dict[str, Signal] = {signal.key: signal for signal in [
    Signal("redis_up", "Redis answers (1) or not (0)", "",
           lambda r, rule: Reading(1.0 if r.snapshot.redis_ok else 0.0, detail=r.snapshot.redis_error), "rq_redis_up"),
    Signal("database_up", "The database answers (1) or not (0)", "",
           lambda r, rule: Reading(1.0 if r.snapshot.database_ok else 0.0, detail=r.snapshot.database_error),
           "rq_database_up"),
    Signal("health_unhealthy", "The health report says unhealthy (1) or not (0)", "",
           lambda r, rule: Reading(1.0 if r.health["status"] == "unhealthy" else 0.0,
                                   detail="; ".join(f"{name}: {component['reason']}" for name, component in
                                                    r.health["components"].items()
                                                    if component["status"] == "unhealthy")),
           "rq_health_status >= bool 2", about_workers=True),
    Signal("workers_alive", "Workers alive (none when Redis does not answer)", "workers",
           lambda r, rule: Reading(float(len(r.snapshot.alive_workers))), "rq_workers_active", about_workers=True),
    Signal("backlog_total", "Jobs waiting in all queues", "jobs", _queue_length, "sum(rq_queue_length)"),
    Signal("queue_backlog", "Jobs waiting in the rule's queue (label queue)", "jobs", _queue_length,
           "sum(rq_queue_length)"),
    Signal("dead_letters", "Jobs in the failed-job registries", "jobs",
           lambda r, rule: _redis(r, lambda s: sum(s.dead_letters.values())), "sum(rq_dead_letter_size)"),
    Signal("processing_p95_seconds", "p95 caption time over 5 minutes", "s",
           lambda r, rule: _window(r, _percentile("processing_p95")), "rq:task_processing_seconds:p95_5m"),
    Signal("wait_p95_seconds", "p95 queue wait over 5 minutes", "s",
           lambda r, rule: _window(r, _percentile("wait_p95")), "rq:task_wait_seconds:p95_5m"),
    Signal("oldest_processing_seconds", "Age of the oldest PROCESSING task", "s",
           lambda r, rule: (Reading(r.oldest_processing_seconds) if r.oldest_processing_seconds is not None
                            else None), "max(rq_task_oldest_processing_seconds)"),
    Signal("redis_memory_ratio", "Redis used memory / maxmemory", "ratio",
           lambda r, rule: (_ratio(r.snapshot.redis_info.get("used_memory", 0), r.snapshot.redis_info.get(
               "maxmemory", 0)) if r.snapshot.redis_ok else None),
           "rq_redis_used_memory_bytes / (rq_redis_max_memory_bytes > 0)"),
    Signal("redis_clients_ratio", "Redis connected clients / maxclients", "ratio",
           lambda r, rule: (_ratio(r.snapshot.redis_info.get("connected_clients", 0), r.snapshot.maxclients or 0)
                            if r.snapshot.redis_ok else None),
           "rq_redis_connected_clients / (rq_redis_maxclients > 0)"),
    Signal("throughput_per_minute", "Tasks completed per minute over 5 minutes, while jobs wait", "tasks/min",
           _throughput_while_waiting, f"{_SUCCESS} * 60", promql_also="sum(rq_queue_length) > 0"),
    Signal("error_rate", "Attempts ending in an error (failed or retried) / all ended attempts, 5 minutes", "ratio",
           lambda r, rule: _window(r, _error_rate),
           f'sum(rate(rq_tasks_total{{status=~"failed|retried|worker_lost"}}[5m])) / ({_ALL_ENDED} > 0)'),
    Signal("success_rate", "Completed / (completed + failed) tasks, 5 minutes", "ratio",
           lambda r, rule: _window(r, _success_rate), f"{_SUCCESS} / ({_ENDED} > 0)"),
    Signal("busy_ratio", "Share of the alive workers' caption slots running a task", "ratio",
           lambda r, rule: _redis(r, lambda s: s.busy_ratio) if r.snapshot.alive_workers else
           (None if not r.snapshot.redis_ok else Reading.not_applicable("no worker")), "rq_worker_busy_ratio",
           about_workers=True),
    Signal("monitoring_silent", "Intervals since the portal's sampler or alert evaluator last did its work (the "
           "larger)", "intervals", _monitoring_silent,
           "max((time() - rq_monitor_last_pass_timestamp_seconds) / (rq_monitor_interval_seconds > 0))"),
    Signal("fallback_active", "Tasks wait in the database because Redis does not take them (1) or not (0)", "",
           lambda r, rule: Reading(1.0 if r.snapshot.publishing_fallback else 0.0), "rq_fallback_active"),
    Signal("backlog_growth", "Change of the jobs waiting, per minute, over 5 minutes (positive: the backlog grows)",
           "jobs/min", lambda r, rule: _window(r, _backlog_growth), "deriv(sum(rq_queue_length)[5m:30s]) * 60"),
    Signal("tasks_per_worker", "Jobs waiting or running per caption slot of the alive workers", "jobs",
           _tasks_per_worker, "(sum(rq_queue_length) + sum(rq_worker_slots_busy)) / (sum(rq_worker_slots) > 0)",
           about_workers=True),
    Signal("retries_per_task", "Retries per task that ended (completed or failed), 5 minutes", "retries",
           lambda r, rule: _window(r, _retries_per_task),
           f"sum(rate(rq_task_retries_total[5m])) / ({_ENDED} > 0)"),
    Signal("host_cpu_ratio", "CPU in use on the busiest host running portal processes (or its container's quota)",
           "ratio", _host_figure("cpu"), "max by (host) (rq_host_cpu_usage_ratio)"),
    Signal("host_memory_ratio", "Memory in use on the fullest host running portal processes (or its container's "
           "limit)", "ratio", _host_figure("memory"), "max by (host) (rq_host_memory_usage_ratio)"),
    Signal("redis_pool_use_ratio", "Most Redis connections one process had in use at once (last 5 s) / "
           "REDIS_MAX_CONNECTIONS", "ratio", _redis_pool_use,
           "max(rq_redis_pool_connections_in_use) / scalar(max(rq_redis_pool_max_connections))"),
]}


def signal_choices() -> list[tuple[str, str]]:
    return [(key, f"{key}: {signal.label}") for key, signal in SIGNALS.items()]
