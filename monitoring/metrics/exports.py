"""Prometheus recording rules and a Grafana dashboard made from the metrics the portal serves
(``export_prometheus_rules`` writes the recording rules beside the alerting rules; ``export_grafana_dashboard`` the
dashboard). Checked with ``promtool check rules`` and, for the dashboard, its structure, in the test suite."""

from __future__ import annotations

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
    ("rq:task_processing_seconds:p99_5m",
     "histogram_quantile(0.99, sum by (le) (rate(rq_task_processing_seconds_bucket[5m])))"),
    ("rq:task_wait_seconds:p95_5m", "histogram_quantile(0.95, sum by (le) (rate(rq_task_wait_seconds_bucket[5m])))"),
    ("rq:task_wait_seconds:p50_5m", "histogram_quantile(0.5, sum by (le) (rate(rq_task_wait_seconds_bucket[5m])))"),
]


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


def _thresholds(*steps) -> dict:
    """Grafana's absolute thresholds: (colour, from value) pairs, the first from -infinity."""
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for color, value in steps]}


def grafana_dashboard() -> dict:
    """The documents' dashboards (seed 000's RQ system monitoring, seed 004's overview) on the portal's metrics,
    with Grafana's current panel types (no graph or singlestat, which Grafana 11 no longer draws)."""
    success = _panel(3, "Success rate (5 m)", "gauge", [("rq:task_success:ratio5m", "success")], 12, 0, w=6, h=4,
                     unit="percentunit")
    # Seed 004's thresholds: red below 90 %, yellow to 95 %, green above.
    success["fieldConfig"]["defaults"].update(min=0, max=1, thresholds=_thresholds(("red", None), ("yellow", 0.9),
                                                                                   ("green", 0.95)))
    health = _panel(13, "System health", "stat", [("rq_system_health", "health")], 0, 4, w=6, h=4)
    # Seed 000's singlestat: thresholds 0.5, 1 (0 unhealthy, 1 healthy), shown as words.
    health["fieldConfig"]["defaults"].update(
        thresholds=_thresholds(("red", None), ("green", 0.5)),
        mappings=[{"type": "value", "options": {"0": {"text": "unhealthy"}, "1": {"text": "healthy"}}}])
    health["options"] = {"colorMode": "background", "graphMode": "none"}
    panels = [
        _panel(1, "Jobs waiting", "stat", [("sum(rq_queue_length)", "waiting")], 0, 0, w=6, h=4),
        _panel(2, "Workers alive", "stat", [("rq_workers_active", "workers")], 6, 0, w=6, h=4),
        success,
        _panel(4, "Worker busy ratio", "gauge", [("rq_worker_busy_ratio", "busy")], 18, 0, w=6, h=4,
               unit="percentunit"),
        health,
        _panel(14, "Active tasks", "stat", [("sum(rq_worker_slots_busy)", "running")], 6, 4, w=6, h=4),
        _panel(15, "Submitted (5 m)", "stat", [("sum(increase(rq_tasks_submitted_total[5m]))", "submitted")],
               12, 4, w=6, h=4),
        _panel(16, "Task status distribution (attempts by outcome)", "piechart",
               [("sum by (status) (increase(rq_tasks_total[$__range]))", "{{status}}")], 18, 4, w=6, h=4),
        _panel(5, "Queue length by queue", "timeseries", [("rq_queue_length", "{{queue}}")], 0, 8),
        _panel(6, "Throughput (tasks/s)", "timeseries",
               [('sum by (status) (rate(rq_tasks_total[5m]))', "{{status}}")], 12, 8, unit="ops"),
        _panel(7, "Processing time p50 / p95 / p99", "timeseries",
               [("rq:task_processing_seconds:p50_5m", "p50"), ("rq:task_processing_seconds:p95_5m", "p95"),
                ("rq:task_processing_seconds:p99_5m", "p99")], 0, 16, unit="s"),
        _panel(8, "Queue wait p50 / p95", "timeseries",
               [("rq:task_wait_seconds:p50_5m", "p50"), ("rq:task_wait_seconds:p95_5m", "p95")], 12, 16, unit="s"),
        _panel(9, "Dead letters by queue", "timeseries", [("rq_dead_letter_size", "{{queue}}")], 0, 24),
        _panel(10, "Workers and busy ratio", "timeseries",
               [("rq_workers_active", "workers"), ("rq_worker_busy_ratio", "busy ratio")], 12, 24),
        _panel(17, "Worker CPU (cores, by host)", "timeseries",
               [('sum by (host) (rq_portal_process_cpu_usage_cores{kind="worker"})', "{{host}}")], 0, 32),
        _panel(18, "Worker memory (by pool and host)", "timeseries",
               [("rq_worker_memory_bytes", "{{pool}} on {{host}}")], 12, 32, unit="bytes"),
        _panel(19, "Host CPU and memory", "timeseries",
               [("rq_host_cpu_usage_ratio", "CPU {{host}}"), ("rq_host_memory_usage_ratio", "memory {{host}}")],
               0, 40, unit="percentunit"),
        _panel(20, "Errors by class (rate, 5 m)", "timeseries",
               [("sum by (error_class) (rate(rq_task_errors_total[5m]))", "{{error_class}}"),
                ("sum(rate(rq_task_timeouts_total[5m]))", "timeouts")], 12, 40, unit="ops"),
        _panel(11, "Redis memory", "timeseries",
               [("rq_redis_used_memory_bytes", "used"), ("rq_redis_max_memory_bytes", "max")], 0, 48, unit="bytes"),
        _panel(12, "Redis clients", "timeseries",
               [("rq_redis_connected_clients", "connected"), ("rq_redis_maxclients", "max")], 12, 48),
    ]
    for panel in panels:
        if panel["type"] == "piechart":  # one figure over the dashboard's range, not a series of them
            for target in panel["targets"]:
                target["instant"] = True
    return {
        "uid": "rq-ops-portal", "title": "RQ Ops Portal", "tags": ["rq", "captions"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},  # the documents' range
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus", "current": {}}]},
        "annotations": {"list": []},
        "panels": panels,
    }


# --- Alertmanager ---------------------------------------------------------------------------------------------
