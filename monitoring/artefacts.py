"""Prometheus recording/alerting rules and a Grafana dashboard, generated from the metric names this portal serves.

CI checks the rules with ``promtool check rules`` and the dashboard's structure in the test suite.
"""

from __future__ import annotations

import yaml

JOB = 'job="rq-ops-portal"'

RECORDING_RULES = [
    ("rq:queue_length:sum", "sum(rq_queue_length)"),
    ("rq:tasks_completed:rate5m", 'sum(rate(rq_tasks_total{status="completed"}[5m]))'),
    ("rq:tasks_failed:rate5m", 'sum(rate(rq_tasks_total{status="failed"}[5m]))'),
    # No value while no task ends (a ratio of nothing is not a low success rate).
    ("rq:task_success:ratio5m",
     'sum(rate(rq_tasks_total{status="completed"}[5m])) / (sum(rate(rq_tasks_total{status=~"completed|failed"}[5m])) > 0)'),
    ("rq:task_processing_seconds:p95_5m",
     "histogram_quantile(0.95, sum by (le) (rate(rq_task_processing_seconds_bucket[5m])))"),
    ("rq:task_processing_seconds:p50_5m",
     "histogram_quantile(0.5, sum by (le) (rate(rq_task_processing_seconds_bucket[5m])))"),
    ("rq:task_wait_seconds:p95_5m", "histogram_quantile(0.95, sum by (le) (rate(rq_task_wait_seconds_bucket[5m])))"),
    ("rq:task_wait_seconds:p50_5m", "histogram_quantile(0.5, sum by (le) (rate(rq_task_wait_seconds_bucket[5m])))"),
]


def prometheus_alert_name(rule_name: str) -> str:
    """Prometheus wants alert names shaped like metric names: "redis-unreachable" becomes "RQRedisUnreachable"."""
    return "RQ" + "".join(part[:1].upper() + part[1:] for part in rule_name.replace("_", "-").split("-") if part)


def _duration(seconds: int) -> str:
    if seconds and seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def prometheus_alerting_rules(*, max_for_seconds: int | None = None) -> list[dict]:
    """The enabled alert rule rows as Prometheus alerting rules: the same signal, comparison, threshold and
    duration the portal's evaluator uses (monitoring.alert_rules), with the rule's labels and runbook."""
    from django.conf import settings
    from django.urls import reverse

    from monitoring.alert_rules import SIGNALS
    from monitoring.models import AlertRule

    rules = []
    for rule in AlertRule.objects.filter(enabled=True).order_by("name"):
        signal = SIGNALS.get(rule.signal)
        if signal is None:
            continue
        seconds = rule.for_seconds if max_for_seconds is None else min(rule.for_seconds, max_for_seconds)
        runbook_url = rule.runbook_url or settings.PORTAL_URL + reverse("admin:monitoring_alertrule_change",
                                                                        args=[rule.pk])
        entry = {"alert": prometheus_alert_name(rule.name), "expr": signal.condition(rule)}
        if seconds:
            entry["for"] = _duration(seconds)
        entry["labels"] = {"severity": rule.severity, "component": rule.component, "rule": rule.name,
                           **{str(key): str(value) for key, value in (rule.labels or {}).items()}}
        entry["annotations"] = {"summary": rule.title, "description": signal.label, "runbook": rule.runbook,
                                "runbook_url": runbook_url}
        rules.append(entry)
    return rules


def prometheus_rules(*, max_for_seconds: int | None = None) -> str:
    groups = [
        {"name": "rq-ops-portal.recording", "interval": "30s",
         "rules": [{"record": name, "expr": expr} for name, expr in RECORDING_RULES]},
        {"name": "rq-ops-portal.alerts", "rules": prometheus_alerting_rules(max_for_seconds=max_for_seconds)},
    ]
    return yaml.safe_dump({"groups": groups}, sort_keys=False, width=120)


def _panel(panel_id, title, kind, targets, x, y, w=12, h=8, unit=None, **extra):
    panel = {
        "id": panel_id, "type": kind, "title": title, "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "targets": [{"refId": chr(ord("A") + index), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for index, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit} if unit else {}, "overrides": []},
        "options": {},
    }
    panel.update(extra)
    return panel


def grafana_dashboard() -> dict:
    panels = [
        _panel(1, "Jobs waiting", "stat", [("sum(rq_queue_length)", "waiting")], 0, 0, w=6, h=4),
        _panel(2, "Workers alive", "stat", [("rq_workers_active", "workers")], 6, 0, w=6, h=4),
        _panel(3, "Success rate (5 m)", "gauge", [("rq:task_success:ratio5m", "success")], 12, 0, w=6, h=4,
               unit="percentunit"),
        _panel(4, "Worker busy ratio", "gauge", [("rq_worker_busy_ratio", "busy")], 18, 0, w=6, h=4,
               unit="percentunit"),
        _panel(5, "Queue length by queue", "timeseries", [("rq_queue_length", "{{queue}}")], 0, 4),
        _panel(6, "Throughput (tasks/s)", "timeseries",
               [('sum by (status) (rate(rq_tasks_total[5m]))', "{{status}}")], 12, 4, unit="ops"),
        _panel(7, "Processing time p50 / p95", "timeseries",
               [("rq:task_processing_seconds:p50_5m", "p50"), ("rq:task_processing_seconds:p95_5m", "p95")],
               0, 12, unit="s"),
        _panel(8, "Queue wait p50 / p95", "timeseries",
               [("rq:task_wait_seconds:p50_5m", "p50"), ("rq:task_wait_seconds:p95_5m", "p95")], 12, 12, unit="s"),
        _panel(9, "Dead letters by queue", "timeseries", [("rq_dead_letter_size", "{{queue}}")], 0, 20),
        _panel(10, "Workers and busy ratio", "timeseries",
               [("rq_workers_active", "workers"), ("rq_worker_busy_ratio", "busy ratio")], 12, 20),
        _panel(11, "Redis memory", "timeseries",
               [("rq_redis_used_memory_bytes", "used"), ("rq_redis_max_memory_bytes", "max")], 0, 28, unit="bytes"),
        _panel(12, "Redis clients", "timeseries",
               [("rq_redis_connected_clients", "connected"), ("rq_redis_maxclients", "max")], 12, 28),
    ]
    return {
        "uid": "rq-ops-portal", "title": "RQ Ops Portal", "tags": ["rq", "captions"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus", "current": {}}]},
        "annotations": {"list": []},
        "panels": panels,
    }
