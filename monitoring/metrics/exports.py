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


# --- Alertmanager ---------------------------------------------------------------------------------------------
