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
    ("rq:task_success:ratio5m",
     'sum(rate(rq_tasks_total{status="completed"}[5m])) / clamp_min(sum(rate(rq_tasks_total{status=~"completed|failed"}[5m])), 1e-9)'),
    ("rq:task_processing_seconds:p95_5m",
     "histogram_quantile(0.95, sum by (le) (rate(rq_task_processing_seconds_bucket[5m])))"),
    ("rq:task_processing_seconds:p50_5m",
     "histogram_quantile(0.5, sum by (le) (rate(rq_task_processing_seconds_bucket[5m])))"),
    ("rq:task_wait_seconds:p95_5m", "histogram_quantile(0.95, sum by (le) (rate(rq_task_wait_seconds_bucket[5m])))"),
    ("rq:task_wait_seconds:p50_5m", "histogram_quantile(0.5, sum by (le) (rate(rq_task_wait_seconds_bucket[5m])))"),
]

ALERTS = [
    ("RQQueueDepthHigh", "max by (queue) (rq_queue_length) > 100", "5m", "warning",
     "Queue {{ $labels.queue }} has more than 100 jobs waiting", "Scale the pool or look for stuck workers."),
    ("RQQueueGrowing", "sum(deriv(rq_queue_length[10m])) > 0 and sum(rq_queue_length) > 0", "10m", "warning",
     "The backlog has been growing for 10 minutes", "Workers do not keep up with submissions."),
    ("RQNoWorkers", "rq_workers_active == 0", "1m", "critical", "No caption worker is alive",
     "Nothing is processing tasks; check runworkers on the worker hosts."),
    ("RQFewWorkers", "rq_workers_active < 2", "5m", "warning", "Fewer than 2 workers are alive",
     "The fleet runs below its usual minimum."),
    ("RQWorkersSaturated", "rq_worker_busy_ratio > 0.9", "10m", "warning", "More than 90 % of workers are busy",
     "Add workers before the backlog grows."),
    ("RQSuccessRateLow", "rq:task_success:ratio5m < 0.95", "10m", "critical", "Task success rate below 95 %",
     "See the dead letters grouped by error class in the admin."),
    ("RQProcessingSlow", "rq:task_processing_seconds:p95_5m > 60", "10m", "warning",
     "p95 caption time above 60 s", "The captioning backend is slow or overloaded."),
    ("RQWaitLong", "rq:task_wait_seconds:p95_5m > 30", "10m", "warning", "p95 queue wait above 30 s",
     "Tasks wait too long for a worker."),
    ("RQRedisMemoryHigh", "rq_redis_max_memory_bytes > 0 and rq_redis_used_memory_bytes / rq_redis_max_memory_bytes > 0.8",
     "5m", "warning", "Redis uses more than 80 % of maxmemory", "Clean up finished jobs or give Redis more memory."),
    ("RQRedisClientsHigh", "rq_redis_connected_clients / rq_redis_maxclients > 0.9", "5m", "warning",
     "Redis clients above 90 % of maxclients", "Too many connections: check pools and worker counts."),
    ("RQFallbackActive", "rq_fallback_active == 1", "2m", "critical",
     "Tasks cannot be published to Redis", "Tasks wait in the database; the relay publishes them when Redis is back."),
]


def prometheus_rules() -> str:
    groups = [
        {"name": "rq-ops-portal.recording", "interval": "30s",
         "rules": [{"record": name, "expr": expr} for name, expr in RECORDING_RULES]},
        {"name": "rq-ops-portal.alerts", "rules": [
            {"alert": name, "expr": expr, "for": duration, "labels": {"severity": severity},
             "annotations": {"summary": summary, "description": description}}
            for name, expr, duration, severity, summary, description in ALERTS]},
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
