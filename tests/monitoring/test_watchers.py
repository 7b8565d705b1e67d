"""Who watches the watchers: the sampler and the alert evaluator record their passes; health and /metrics show them;
the monitoring-stale rule fires when one has been silent for three of its intervals, judged by the other one (real
``run_sampler`` and ``evaluate_alerts`` processes)."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from monitoring.metrics.health import health_report
from monitoring.metrics.monitors import (
    EVALUATOR,
    SAMPLER,
    SAMPLER_INTERVAL,
    monitor_components,
    monitor_pass,
    monitors_read,
)
from monitoring.metrics.snapshot import take_snapshot
from monitoring.models import Alert, AlertRule, MonitorPass, Notification
from tests.monitoring.test_alert_evaluation import only
from tests.monitoring.test_alert_notifications import posted, webhook  # noqa: F401 (a fixture)
from tests.processes import start_command, stop_process, wait_for

pytestmark = pytest.mark.django_db


def silent_since(name: str, seconds: float, interval: float) -> None:
    """``name`` last passed ``seconds`` ago: it stopped then."""
    monitor_pass(name, holder="host-x:1", interval=interval)
    MonitorPass.objects.filter(name=name).update(at=timezone.now() - timedelta(seconds=seconds))


def running_since(name: str, seconds: float) -> None:
    """``name`` began its present run of passes ``seconds`` ago (and has passed at every interval since)."""
    MonitorPass.objects.filter(name=name).update(since=timezone.now() - timedelta(seconds=seconds))


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


def test_a_host_whose_clock_runs_ahead_of_the_databases_judges_the_same_age(monkeypatch):
    """A pass is written on the database's clock; the health report's host judged its age on its own, so a web host
    five minutes ahead showed a sampler that had just passed as silent for five minutes."""
    monitor_pass(SAMPLER, holder="host-a:1", interval=60)
    assert MonitorPass.objects.get(name=SAMPLER).at is not None
    host_clock = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: host_clock() + timedelta(minutes=5))  # the web host's clock
    components = monitor_components(monitors_read(), timezone.now())
    assert components[SAMPLER]["status"] == "healthy" and components[SAMPLER]["last_pass_age_seconds"] < 5
    monkeypatch.setattr(timezone, "now", lambda: host_clock() - timedelta(minutes=5))  # and one behind
    later = monitors_read()
    assert later[SAMPLER].age(timezone.now() + timedelta(seconds=200)) >= 200, "ages still grow with the reader"
    assert monitor_components(later, timezone.now())[SAMPLER]["status"] == "healthy"


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("seeded_alert_rules")
def test_a_sampler_stopped_for_three_intervals_fires_monitoring_stale_and_shows_in_health(redis, client, admin_user):
    """A real sampler records a pass every 2 s (--pass-interval), then is stopped: three of its intervals later the
    running evaluator fires monitoring-stale and health names the sampler; a sampler started again resolves it."""
    only("monitoring-stale")
    AlertRule.objects.filter(name="monitoring-stale").update(clear_seconds=0)
    client.force_login(admin_user)
    sampler = start_command("run_sampler", "--pass-interval", "2")
    evaluator = start_command("evaluate_alerts", "--interval", "1")
    restarted = None
    try:
        wait_for(lambda: client.get(reverse("api-health")).json()["components"][SAMPLER] == "healthy", 60,
                 "the sampler's first pass")
        assert MonitorPass.objects.get(name=SAMPLER).interval_seconds == 2
        assert stop_process(sampler), "the sampler stops on SIGTERM"
        stopped = timezone.now()
        alert = wait_for(lambda: Alert.objects.filter(name="monitoring-stale", state=Alert.State.FIRING).first(),
                         60, "the evaluator to fire monitoring-stale")
        assert (alert.fired_at - stopped).total_seconds() >= 2 * 2, "not before the sampler missed its passes"
        assert alert.value >= 3 and "the sampler last passed" in alert.annotations["detail"]
        health = client.get(reverse("api-health")).json()["component_details"]
        assert health[SAMPLER]["status"] == "warning" and health[SAMPLER]["last_pass_age_seconds"] >= 6
        assert "manage.py run_sampler" in health[SAMPLER]["reason"]
        assert health[EVALUATOR]["status"] == "healthy", "the running evaluator records its passes"
        restarted = start_command("run_sampler", "--pass-interval", "2")
        wait_for(lambda: Alert.objects.filter(name="monitoring-stale", state=Alert.State.FIRING).exists() is False,
                 60, "monitoring-stale to resolve once the sampler is back")
    finally:
        for process in (restarted, sampler, evaluator):
            if process is not None:
                stop_process(process)


def test_the_sampler_refuses_a_pass_interval_out_of_range():
    from django.core.management import CommandError, call_command

    for value in ("0", "0.5", "3601"):
        with pytest.raises(CommandError, match="--pass-interval"):
            call_command("run_sampler", "--pass-interval", value)


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
    from monitoring.alerts.evaluate import EvaluatorState, alerts_cycle

    only("monitoring-stale")
    monitor_pass(SAMPLER, holder="host-a:1", interval=60)
    silent_since(EVALUATOR, 100, interval=10)
    report = alerts_cycle(state=EvaluatorState(holder="host-b:2"))
    assert report["lease"] is True and "monitoring-stale" not in report["evaluation"]["unknown"]
    assert not Alert.objects.filter(name="monitoring-stale").exists()


def test_a_pass_after_a_silence_begins_a_new_run_of_passes():
    monitor_pass(EVALUATOR, holder="host-b:2", interval=10)
    MonitorPass.objects.filter(name=EVALUATOR).update(since=None)  # a row written before runs were recorded
    monitor_pass(EVALUATOR, holder="host-b:2", interval=10)
    assert (timezone.now() - MonitorPass.objects.get(name=EVALUATOR).since).total_seconds() < 5
    began = timezone.now() - timedelta(minutes=10)
    MonitorPass.objects.filter(name=EVALUATOR).update(since=began, at=timezone.now() - timedelta(seconds=20))
    monitor_pass(EVALUATOR, holder="host-b:2", interval=10)  # two intervals late: still the same run
    assert MonitorPass.objects.get(name=EVALUATOR).since == began
    MonitorPass.objects.filter(name=EVALUATOR).update(at=timezone.now() - timedelta(seconds=40))
    monitor_pass(EVALUATOR, holder="host-b:2", interval=10)  # four intervals late: it had stopped
    assert (timezone.now() - MonitorPass.objects.get(name=EVALUATOR).since).total_seconds() < 5


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("seeded_alert_rules")
def test_a_sampler_that_never_ran_fires_monitoring_stale_three_sampler_intervals_after_the_evaluator_began(redis):
    """With no sampler row at all, the reading was the evaluator's own age (about 0): the rule stayed quiet while
    every window rule read unknown. A sampler that never ran is silent from the evaluator's first pass."""
    from monitoring.alerts.evaluate import EvaluatorState, alerts_cycle

    only("monitoring-stale")
    state = EvaluatorState(holder="host-b:2")
    assert alerts_cycle(state=state)["lease"] is True
    assert not MonitorPass.objects.filter(name=SAMPLER).exists()
    running_since(EVALUATOR, 2.5 * SAMPLER_INTERVAL)
    report = alerts_cycle(state=state)
    assert "monitoring-stale" not in report["evaluation"]["unknown"]
    assert not Alert.objects.filter(name="monitoring-stale").exists(), "not before three of the sampler's minutes"
    running_since(EVALUATOR, 3 * SAMPLER_INTERVAL + 5)
    alerts_cycle(state=state)
    alert = Alert.objects.get(name="monitoring-stale", state=Alert.State.FIRING)
    assert 3 <= alert.value < 3.5
    assert "the sampler has never run; the evaluator has passed for 18" in alert.annotations["detail"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("seeded_alert_rules")
def test_an_evaluator_that_never_ran_is_judged_by_the_sampler_three_evaluator_intervals_after_it_began(redis,
                                                                                                     settings):
    from monitoring.alerts.watch import evaluator_watch

    only("monitoring-stale")
    settings.ALERTS_EVALUATION_INTERVAL = 10
    monitor_pass(SAMPLER, holder="host-a:1", interval=SAMPLER_INTERVAL)
    running_since(SAMPLER, 25)
    assert evaluator_watch() is None
    assert not Alert.objects.filter(name="monitoring-stale").exists()
    running_since(SAMPLER, 35)
    report = evaluator_watch()
    assert report is not None and report["evaluation"]["unknown"] == []
    alert = Alert.objects.get(name="monitoring-stale", state=Alert.State.FIRING)
    assert alert.value >= 3 and "the evaluator has never run" in alert.annotations["detail"]
