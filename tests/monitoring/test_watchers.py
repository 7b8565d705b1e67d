"""Who watches the watchers: the sampler and the alert evaluator record their passes; health and /metrics show them;
the monitoring-stale rule fires when one has been silent for three of its intervals, judged by the other one (real
``run_sampler`` and ``evaluate_alerts`` processes)."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from monitoring.collectors import take_snapshot
from monitoring.health import health_report
from monitoring.models import Alert, AlertRule, MonitorPass, Notification
from monitoring.monitors import EVALUATOR, SAMPLER, monitor_pass
from tests.monitoring.test_alert_evaluation import only
from tests.monitoring.test_alert_notifications import posted, webhook  # noqa: F401 (a fixture)
from tests.processes import start_command, stop_process, wait_for

pytestmark = pytest.mark.django_db


def silent_since(name: str, seconds: float, interval: float) -> None:
    """``name`` last passed ``seconds`` ago: it stopped then."""
    monitor_pass(name, holder="host-x:1", interval=interval)
    MonitorPass.objects.filter(name=name).update(at=timezone.now() - timedelta(seconds=seconds))


def test_health_shows_each_monitor_with_the_age_of_its_last_pass(redis):
    components = health_report(take_snapshot())["components"]
    assert components[SAMPLER]["status"] == "warning" and "never run" in components[SAMPLER]["reason"]
    assert components[EVALUATOR]["last_pass_age_seconds"] is None
    monitor_pass(SAMPLER, holder="host-a:1", interval=60)
    silent_since(EVALUATOR, 45, interval=10)
    components = health_report(take_snapshot())["components"]
    assert components[SAMPLER]["status"] == "healthy" and components[SAMPLER]["last_pass_age_seconds"] < 5
    evaluator = components[EVALUATOR]
    assert evaluator["status"] == "warning" and 44 <= evaluator["last_pass_age_seconds"] < 60
    assert "silent for" in evaluator["reason"] and "manage.py evaluate_alerts" in evaluator["reason"]


def test_metrics_export_each_monitors_last_pass(client, admin_user, redis):
    monitor_pass(SAMPLER, holder="host-a:1", interval=60)
    client.force_login(admin_user)
    text = client.get(reverse("metrics")).content.decode()
    [line] = [line for line in text.splitlines() if line.startswith('rq_monitor_last_pass_timestamp_seconds{')]
    assert 'monitor="sampler"' in line and abs(float(line.split()[-1]) - timezone.now().timestamp()) < 30
    assert 'rq_monitor_interval_seconds{monitor="sampler"} 60.0' in text


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("seeded_alert_rules")
def test_a_sampler_silent_for_three_minutes_fires_monitoring_stale_from_the_evaluator(redis, client, admin_user):
    only("monitoring-stale")
    AlertRule.objects.filter(name="monitoring-stale").update(clear_seconds=0)
    client.force_login(admin_user)
    silent_since(SAMPLER, 200, interval=60)  # the sampler stopped 200 s ago: over three of its minutes
    evaluator = start_command("evaluate_alerts", "--interval", "1")
    try:
        alert = wait_for(lambda: Alert.objects.filter(name="monitoring-stale", state=Alert.State.FIRING).first(),
                         30, "the evaluator to fire monitoring-stale")
        assert alert.value >= 3 and "the sampler last passed" in alert.annotations["detail"]
        health = client.get(reverse("api-health")).json()["components"]
        assert health[SAMPLER]["status"] == "warning" and health[SAMPLER]["last_pass_age_seconds"] >= 200
        assert health[EVALUATOR]["status"] == "healthy", "the running evaluator records its passes"
        monitor_pass(SAMPLER, holder="host-a:1", interval=60)  # the sampler is back
        wait_for(lambda: Alert.objects.filter(name="monitoring-stale", state=Alert.State.FIRING).exists() is False,
                 30, "monitoring-stale to resolve")
    finally:
        stop_process(evaluator)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("seeded_alert_rules")
def test_a_silent_evaluator_is_judged_and_paged_by_the_sampler(redis, webhook):  # noqa: F811 (the fixture)
    only("monitoring-stale")
    silent_since(EVALUATOR, 100, interval=10)  # the evaluator stopped 100 s ago: ten of its intervals
    sampler = start_command("run_sampler")
    try:
        alert = wait_for(lambda: Alert.objects.filter(name="monitoring-stale", state=Alert.State.FIRING).first(),
                         30, "the sampler to fire monitoring-stale")
        assert alert.value >= 3 and "the evaluator last passed" in alert.annotations["detail"]
        wait_for(lambda: Notification.objects.filter(status=Notification.Status.DELIVERED).exists(), 30,
                 "the sampler to send the page (the route waits 0 s)")
        [body] = posted(webhook.server)
        assert body["status"] == "firing" and body["alerts"][0]["name"] == "monitoring-stale"
    finally:
        stop_process(sampler)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("seeded_alert_rules")
def test_an_evaluator_back_after_a_downtime_does_not_judge_itself_silent(redis):
    """A deploy stopped the evaluator for 100 s: its row is that old when it starts again. It recorded its pass
    only after judging, so it fired monitoring-stale about itself at every restart."""
    from monitoring.alerts import EvaluatorState, alerts_cycle

    only("monitoring-stale")
    monitor_pass(SAMPLER, holder="host-a:1", interval=60)
    silent_since(EVALUATOR, 100, interval=10)
    report = alerts_cycle(state=EvaluatorState(holder="host-b:2"))
    assert report["lease"] is True and "monitoring-stale" not in report["evaluation"]["unknown"]
    assert not Alert.objects.filter(name="monitoring-stale").exists()
