"""Alert evaluation with injected time and injected readings: for-durations, flapping, resolution, unknown figures,
inhibition, the evaluator's lease. Rules are the seeded rows; each test enables only the ones it is about."""

import contextlib
from datetime import timedelta

import pytest
from django.utils import timezone

from monitoring.alerts.evaluate import (
    EvaluatorState,
    alerts_cycle,
    alerts_evaluate,
    database_outage_record,
    lease_acquire,
    lease_release,
)
from monitoring.alerts.rules import Readings
from monitoring.alerts.timeline import fingerprint_of
from monitoring.metrics.snapshot import Snapshot
from monitoring.models import Alert, AlertEvent, AlertRule, Lease, MetricSample

pytestmark = pytest.mark.django_db


def only(*names):
    AlertRule.objects.exclude(name__in=names).update(enabled=False)
    assert AlertRule.objects.filter(enabled=True).count() == len(names)


def worker(state="idle"):
    return {"name": f"w-{state}", "state": state, "alive": True, "successful": 0, "failed": 0, "host": "h",
            "pool": "default", "rss": None, "slots": 1, "busy_slots": int(state == "busy")}


def snapshot(*, redis=True, database=True, lengths=None, workers=2, busy=0, pools=()):
    return Snapshot(redis_ok=redis, redis_error="" if redis else "Connection refused", database_ok=database,
                    pools=[{"name": name, "desired": desired, "queues": [], "slots": 1} for name, desired in pools],
                    queue_lengths=(lengths or {}) if redis else {},
                    dead_letters={"urgent": 0, "high": 0, "normal": 0, "low": 0} if redis else {},
                    workers=([worker("busy") for _ in range(busy)] + [worker() for _ in range(workers - busy)])
                    if redis else [])


def evaluate(at, **kwargs):
    return alerts_evaluate(now=at, readings=Readings(now=at, snapshot=snapshot(**kwargs)))


def kinds(alert):
    return list(alert.events.values_list("kind", flat=True))


def test_backlog_alert_is_pending_until_its_for_duration_then_fires_once(redis):
    only("backlog-high")
    t0 = timezone.now()
    evaluate(t0, lengths={"normal": 150})
    alert = Alert.objects.get()
    assert alert.state == Alert.State.PENDING and alert.value == 150
    evaluate(t0 + timedelta(minutes=14, seconds=59), lengths={"normal": 160})
    assert Alert.objects.get().state == Alert.State.PENDING
    evaluate(t0 + timedelta(minutes=15), lengths={"normal": 170})
    evaluate(t0 + timedelta(minutes=16), lengths={"normal": 180})
    alert = Alert.objects.get()  # one condition, one alert, however many passes
    assert alert.state == Alert.State.FIRING and alert.fired_at == t0 + timedelta(minutes=15)
    assert alert.value == 180 and alert.threshold == 100
    assert kinds(alert) == ["pending", "firing"]
    assert alert.labels == {"alertname": "backlog-high", "severity": "warning", "component": "queues"}
    assert alert.fingerprint == fingerprint_of(alert.labels) and alert.open_key == alert.fingerprint


def test_an_interrupted_condition_restarts_the_for_duration(redis):
    only("backlog-high")
    t0 = timezone.now()
    evaluate(t0, lengths={"normal": 150})
    evaluate(t0 + timedelta(minutes=10), lengths={"normal": 5})
    evaluate(t0 + timedelta(minutes=10, seconds=30), lengths={"normal": 150})
    evaluate(t0 + timedelta(minutes=16), lengths={"normal": 150})
    alert = Alert.objects.get()
    assert alert.state == Alert.State.PENDING, "the condition held only 5.5 minutes without a break"
    evaluate(t0 + timedelta(minutes=25, seconds=30), lengths={"normal": 150})
    alert.refresh_from_db()
    assert alert.state == Alert.State.FIRING and alert.flaps == 1


def test_flapping_continues_one_alert_and_resolution_waits_for_the_clear_time(redis):
    only("redis-unreachable")
    t0 = timezone.now()
    evaluate(t0, redis=False)
    alert = Alert.objects.get()
    assert alert.state == Alert.State.FIRING and alert.fired_at == t0, "immediate rule"
    for offset in (10, 20, 30, 40):  # up, down, up, down: within the 60 s clear time each
        evaluate(t0 + timedelta(seconds=offset), redis=offset % 20 != 0)
    evaluate(t0 + timedelta(seconds=50), redis=True)
    assert Alert.objects.count() == 1
    alert.refresh_from_db()
    assert alert.state == Alert.State.FIRING and alert.flaps == 2
    evaluate(t0 + timedelta(seconds=109), redis=True)
    alert.refresh_from_db()
    assert alert.state == Alert.State.FIRING, "cleared 59 s ago"
    evaluate(t0 + timedelta(seconds=110), redis=True)
    alert.refresh_from_db()
    assert alert.state == Alert.State.RESOLVED and alert.open_key is None
    assert alert.resolved_at == t0 + timedelta(seconds=50), "resolved when the condition stopped, not when judged"
    assert kinds(alert) == ["pending", "firing", "cleared", "returned", "cleared", "returned", "cleared", "resolved"]
    evaluate(t0 + timedelta(seconds=200), redis=False)
    assert Alert.objects.count() == 2, "a new occurrence after resolution is a new alert"
    assert Alert.objects.open().get().fingerprint == alert.fingerprint


def test_a_figure_that_cannot_be_read_keeps_the_alert_as_it_was(redis):
    only("backlog-high")
    AlertRule.objects.filter(name="backlog-high").update(for_seconds=0, clear_seconds=0)
    t0 = timezone.now()
    evaluate(t0, lengths={"normal": 500})
    result = evaluate(t0 + timedelta(minutes=5), redis=False)  # queue lengths unknown while Redis is down
    assert result.unknown == ["backlog-high"]
    alert = Alert.objects.get()
    assert alert.state == Alert.State.FIRING and kinds(alert) == ["pending", "firing"]
    evaluate(t0 + timedelta(minutes=6), lengths={"normal": 3})
    alert.refresh_from_db()
    assert alert.state == Alert.State.RESOLVED, "clear time 0: resolves at the first pass that sees it clear"


def test_per_queue_rule_reads_its_queue_and_has_its_own_fingerprint(redis):
    only("normal-backlog-high", "backlog-high")
    AlertRule.objects.filter(name="backlog-high").update(for_seconds=0)
    t0 = timezone.now()
    evaluate(t0, lengths={"urgent": 150, "normal": 10})
    assert list(Alert.objects.values_list("name", flat=True)) == ["backlog-high"]
    evaluate(t0 + timedelta(seconds=10), lengths={"urgent": 0, "normal": 250})
    alert = Alert.objects.get(name="normal-backlog-high")
    assert alert.state == Alert.State.FIRING and alert.severity == "critical" and alert.labels["queue"] == "normal"
    assert Alert.objects.values("fingerprint").distinct().count() == 2


def test_while_redis_is_unreachable_the_alerts_it_causes_are_marked_as_caused_by_it(redis):
    only("redis-unreachable", "no-active-workers", "health-unhealthy")
    t0 = timezone.now()
    evaluate(t0, redis=False)
    redis_alert = Alert.objects.get(name="redis-unreachable")
    workers_alert = Alert.objects.get(name="no-active-workers")
    health_alert = Alert.objects.get(name="health-unhealthy")
    assert redis_alert.state == workers_alert.state == health_alert.state == Alert.State.FIRING
    assert redis_alert.inhibited_by is None
    assert workers_alert.inhibited_by == redis_alert and health_alert.inhibited_by == redis_alert
    assert "inhibited" in kinds(workers_alert)


def test_window_figures_come_from_the_minute_samples(redis):
    only("success-rate-low", "error-rate-high")
    AlertRule.objects.filter(name__in=["success-rate-low", "error-rate-high"]).update(for_seconds=0)
    t0 = timezone.now().replace(second=30, microsecond=0)
    result = evaluate(t0)
    assert sorted(result.unknown) == ["error-rate-high", "success-rate-low"], "no sample: unknown"
    for minutes_ago in (3, 2, 1):
        MetricSample.objects.create(at=t0.replace(second=0) - timedelta(minutes=minutes_ago), queue="",
                                    completed=30, failed=3, retried=2)
    evaluate(t0)
    success = Alert.objects.get(name="success-rate-low")
    assert success.value == pytest.approx(90 / 99) and success.state == Alert.State.FIRING
    error = Alert.objects.get(name="error-rate-high")
    assert error.value == pytest.approx(15 / 105)


def test_idle_window_resolves_a_rate_alert_instead_of_keeping_it(redis):
    only("success-rate-low")
    AlertRule.objects.filter(name="success-rate-low").update(for_seconds=0, clear_seconds=0)
    t0 = timezone.now().replace(second=30, microsecond=0)
    MetricSample.objects.create(at=t0.replace(second=0) - timedelta(minutes=1), queue="", completed=1, failed=9)
    evaluate(t0)
    assert Alert.objects.get().state == Alert.State.FIRING
    later = t0 + timedelta(minutes=20)
    MetricSample.objects.create(at=later.replace(second=0) - timedelta(minutes=1), queue="", completed=0, failed=0)
    evaluate(later)
    assert Alert.objects.get().state == Alert.State.RESOLVED


def test_editing_a_threshold_or_disabling_a_rule_takes_effect_at_the_next_pass(redis):
    only("few-workers")
    rule = AlertRule.objects.get(name="few-workers")
    rule.for_seconds = 0
    rule.save()
    t0 = timezone.now()
    evaluate(t0, workers=3)
    assert not Alert.objects.exists()
    rule.threshold = 4
    rule.save()
    evaluate(t0 + timedelta(seconds=10), workers=3)
    assert Alert.objects.get().state == Alert.State.FIRING
    rule.enabled = False
    rule.save()
    assert evaluate(t0 + timedelta(seconds=20), workers=3).rules == 0


def test_a_stuck_processing_task_fires_from_the_database(redis):
    from queues.models import CaptionTask, TaskStatus

    only("processing-stuck")
    t0 = timezone.now()
    CaptionTask.objects.create(image_ref="a.png", status=TaskStatus.PROCESSING, started_at=t0 - timedelta(hours=3))
    at = Readings(now=t0)  # the real snapshot: Redis and the database of this test
    alerts_evaluate(now=t0, readings=at)
    alert = Alert.objects.get()
    assert alert.state == Alert.State.FIRING and alert.value == pytest.approx(3 * 3600, abs=5)


def test_one_evaluator_holds_the_lease_and_another_takes_over_when_it_expires():
    assert lease_acquire(holder="host-a:1")
    assert lease_acquire(holder="host-a:1"), "the holder renews"
    assert not lease_acquire(holder="host-b:2")
    Lease.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert lease_acquire(holder="host-b:2")
    assert not lease_acquire(holder="host-a:1")
    lease_release(holder="host-b:2")
    assert lease_acquire(holder="host-a:1")


def test_a_database_outage_is_recorded_after_it_ends(redis):
    started = timezone.now() - timedelta(minutes=3)
    alert = database_outage_record(started_at=started, ended_at=started + timedelta(minutes=2),
                                   error="Lost connection to server")
    assert alert.state == Alert.State.RESOLVED and alert.fired_at == started
    assert alert.time_to_resolve == timedelta(minutes=2)
    assert list(alert.events.values_list("kind", flat=True)) == [AlertEvent.Kind.FIRING, AlertEvent.Kind.RESOLVED]


@pytest.mark.django_db(transaction=True)  # the command drops stale connections, as a long-running process must
@pytest.mark.usefixtures("seeded_alert_rules")
def test_evaluate_alerts_once_reports_its_pass_and_refuses_while_another_evaluator_is_active(redis, capsys):
    import json

    from django.core.management import call_command
    from django.core.management.base import CommandError

    only("no-active-workers")
    call_command("evaluate_alerts", "--once")
    report = json.loads(capsys.readouterr().out)
    assert report["lease"] is True and report["evaluation"]["rules"] == 1
    assert "no-active-workers: pending" in report["evaluation"]["changes"]
    assert Alert.objects.get().state == Alert.State.FIRING, "no worker runs in this test"
    assert not Lease.objects.exists(), "--once hands the lease back"
    lease_acquire(holder="other-host:42")
    with pytest.raises(CommandError, match="other-host:42"):
        call_command("evaluate_alerts", "--once")
    with pytest.raises(CommandError, match="--interval"):
        call_command("evaluate_alerts", "--interval", "0")


def test_an_alert_nobody_was_told_about_owes_no_resolution(redis):
    only("few-workers")
    AlertRule.objects.update(for_seconds=0, clear_seconds=0)
    t0 = timezone.now()
    evaluate(t0, workers=1)  # no route: nobody is told
    evaluate(t0 + timedelta(seconds=10), workers=3)
    alert = Alert.objects.get()
    assert alert.state == Alert.State.RESOLVED and alert.resolved_notified, \
        "only alerts still owing a resolution stay in the planner's query"


@contextlib.contextmanager
def database_unreachable():
    """This process' database connection fails to open: a file in a directory that does not exist (SQLite), a port
    nothing listens on (MySQL/MariaDB)."""
    from django.db import connection

    settings = connection.settings_dict
    saved = dict(settings)
    connection.close()
    if connection.vendor == "sqlite":
        settings["NAME"] = "/nonexistent-directory/portal.sqlite3"
    else:
        settings["HOST"], settings["PORT"] = "127.0.0.1", "9"  # discard: nothing listens
    try:
        yield
    finally:
        connection.close()
        settings.clear()
        settings.update(saved)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("seeded_alert_rules")
def test_a_database_outage_is_recorded_once_when_it_ends_whoever_holds_the_lease_then(redis):
    """Two evaluators live through an outage; the standby happens to take the lease when the database answers. The
    outage was lost (only the former holder remembered it, and it had lost the lease), then recorded days later by
    that holder with a false, days-long end."""
    only("database-unreachable")
    a, b = EvaluatorState(holder="host-a:1"), EvaluatorState(holder="host-b:2")
    t0 = timezone.now()
    assert alerts_cycle(state=a, now=t0)["lease"] is True
    assert alerts_cycle(state=b, now=t0)["lease"] is False
    with database_unreachable():
        for seconds in (10, 20, 130):
            for state in (a, b):
                assert "unreachable" in alerts_cycle(state=state, now=t0 + timedelta(seconds=seconds))["database"]
    back = t0 + timedelta(seconds=140)
    Lease.objects.update(expires_at=timezone.now() - timedelta(seconds=1))  # A's lease ran out during the outage
    assert alerts_cycle(state=b, now=back)["lease"] is True
    assert alerts_cycle(state=a, now=back + timedelta(seconds=10))["lease"] is False
    [alert] = Alert.objects.filter(name="database-unreachable")
    assert alert.state == Alert.State.RESOLVED
    assert t0 + timedelta(seconds=10) <= alert.fired_at <= t0 + timedelta(seconds=20)
    assert alert.resolved_at == back, "ended when the database first answered again"
    # Days later A takes the lease: nothing more is recorded.
    lease_release(holder=b.holder)
    assert alerts_cycle(state=a, now=back + timedelta(days=3))["lease"] is True
    assert Alert.objects.filter(name="database-unreachable").count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("seeded_alert_rules")
def test_evaluate_alerts_once_names_the_unreachable_database_not_another_evaluator(redis):
    """A pass that failed because the database does not answer must say so: "Another evaluator () is active" sent
    whoever ran it looking for a second evaluator that does not exist."""
    from django.core.management import call_command
    from django.core.management.base import CommandError

    only("no-active-workers")
    with database_unreachable(), pytest.raises(CommandError) as caught:
        call_command("evaluate_alerts", "--once")
    assert str(caught.value).startswith("The database is unreachable: ")
    assert "Another evaluator" not in str(caught.value)
    assert not Lease.objects.exists() and not Alert.objects.exists(), "the pass did nothing"


def test_rules_about_workers_wait_while_a_supervisor_starts_its_workers(redis, settings):
    """A supervisor's start (a deploy, a restart) leaves no alert about workers while they come up; once the grace is
    over, or the workers are up, the rules judge them as always."""
    from queues.models import FleetEvent

    settings.FLEET_START_GRACE = 60
    only("no-active-workers", "redis-unreachable")
    pools = [("default", 2)]  # the pools the snapshot read: two slots desired
    t0 = timezone.now()
    FleetEvent.objects.create(kind=FleetEvent.Kind.SUPERVISOR_STARTED, at=t0)
    result = evaluate(t0 + timedelta(seconds=5), workers=0, pools=pools)
    assert not Alert.objects.exists() and result.unknown == ["no-active-workers"]
    evaluate(t0 + timedelta(seconds=10), redis=False, pools=pools)
    assert sorted(Alert.objects.values_list("name", flat=True)) == ["no-active-workers", "redis-unreachable"], \
        "Redis down: no worker can start, so the workers are judged (and Redis' alert is their cause)"
    Alert.objects.all().delete()
    evaluate(t0 + timedelta(seconds=61), workers=0, pools=pools)
    assert Alert.objects.get(name="no-active-workers").state == Alert.State.FIRING, "the grace is over"
    # A supervisor in a crash loop writes a start event every few seconds: that is no start, and hides nothing.
    Alert.objects.all().delete()
    t1 = t0 + timedelta(minutes=10)
    FleetEvent.objects.bulk_create([FleetEvent(kind=FleetEvent.Kind.SUPERVISOR_STARTED, at=t1 - timedelta(seconds=s))
                                    for s in (50, 40, 30, 20, 10, 1)])
    evaluate(t1, workers=0, pools=pools)
    assert Alert.objects.get(name="no-active-workers").state == Alert.State.FIRING
