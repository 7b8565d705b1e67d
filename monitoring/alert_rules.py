"""The figures alert rules watch ("signals"), how the portal computes each, and the PromQL Prometheus uses for it.

A rule row (monitoring.models.AlertRule) names a signal, a comparison and a threshold. The portal's evaluator
(monitoring.alerts) reads every signal from one ``Readings`` per pass; ``export_prometheus_rules`` turns the same
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
            from monitoring.collectors import take_snapshot

            self._snapshot = take_snapshot()
        return self._snapshot

    @cached_property
    def health(self) -> dict:
        from monitoring.health import health_report

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
                        .values("completed", "failed", "retried", "minutes", "processing_count", "processing_p95",
                                "wait_p95"))
        except DatabaseError:
            return None
        if not rows:
            return None
        total = {key: sum(row[key] for row in rows) for key in ("completed", "failed", "retried", "minutes",
                                                                "processing_count")}
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
    database does not answer, "does not apply" before either has ever run."""
    monitors = readings.snapshot.monitors
    if monitors is None or not readings.snapshot.database_ok:
        return None
    if not monitors:
        return Reading.not_applicable("neither the sampler nor the evaluator has run yet")
    worst = max(monitors.values(), key=lambda state: state.silent_intervals(readings.now))
    silent = worst.silent_intervals(readings.now)
    return Reading(round(silent, 2), detail=f"the {worst.name} last passed {worst.age(readings.now):.0f} s ago "
                                            f"(every {worst.interval:g} s when it runs)")


def _error_rate(window: dict) -> Reading:
    ended = window["completed"] + window["failed"] + window["retried"]
    return Reading((window["failed"] + window["retried"]) / ended) if ended else Reading.not_applicable("idle")


def _success_rate(window: dict) -> Reading:
    ended = window["completed"] + window["failed"]
    return Reading(window["completed"] / ended) if ended else Reading.not_applicable("idle")


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
]}


def signal_choices() -> list[tuple[str, str]]:
    return [(key, f"{key}: {signal.label}") for key, signal in SIGNALS.items()]


# The seeded rules (data migration monitoring 0005 writes them once; operators edit them in the admin after).
# name, title, signal, comparison, threshold, for (s), severity, component, labels, inhibited by, runbook.
REDIS_RUNBOOK = ("Check the Redis server (systemctl status redis, `redis-cli ping`). Tasks are not lost: they wait "
                 "in the database and the relay publishes them when Redis answers again.")
MONITORING_RUNBOOK = ("Start the one that is silent (its health component names it): `manage.py run_sampler` "
                      "writes the per-minute samples the window rules read, `manage.py evaluate_alerts` judges the "
                      "rules and sends the notifications. While the sampler is silent the window rules cannot "
                      "fire; while the evaluator is, only this rule (judged by the sampler) can.")
DEFAULT_RULES = [
    ("no-active-workers", "No caption worker is alive", "workers_alive", "<", 1, 0, "critical", "workers", {},
     ["redis-unreachable"], "Nothing processes tasks. Check `manage.py runworkers` on the worker hosts and the "
                            "pools' desired counts in the admin."),
    ("redis-unreachable", "Redis is unreachable", "redis_up", "<", 1, 0, "critical", "redis", {}, [], REDIS_RUNBOOK),
    ("database-unreachable", "The database is unreachable", "database_up", "<", 1, 0, "critical", "database", {}, [],
     "Check the database server. Workers put jobs back and wait; nothing completes until it answers."),
    ("health-unhealthy", "The health check says unhealthy", "health_unhealthy", ">", 0, 0, "critical", "health", {},
     ["redis-unreachable", "database-unreachable", "no-active-workers"],
     "Open /api/rq/health: it names the component that is unhealthy."),
    ("backlog-high", "More than 100 jobs wait", "backlog_total", ">", 100, 15 * 60, "warning", "queues", {},
     ["redis-unreachable", "no-active-workers"], "Scale the pools up in the admin, or look for stuck workers."),
    ("dead-letters-high", "More than 10 dead letters", "dead_letters", ">", 10, 30 * 60, "error", "tasks", {},
     ["redis-unreachable"], "Open the dead letters in the admin, grouped by error class; fix the cause, requeue."),
    ("processing-slow", "p95 caption time above 5 minutes", "processing_p95_seconds", ">", 300, 3600, "warning",
     "tasks", {}, [], "The captioning backend is slow or overloaded; check the Ollama server."),
    ("processing-stuck", "A task has been PROCESSING for more than 2 hours", "oldest_processing_seconds", ">",
     7200, 0, "warning", "tasks", {}, ["database-unreachable"],
     "Find the task in the admin (status PROCESSING, oldest first) and its worker in the live workers page."),
    ("redis-memory-high", "Redis uses more than 80 % of maxmemory", "redis_memory_ratio", ">", 0.8, 3600,
     "warning", "redis", {}, ["redis-unreachable"],
     "Clean up finished jobs (tasks cleanup) or give Redis more memory."),
    ("throughput-low", "Fewer than 5 tasks a minute complete while tasks wait", "throughput_per_minute", "<", 5,
     2 * 3600, "warning", "queues", {}, ["redis-unreachable", "no-active-workers", "database-unreachable"],
     "Workers are stuck or slow: see the live workers page and the captioner's health."),
    ("error-rate-high", "More than 5 % of attempts end in an error", "error_rate", ">", 0.05, 30 * 60, "warning",
     "tasks", {}, ["redis-unreachable", "database-unreachable"], "See the dead letters and retries by error class."),
    ("normal-backlog-high", "More than 200 jobs wait in the normal queue", "queue_backlog", ">", 200, 0,
     "critical", "queues", {"queue": "normal"}, ["redis-unreachable", "no-active-workers"],
     "Scale the pool that serves normal, or pause submissions."),
    ("few-workers", "Fewer than 2 workers are alive", "workers_alive", "<", 2, 5 * 60, "warning", "workers", {},
     ["redis-unreachable", "no-active-workers"], "The fleet runs below its usual minimum; check the pools."),
    ("workers-saturated", "More than 90 % of workers are busy", "busy_ratio", ">", 0.9, 5 * 60, "warning",
     "workers", {}, ["redis-unreachable"], "Add workers before the backlog grows."),
    ("success-rate-low", "Task success rate below 95 %", "success_rate", "<", 0.95, 5 * 60, "warning", "tasks", {},
     ["redis-unreachable", "database-unreachable"], "See the dead letters grouped by error class in the admin."),
    ("wait-long", "p95 queue wait above 30 s", "wait_p95_seconds", ">", 30, 0, "warning", "queues", {},
     ["redis-unreachable", "no-active-workers"], "Tasks wait too long for a worker: scale up."),
    ("redis-clients-high", "Redis clients above 90 % of maxclients", "redis_clients_ratio", ">", 0.9, 0,
     "critical", "redis", {}, ["redis-unreachable"], "Too many connections: check pools and worker counts."),
    ("fallback-active", "Tasks cannot be published to Redis", "fallback_active", ">", 0, 120, "critical", "redis",
     {}, ["redis-unreachable"], "Tasks wait in the database; the relay publishes them when Redis takes them again."),
    ("monitoring-stale", "The portal's sampler or alert evaluator has gone silent", "monitoring_silent", ">=", 3, 0,
     "error", "monitoring", {}, ["redis-unreachable", "database-unreachable"], MONITORING_RUNBOOK),
]


def rules_seed(apps) -> int:
    """Writes the default rules that do not exist yet (by name); returns how many it wrote."""
    rule_model = apps.get_model("monitoring", "AlertRule")
    created = 0
    for (name, title, signal, comparison, threshold, for_seconds, severity, component, labels, _inhibitors,
         runbook) in DEFAULT_RULES:
        _, was_created = rule_model.objects.get_or_create(name=name, defaults=dict(
            title=title, signal=signal, comparison=comparison, threshold=threshold, for_seconds=for_seconds,
            severity=severity, component=component, labels=labels, runbook=runbook))
        created += was_created
    by_name = {rule.name: rule for rule in rule_model.objects.all()}
    for name, *_rest, inhibitors, _runbook in DEFAULT_RULES:
        if name in by_name and not by_name[name].inhibited_by.exists():
            by_name[name].inhibited_by.set([by_name[other] for other in inhibitors if other in by_name])
    return created


# The four levels of the old system's escalation list, each notified when a firing alert is still unacknowledged
# that many minutes after it fired (the routes notify at once). Their channels are left empty: an Admin attaches
# the channels each level uses (the timeline records an escalation to a level without channels as such).
ESCALATION_LEVELS = [(1, "System administrator", 5), (2, "Development team", 15), (3, "Database administrator", 30),
                     (4, "Management", 60)]


def escalation_seed(apps) -> None:
    policy_model = apps.get_model("monitoring", "EscalationPolicy")
    step_model = apps.get_model("monitoring", "EscalationStep")
    policy, created = policy_model.objects.get_or_create(name="Default escalation",
                                                         defaults={"severities": ["critical", "error"]})
    if created:
        for level, title, after in ESCALATION_LEVELS:
            step_model.objects.create(policy=policy, level=level, title=title, after_minutes=after)
