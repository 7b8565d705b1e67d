"""The rules the monitoring documents ask for beyond the first catalogue: queue growing (004), tasks per worker (004),
retries per task (004), host CPU (004) and memory (004 warning, 000 critical), Redis connections beyond seed 002's
safe range. Each judged by the portal's evaluator on real rows, and exported as a Prometheus twin promtool accepts."""

from datetime import timedelta

import pytest
from django.utils import timezone

from monitoring.alerts.evaluate import alerts_evaluate
from monitoring.alerts.exports import prometheus_alert_name, prometheus_rules
from monitoring.alerts.rules import Readings
from monitoring.metrics.snapshot import Snapshot
from monitoring.models import Alert, AlertRule, MetricSample
from tests.monitoring.test_alert_evaluation import only, snapshot

pytestmark = pytest.mark.django_db

NEW_RULES = {"queue-growing": ("backlog_growth", 0, 600, "warning"),
             "tasks-per-worker-high": ("tasks_per_worker", 10, 600, "warning"),
             "retries-high": ("retries_per_task", 2, 0, "warning"),
             "host-cpu-high": ("host_cpu_ratio", 0.8, 300, "warning"),
             "host-memory-high": ("host_memory_ratio", 0.85, 0, "warning"),
             "host-memory-critical": ("host_memory_ratio", 0.9, 300, "critical"),
             "redis-pool-busy": ("redis_pool_use_ratio", 0.8, 300, "warning")}


def test_the_rules_are_seeded_with_the_documents_thresholds():
    rules = {rule.name: (rule.signal, rule.threshold, rule.for_seconds, rule.severity)
             for rule in AlertRule.objects.filter(name__in=NEW_RULES)}
    assert rules == NEW_RULES
    assert list(AlertRule.objects.get(name="host-memory-high").inhibited_by.values_list("name", flat=True)) == [
        "host-memory-critical"]


def evaluate(at, shot: Snapshot):
    return alerts_evaluate(now=at, readings=Readings(now=at, snapshot=shot))


def test_a_backlog_that_grows_for_ten_minutes_fires(redis):
    only("queue-growing")
    t0 = timezone.now().replace(second=30, microsecond=0)
    for minutes_ago, depth in ((5, 100), (4, 130), (3, 150), (2, 170), (1, 200)):
        MetricSample.objects.create(at=t0.replace(second=0) - timedelta(minutes=minutes_ago), queue="", depth=depth)
    evaluate(t0, snapshot())
    alert = Alert.objects.get()
    assert alert.state == Alert.State.PENDING and alert.value == pytest.approx(25.0)  # 100 more jobs in 4 minutes
    later = t0 + timedelta(minutes=10)
    for minutes_ago, depth in ((5, 300), (4, 320), (3, 330), (2, 360), (1, 400)):
        MetricSample.objects.create(at=later.replace(second=0) - timedelta(minutes=minutes_ago), queue="",
                                    depth=depth)
    evaluate(later, snapshot())
    assert Alert.objects.get().state == Alert.State.FIRING

    # A backlog that shrinks is no growth: the alert ends (after its clear time).
    AlertRule.objects.filter(name="queue-growing").update(clear_seconds=0)
    drained = later + timedelta(minutes=10)
    for minutes_ago, depth in ((5, 300), (1, 100)):
        MetricSample.objects.create(at=drained.replace(second=0) - timedelta(minutes=minutes_ago), queue="",
                                    depth=depth)
    evaluate(drained, snapshot())
    assert Alert.objects.get().state == Alert.State.RESOLVED


def test_tasks_per_worker_count_what_waits_and_what_runs_per_caption_slot(redis):
    only("tasks-per-worker-high")
    AlertRule.objects.filter(name="tasks-per-worker-high").update(clear_seconds=0)
    t0 = timezone.now()
    eight_slots = snapshot(lengths={"normal": 19}, workers=2, busy=2)
    for worker in eight_slots.workers:
        worker["slots"] = 8
    evaluate(t0, eight_slots)  # (19 + 2) / 16 slots: 1.3
    evaluate(t0 + timedelta(seconds=10), snapshot(lengths={"normal": 18}, workers=2, busy=2))  # 20 / 2 = 10
    assert not Alert.objects.exists()
    evaluate(t0 + timedelta(seconds=20), snapshot(lengths={"normal": 19}, workers=2, busy=2))  # 10.5
    alert = Alert.objects.get()
    assert alert.state == Alert.State.PENDING and alert.value == 10.5  # a burst is no alert: 10 minutes
    evaluate(t0 + timedelta(minutes=10, seconds=21), snapshot(lengths={"normal": 19}, workers=2, busy=2))
    assert Alert.objects.get().state == Alert.State.FIRING
    # No worker alive: does not apply (no-active-workers pages for that).
    evaluate(t0 + timedelta(minutes=15), snapshot(lengths={"normal": 500}, workers=0))
    assert Alert.objects.get().state == Alert.State.RESOLVED


def test_retries_per_task_from_the_minute_samples(redis):
    only("retries-high")
    t0 = timezone.now().replace(second=30, microsecond=0)
    MetricSample.objects.create(at=t0.replace(second=0) - timedelta(minutes=2), queue="", completed=4, failed=1,
                                retried=10)
    evaluate(t0, snapshot())
    assert not Alert.objects.exists()  # 10 retries over 5 tasks: 2, not above
    MetricSample.objects.create(at=t0.replace(second=0) - timedelta(minutes=1), queue="", completed=0, failed=0,
                                retried=2)
    evaluate(t0, snapshot())
    alert = Alert.objects.get()
    assert alert.state == Alert.State.FIRING and alert.value == pytest.approx(12 / 5)


def test_host_cpu_and_memory_name_the_host_and_the_critical_memory_alert_holds_back_the_warning(redis):
    only("host-cpu-high", "host-memory-high", "host-memory-critical")
    t0 = timezone.now()
    shot = snapshot()
    shot.hosts = {"worker-1": {"cpu": 0.95, "memory": 0.87}, "web-1": {"cpu": 0.2, "memory": 0.5}}
    evaluate(t0, shot)
    cpu = Alert.objects.get(name="host-cpu-high")
    assert cpu.state == Alert.State.PENDING and cpu.value == 0.95 and cpu.annotations["detail"] == "host worker-1"
    assert Alert.objects.get(name="host-memory-high").state == Alert.State.FIRING
    assert not Alert.objects.filter(name="host-memory-critical").exists()
    shot.hosts["worker-1"]["memory"] = 0.93
    evaluate(t0 + timedelta(seconds=10), shot)
    assert Alert.objects.get(name="host-memory-critical").state == Alert.State.PENDING  # 5 minutes first
    evaluate(t0 + timedelta(minutes=5, seconds=11), shot)
    critical = Alert.objects.get(name="host-memory-critical")
    assert critical.state == Alert.State.FIRING and critical.value == 0.93
    warning = Alert.objects.get(name="host-memory-high")
    assert warning.inhibited_by_id == critical.pk  # not notified while the critical one fires
    assert Alert.objects.get(name="host-cpu-high").state == Alert.State.FIRING  # after its 5 minutes
    # A host whose processes have not measured CPU yet (their first second) says nothing about CPU.
    shot.hosts = {"new-host": {"memory": 0.2}}
    AlertRule.objects.update(clear_seconds=0)
    evaluate(t0 + timedelta(minutes=6), shot)
    assert Alert.objects.get(name="host-cpu-high").state == Alert.State.RESOLVED
    # No process has reported its host: does not apply, nothing fires.
    Alert.objects.all().delete()
    shot.hosts = {}
    evaluate(t0 + timedelta(minutes=6), shot)
    assert not Alert.objects.exists()


def test_redis_connections_beyond_the_safe_range(redis, settings):
    only("redis-pool-busy")
    settings.REDIS_MAX_CONNECTIONS = 50
    t0 = timezone.now()
    shot = snapshot()
    shot.redis_pools = {"web": {"in_use": 40, "processes": 3}, "worker": {"in_use": 2, "processes": 4}}
    evaluate(t0, shot)
    assert not Alert.objects.exists()  # 40 of 50: the top of seed 002's safe range
    shot.redis_pools["web"]["in_use"] = 45
    evaluate(t0 + timedelta(seconds=10), shot)
    assert Alert.objects.get().state == Alert.State.PENDING  # one 5-second peak is no alert
    evaluate(t0 + timedelta(minutes=5, seconds=11), shot)
    alert = Alert.objects.get()
    assert alert.state == Alert.State.FIRING and alert.value == 0.9


def test_each_new_rule_has_a_prometheus_twin():
    """Its PromQL; promtool checks the whole export, these rules with the others (test_artefacts)."""
    exported = prometheus_rules()
    for name in NEW_RULES:
        assert f"alert: {prometheus_alert_name(name)}" in exported, name
    assert "deriv(sum(rq_queue_length)[5m:30s]) * 60" in exported
    assert "(max by (host) (rq_host_memory_usage_ratio)) > 0.9" in exported  # one alert per host
