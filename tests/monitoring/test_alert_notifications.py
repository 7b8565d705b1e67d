"""Notification planning and delivery: routing, grouping, repeats, resolution, silences, acknowledgement, shelving,
inhibition, escalation, retries and permanent failures, delivered to real local HTTP servers through real RQ
workers (or from the evaluator's process while Redis is down)."""

import json
import threading
from datetime import timedelta

import pytest
from django.core import mail
from django.utils import timezone

from monitoring.alerts.actions import alert_acknowledge, alert_shelve, silence_create
from monitoring.alerts.evaluate import alerts_evaluate
from monitoring.alerts.notify import (
    SENDING_LEASE_SECONDS,
    channel_test,
    notification_deliver,
    notifications_dispatch,
    notifications_plan,
)
from monitoring.alerts.rules import Readings
from monitoring.models import (
    Alert,
    AlertEvent,
    AlertRule,
    DeliveryAttempt,
    EscalationPolicy,
    Notification,
    NotificationChannel,
    NotificationRoute,
)
from tests.conftest import respond
from tests.monitoring.test_alert_evaluation import only, snapshot
from tests.monitoring.test_transports import smtp_server  # noqa: F401 (a fixture)

# Workers run in this process and close the database connection between jobs: transactional tests.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("seeded_alert_rules")]


def evaluate(at, **kwargs):
    alerts_evaluate(now=at, readings=Readings(now=at, snapshot=snapshot(**kwargs)))
    return notifications_plan(now=at)


@pytest.fixture
def webhook(http_server):
    url = http_server.route("/hook", respond(200, b'{"ok": true}', "application/json"))
    channel = NotificationChannel.objects.create(name="ops hook", kind="webhook", config={"url": url, "token": "t0k"})
    route = NotificationRoute.objects.create(name="everything", group_wait_seconds=0, repeat_interval_seconds=3600,
                                             severities=["critical", "error", "warning"])
    route.channels.add(channel)
    channel.server = http_server
    channel.route = route
    return channel


def posted(server, path="/hook"):
    return [json.loads(request["body"]) for request in server.requests if request["path"] == path]


def deliver_due(at):
    """What the evaluator does after planning. No worker runs in these tests, so it sends them itself
    (test_a_live_worker_delivers_notifications covers the worker path). A plan writes its messages due on the
    database's clock: a time the test moved ahead is given as the dispatcher's now, one before the plan (the time
    the test read as it began) is the database's own."""
    return notifications_dispatch(now=at if at > timezone.now() else None)


def test_alerts_that_fire_together_are_one_message_delivered_by_a_worker(redis, webhook):
    only("few-workers", "workers-saturated")
    AlertRule.objects.update(for_seconds=0)
    t0 = timezone.now()
    planned = evaluate(t0, workers=1, busy=1)
    assert len(planned) == 1, "one route, one channel, no group_by: one message for both alerts"
    assert set(planned[0].alerts.values_list("name", flat=True)) == {"few-workers", "workers-saturated"}
    result = deliver_due(t0)
    assert result["queued"] == 0 and result["inline"] == 1, "no live worker listens to urgent: sent here"
    [body] = posted(webhook.server)
    assert body["status"] == "firing" and len(body["alerts"]) == 2
    assert webhook.server.requests[0]["headers"]["Authorization"] == "Bearer t0k"
    notification = Notification.objects.get()
    assert notification.status == Notification.Status.DELIVERED and notification.attempts == 1
    attempt = DeliveryAttempt.objects.get()
    assert attempt.outcome == "delivered" and attempt.http_status == 200 and attempt.worker == "evaluator"
    for alert in Alert.objects.all():
        assert AlertEvent.Kind.NOTIFIED in alert.events.values_list("kind", flat=True)
    deliver_due(t0 + timedelta(seconds=5))
    assert len(posted(webhook.server)) == 1, "nothing new: sent once"


def test_group_wait_holds_the_first_message_and_group_by_splits_messages(redis, webhook):
    only("few-workers", "workers-saturated")
    AlertRule.objects.update(for_seconds=0)
    route = webhook.route
    route.group_wait_seconds, route.group_by = 30, ["alertname"]
    route.save()
    t0 = timezone.now()
    assert evaluate(t0, workers=1, busy=1) == []
    assert evaluate(t0 + timedelta(seconds=29), workers=1, busy=1) == []
    planned = evaluate(t0 + timedelta(seconds=30), workers=1, busy=1)
    assert sorted(n.alerts.get().name for n in planned) == ["few-workers", "workers-saturated"]


def test_routes_pick_channels_by_severity_and_labels(redis, http_server, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    only("redis-unreachable", "few-workers")
    AlertRule.objects.update(for_seconds=0)
    pager = NotificationChannel.objects.create(name="pager", kind="pagerduty", config={
        "routing_key": "R0UT1NGKEY0000000000000000000000", "url": http_server.route("/pd", respond(202, b'{}'))})
    email = NotificationChannel.objects.create(name="team mail", kind="email", config={"to": ["ops@example.com"]})
    critical = NotificationRoute.objects.create(name="critical redis", position=1, severities=["critical"],
                                                matchers=[{"label": "component", "op": "=", "value": "redis"}],
                                                group_wait_seconds=0)
    critical.channels.add(pager)
    rest = NotificationRoute.objects.create(name="the rest", position=2, group_wait_seconds=0)
    rest.channels.add(email)
    t0 = timezone.now()
    planned = evaluate(t0, redis=False)
    by_channel = {n.channel.name: sorted(n.alerts.values_list("name", flat=True)) for n in planned}
    assert by_channel == {"pager": ["redis-unreachable"]}, "no worker alert: Redis being down causes it (inhibited)"
    deliver_due(t0)
    [event] = posted(http_server, "/pd")
    assert event["event_action"] == "trigger" and event["payload"]["severity"] == "critical"
    planned = evaluate(t0 + timedelta(seconds=10), workers=1)
    assert planned == [], "Redis answers again, but its alert resolves only after its clear time: still the cause"
    assert Alert.objects.get(name="few-workers").inhibited_by.name == "redis-unreachable"
    planned = evaluate(t0 + timedelta(seconds=80), workers=1)
    by_channel = {(n.channel.name, n.kind): sorted(n.alerts.values_list("name", flat=True)) for n in planned}
    assert by_channel == {("pager", "resolved"): ["redis-unreachable"], ("team mail", "firing"): ["few-workers"]}


def test_email_route_through_the_locmem_backend(redis, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    only("few-workers")
    AlertRule.objects.update(for_seconds=0)
    email = NotificationChannel.objects.create(name="team mail", kind="email", config={"to": ["ops@example.com"]})
    route = NotificationRoute.objects.create(name="mail", group_wait_seconds=0)
    route.channels.add(email)
    t0 = timezone.now()
    [notification] = evaluate(t0, workers=1)
    deliver_due(t0)
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["ops@example.com"]
    assert "Fewer than 2 workers" in mail.outbox[0].subject
    notification.refresh_from_db()
    assert notification.status == Notification.Status.DELIVERED


def test_reminders_follow_the_repeat_interval_and_stop_when_acknowledged(redis, webhook, operator_user):
    only("few-workers")
    AlertRule.objects.update(for_seconds=0)
    t0 = timezone.now()
    assert [n.kind for n in evaluate(t0, workers=1)] == ["firing"]
    assert evaluate(t0 + timedelta(minutes=59), workers=1) == []
    assert [n.kind for n in evaluate(t0 + timedelta(minutes=60), workers=1)] == ["repeat"]
    alert_acknowledge(alert=Alert.objects.get(), user=operator_user, note="on it")
    assert evaluate(t0 + timedelta(minutes=125), workers=1) == []
    alert = Alert.objects.get()
    assert alert.acknowledged_by == operator_user and alert.state == Alert.State.FIRING, "ack hides nothing"


def test_resolution_is_sent_once_to_the_routes_that_were_told(redis, webhook):
    only("few-workers")
    AlertRule.objects.update(for_seconds=0, clear_seconds=0)
    t0 = timezone.now()
    evaluate(t0, workers=1)
    planned = evaluate(t0 + timedelta(seconds=10), workers=3)
    assert [n.kind for n in planned] == ["resolved"]
    assert planned[0].body["status"] == "resolved" and planned[0].body["alerts"][0]["state"] == "resolved"
    assert evaluate(t0 + timedelta(seconds=20), workers=3) == []


def test_a_silence_stops_notifications_but_not_the_history(redis, webhook, operator_user):
    only("few-workers")
    AlertRule.objects.update(for_seconds=0)
    t0 = timezone.now()
    silence = silence_create(matchers=[{"label": "alertname", "op": "=", "value": "few-workers"}],
                             starts_at=t0 - timedelta(minutes=1), ends_at=t0 + timedelta(hours=1),
                             reason="planned maintenance", user=operator_user)
    assert evaluate(t0, workers=1) == []
    alert = Alert.objects.get()
    assert alert.state == Alert.State.FIRING and alert.silenced_by == silence
    assert "silenced" in alert.events.values_list("kind", flat=True)
    assert [n.kind for n in evaluate(t0 + timedelta(hours=1, seconds=1), workers=1)] == ["firing"], \
        "the silence ended: the alert is sent"
    assert Alert.objects.get().silenced_by is None, "and its page no longer names the silence"


def test_shelving_stops_notifications_until_it_ends(redis, webhook, operator_user):
    only("few-workers")
    AlertRule.objects.update(for_seconds=0)
    t0 = timezone.now()
    evaluate(t0, workers=1)
    alert_shelve(alert=Alert.objects.get(), user=operator_user, until=timezone.now() + timedelta(hours=2))
    assert evaluate(t0 + timedelta(hours=1, minutes=1), workers=1) == [], "no reminder while shelved"
    assert [n.kind for n in evaluate(t0 + timedelta(hours=3), workers=1)] == ["repeat"]


def test_escalation_notifies_the_next_level_when_nobody_acknowledges(redis, webhook, http_server, operator_user):
    only("redis-unreachable")
    dba = NotificationChannel.objects.create(name="dba", kind="slack",
                                             config={"url": http_server.route("/slack", respond(200, b"ok"))})
    policy = EscalationPolicy.objects.get(name="Default escalation")
    step = policy.steps.get(level=1)
    step.channels.add(dba)
    t0 = timezone.now()
    evaluate(t0, redis=False)
    assert evaluate(t0 + timedelta(minutes=4), redis=False) == []
    [escalation] = evaluate(t0 + timedelta(minutes=5), redis=False)
    assert escalation.kind == "escalation" and escalation.channel == dba
    alert = Alert.objects.get()
    assert alert.escalation_level == 1
    planned = evaluate(t0 + timedelta(minutes=15), redis=False)
    assert planned == [] and Alert.objects.get().escalation_level == 2, "level 2 has no channel: recorded anyway"
    events = list(alert.events.filter(kind="escalated").values_list("message", flat=True))
    assert len(events) == 2 and "has no channel" in events[1]
    alert_acknowledge(alert=alert, user=operator_user)
    evaluate(t0 + timedelta(minutes=60), redis=False)
    assert Alert.objects.get().escalation_level == 2, "acknowledged: no further level"


def test_transient_failures_retry_with_backoff_and_permanent_ones_disable_the_channel(redis, http_server):
    answers = [503, 503, 200]
    calls = []

    def flaky(request, body):
        calls.append(body)
        respond(answers[min(len(calls), len(answers)) - 1], b"busy")(request, body)

    channel = NotificationChannel.objects.create(name="hook", kind="webhook",
                                                 config={"url": http_server.route("/flaky", flaky)})
    route = NotificationRoute.objects.create(name="all", group_wait_seconds=0)
    route.channels.add(channel)
    only("few-workers")
    AlertRule.objects.update(for_seconds=0)
    t0 = timezone.now()
    [notification] = evaluate(t0, workers=1)
    deliver_due(t0)
    notification.refresh_from_db()
    assert notification.status == Notification.Status.PENDING and notification.attempts == 1
    assert notification.next_attempt_at >= timezone.now() + timedelta(seconds=5), "backoff of 10 s"
    assert notifications_dispatch(now=timezone.now()) == {"queued": 0, "inline": 0, "taken_back": 0}, "not due yet"
    for _ in range(2):
        notifications_dispatch(now=timezone.now() + timedelta(minutes=2))
    notification.refresh_from_db()
    assert notification.status == Notification.Status.DELIVERED and len(calls) == 3
    assert list(notification.delivery_attempts.order_by("at").values_list("outcome", "http_status")) == [
        ("transient", 503), ("transient", 503), ("delivered", 200)]

    gone = NotificationChannel.objects.create(name="gone", kind="slack",
                                              config={"url": http_server.route("/gone", respond(404, b"no_service"))})
    for index in range(NotificationChannel.DISABLE_AFTER):
        failed = Notification.objects.create(channel=gone, kind="firing", subject="s", body=notification.body,
                                             status=Notification.Status.SENDING)
        assert notification_deliver(notification_id=failed.pk, attempt=0) == Notification.Status.FAILED
    gone.refresh_from_db()
    assert not gone.enabled and "404" in gone.disabled_reason and "permanent" in gone.disabled_reason
    assert DeliveryAttempt.objects.filter(channel=gone, outcome="permanent").count() == 3


def test_while_redis_is_down_the_evaluator_delivers_itself(unreachable_redis, http_server):
    channel = NotificationChannel.objects.create(
        name="hook", kind="webhook", config={"url": http_server.route("/hook", respond(200, b"{}"))})
    route = NotificationRoute.objects.create(name="all", group_wait_seconds=0, severities=["critical"])
    route.channels.add(channel)
    only("redis-unreachable")
    t0 = timezone.now()
    alerts_evaluate(now=t0)  # the real snapshot: Redis does not answer
    assert Alert.objects.get().state == Alert.State.FIRING
    notifications_plan(now=t0)
    assert deliver_due(t0) == {"queued": 0, "inline": 1, "taken_back": 0}
    assert Notification.objects.get().status == Notification.Status.DELIVERED
    assert DeliveryAttempt.objects.get().worker == "evaluator"


def test_a_job_that_runs_twice_sends_once(redis, webhook):
    only("few-workers")
    AlertRule.objects.update(for_seconds=0)
    t0 = timezone.now()
    [notification] = evaluate(t0, workers=1)
    Notification.objects.filter(pk=notification.pk).update(status=Notification.Status.SENDING)
    assert notification_deliver(notification_id=notification.pk, attempt=0) == Notification.Status.DELIVERED
    assert notification_deliver(notification_id=notification.pk, attempt=0) == "skipped"
    assert len(posted(webhook.server)) == 1


def test_a_notification_no_worker_started_is_sent_by_the_evaluator_once(redis, webhook):
    only("few-workers")
    AlertRule.objects.update(for_seconds=0)
    t0 = timezone.now()
    [notification] = evaluate(t0, workers=1)
    # Handed to a worker a while ago (its job then lost with Redis, or the worker died before starting it).
    Notification.objects.filter(pk=notification.pk).update(status=Notification.Status.SENDING,
                                                           claimed_at=t0 - timedelta(minutes=5))
    assert deliver_due(t0) == {"queued": 0, "inline": 1, "taken_back": 1}
    notification.refresh_from_db()
    assert notification.status == Notification.Status.DELIVERED and len(posted(webhook.server)) == 1
    assert notification_deliver(notification_id=notification.pk, attempt=0) == "skipped", \
        "the lost job, if it ever runs, sends nothing"
    assert len(posted(webhook.server)) == 1


def test_a_live_worker_delivers_notifications(redis, webhook):
    from tests.processes import start_command, stop_process, wait_for

    only("few-workers")
    AlertRule.objects.update(for_seconds=0)
    worker = start_command("rqworker", "urgent")
    try:
        from monitoring.alerts.notify import workers_take_notifications

        wait_for(workers_take_notifications, 30, "a live worker on urgent")
        t0 = timezone.now()
        [notification] = evaluate(t0, workers=1)
        assert deliver_due(t0) == {"queued": 1, "inline": 0, "taken_back": 0}
        wait_for(lambda: Notification.objects.filter(pk=notification.pk, status="delivered").exists(), 30,
                 "the worker to deliver it")
        attempt = DeliveryAttempt.objects.get()
        assert attempt.worker not in ("", "evaluator") and len(posted(webhook.server)) == 1
    finally:
        stop_process(worker, grace=30)


def test_with_urgent_paused_the_evaluator_sends_itself(redis, webhook, admin_user):
    from queues import control

    control.queue_set_paused(queue="urgent", paused=True, user=admin_user)
    only("few-workers")
    AlertRule.objects.update(for_seconds=0)
    t0 = timezone.now()
    evaluate(t0, workers=1)
    assert deliver_due(t0)["inline"] == 1


def test_each_route_keeps_its_own_wait_and_reminders_and_resolution(redis, http_server):
    fast = NotificationChannel.objects.create(name="fast", kind="webhook",
                                              config={"url": http_server.route("/fast", respond(200, b"{}"))})
    slow = NotificationChannel.objects.create(name="slow", kind="webhook",
                                              config={"url": http_server.route("/slow", respond(200, b"{}"))})
    first = NotificationRoute.objects.create(name="pager", position=1, group_wait_seconds=0,
                                             repeat_interval_seconds=600, continue_matching=True)
    first.channels.add(fast)
    second = NotificationRoute.objects.create(name="digest", position=2, group_wait_seconds=300,
                                              repeat_interval_seconds=3600, send_resolved=True)
    second.channels.add(slow)
    only("few-workers")
    AlertRule.objects.update(for_seconds=0, clear_seconds=0)
    t0 = timezone.now()

    def channels(at, **kwargs):
        return sorted((n.channel.name, n.kind) for n in evaluate(at, **kwargs))

    assert channels(t0, workers=1) == [("fast", "firing")]
    assert channels(t0 + timedelta(minutes=5), workers=1) == [("slow", "firing")], "its own group wait"
    assert channels(t0 + timedelta(minutes=10), workers=1) == [("fast", "repeat")]
    assert channels(t0 + timedelta(minutes=20), workers=1) == [("fast", "repeat")]
    assert channels(t0 + timedelta(minutes=65), workers=1) == [("fast", "repeat"), ("slow", "repeat")]
    assert channels(t0 + timedelta(minutes=66), workers=3) == [("fast", "resolved"), ("slow", "resolved")]


def test_a_silenced_alert_that_was_notified_still_sends_its_resolution(redis, webhook, operator_user):
    only("few-workers")
    AlertRule.objects.update(for_seconds=0, clear_seconds=0)
    t0 = timezone.now()
    assert [n.kind for n in evaluate(t0, workers=1)] == ["firing"]
    silence_create(matchers=[{"label": "alertname", "op": "=~", "value": "few-.*"}], reason="noisy",
                   starts_at=t0, ends_at=t0 + timedelta(hours=2), user=operator_user)
    assert evaluate(t0 + timedelta(hours=1, minutes=5), workers=1) == [], "no reminder while silenced"
    assert [n.kind for n in evaluate(t0 + timedelta(hours=1, minutes=6), workers=3)] == ["resolved"]


def test_escalation_after_a_silence_reaches_one_level_at_a_time(redis, webhook, http_server, operator_user):
    only("redis-unreachable")
    t0 = timezone.now()
    silence_create(matchers=[{"label": "alertname", "op": "=", "value": "redis-unreachable"}], reason="work",
                   starts_at=t0, ends_at=t0 + timedelta(hours=2), user=operator_user)
    evaluate(t0, redis=False)
    evaluate(t0 + timedelta(hours=2, seconds=1), redis=False)
    assert Alert.objects.get().escalation_level == 1, "level 1 when the silence ends"
    for seconds in (10, 20, 30, 60):
        evaluate(t0 + timedelta(hours=2, seconds=seconds), redis=False)
    assert Alert.objects.get().escalation_level == 1, "not the four levels in seconds"
    evaluate(t0 + timedelta(hours=2, minutes=10, seconds=2), redis=False)
    assert Alert.objects.get().escalation_level == 2, "level 2 comes 10 minutes after level 1, as in the policy"


def test_alerts_from_alertmanager_are_recorded_but_not_notified_again(redis, webhook, client, settings):
    import json as json_module

    from tests.monitoring.test_alert_api import PAYLOAD, URL

    settings.ALERTS_WEBHOOK_TOKEN = "webhook-token-0123456789"
    response = client.post(URL, data=json_module.dumps(PAYLOAD), content_type="application/json",
                           HTTP_AUTHORIZATION="Bearer webhook-token-0123456789")
    assert response.status_code == 200
    assert notifications_plan(now=timezone.now() + timedelta(minutes=5)) == []


def test_the_database_rule_is_paged_by_alertmanager_so_the_portal_records_it_and_tells_nobody(
        redis, webhook, http_server):
    """While the database is down the portal writes nothing, so Prometheus' twin of database-unreachable is the live
    page (Alertmanager sends its resolution too). The portal recorded the outage once the database answered and sent
    a resolved message to every route: a second page about an incident Alertmanager had already closed. It records
    the outage, and the database alert it judges itself, in the history only: no route, reminder or escalation."""
    from monitoring.alerts.evaluate import database_outage_record

    only("database-unreachable")
    AlertRule.objects.update(for_seconds=0, clear_seconds=0)
    dba = NotificationChannel.objects.create(name="dba", kind="slack",
                                             config={"url": http_server.route("/slack", respond(200, b"ok"))})
    EscalationPolicy.objects.get(name="Default escalation").steps.get(level=1).channels.add(dba)
    t0 = timezone.now()
    recorded = database_outage_record(started_at=t0 - timedelta(minutes=3), ended_at=t0 - timedelta(minutes=1),
                                      error="Lost connection to server")
    assert evaluate(t0) == []
    # The portal's own figure says the database is down while it can write (a failing check, not an outage).
    for minutes in (1, 6, 20):
        assert evaluate(t0 + timedelta(minutes=minutes), database=False) == []
    assert evaluate(t0 + timedelta(minutes=30)) == []
    deliver_due(t0 + timedelta(minutes=30))
    assert http_server.requests == [] and not Notification.objects.exists()
    recorded.refresh_from_db()
    assert recorded.state == Alert.State.RESOLVED and recorded.resolved_notified, "owes nobody a resolution"
    live = Alert.objects.exclude(pk=recorded.pk).get()
    assert live.state == Alert.State.RESOLVED and live.resolved_notified and live.escalation_level == 0
    assert "notified" not in live.events.values_list("kind", flat=True)


def test_disabling_a_rule_resolves_its_open_alert(redis):
    only("few-workers")
    AlertRule.objects.update(for_seconds=0)
    t0 = timezone.now()
    evaluate(t0, workers=1)
    AlertRule.objects.update(enabled=False)
    evaluate(t0 + timedelta(seconds=10), workers=1)
    alert = Alert.objects.get()
    assert alert.state == Alert.State.RESOLVED and "no longer evaluated" in alert.events.last().message


def test_an_acknowledgement_made_during_a_pass_is_kept(redis, operator_user):
    only("few-workers")
    AlertRule.objects.update(for_seconds=0)
    t0 = timezone.now()
    evaluate(t0, workers=1)
    alert = Alert.objects.get()

    class AcknowledgingReadings(Readings):
        """The figures are read; an operator acknowledges meanwhile; then the pass writes its changes."""

        @property
        def snapshot(self):
            if not getattr(self, "_done", False):
                self._done = True
                alert_acknowledge(alert=alert, user=operator_user, note="while it evaluated")
            return snapshot(workers=0)

    alerts_evaluate(now=t0 + timedelta(seconds=10), readings=AcknowledgingReadings(now=t0))
    alert.refresh_from_db()
    assert alert.acknowledged_by == operator_user and alert.value == 0


def test_send_test_notification_reports_the_outcome(redis, http_server, admin_user):
    channel = NotificationChannel.objects.create(
        name="hook", kind="webhook", config={"url": http_server.route("/t", respond(500, b"oops"))})
    notification = channel_test(channel=channel, user=admin_user)
    assert notification.status == Notification.Status.GAVE_UP and "500" in notification.last_error
    assert posted(http_server, "/t")[0]["kind"] == "test"


def test_a_wrong_smtp_sender_fails_the_mail_but_does_not_disable_the_channel(smtp_server):  # noqa: F811
    smtp_server(replies={"MAIL": "553 5.7.1 sender not allowed"})
    channel = NotificationChannel.objects.create(name="mail", kind="email", config={"to": ["ops@example.com"]})
    for _ in range(NotificationChannel.DISABLE_AFTER + 1):
        failed = Notification.objects.create(channel=channel, kind="firing", subject="s", status="sending", body={
            "kind": "firing", "status": "firing", "subject": "s", "text": "t", "group_key": "g", "portal_url": "",
            "alerts": []})
        assert notification_deliver(notification_id=failed.pk, attempt=0) == Notification.Status.FAILED
    channel.refresh_from_db()
    assert channel.enabled and channel.permanent_failures == 0
    assert "refused the sender" in DeliveryAttempt.objects.filter(channel=channel).first().error


def test_unshelving_an_alert_that_is_not_shelved_is_refused(operator_user):
    from monitoring.alerts.actions import AlertError, alert_shelve

    only("few-workers")
    now = timezone.now()
    alerts_evaluate(now=now, readings=Readings(now=now, snapshot=snapshot(workers=1)))
    with pytest.raises(AlertError, match="not shelved"):
        alert_shelve(alert=Alert.objects.get(), user=operator_user, until=None)
    assert not AlertEvent.objects.filter(kind="unshelved").exists()


@pytest.mark.parametrize("with_route", [True, False], ids=["route-and-escalation", "escalation-only"])
def test_an_escalation_channel_is_told_the_alert_ended(redis, http_server, with_route):
    """A PagerDuty service paged by escalation level 1 gets the resolve: its incident closes, and the next occurrence
    of the same rule opens an incident of its own instead of folding into one that nobody closed."""
    only("redis-unreachable")
    pager = NotificationChannel.objects.create(name="sysadmin pager", kind="pagerduty", config={
        "routing_key": "R0UT1NGKEY0000000000000000000000", "url": http_server.route("/pd", respond(202, b"{}"))})
    EscalationPolicy.objects.get(name="Default escalation").steps.get(level=1).channels.add(pager)
    if with_route:
        hook = NotificationChannel.objects.create(name="ops hook", kind="webhook",
                                                  config={"url": http_server.route("/hook", respond(200, b"{}"))})
        NotificationRoute.objects.create(name="everything", group_wait_seconds=0).channels.add(hook)
    t0 = timezone.now()
    for minutes in (0, 5):
        evaluate(t0 + timedelta(minutes=minutes), redis=False)
        deliver_due(t0 + timedelta(minutes=minutes))
    evaluate(t0 + timedelta(minutes=6), redis=True)  # cleared
    evaluate(t0 + timedelta(minutes=8), redis=True)  # resolved after the clear time
    deliver_due(t0 + timedelta(minutes=8))
    alert = Alert.objects.get()
    assert alert.state == Alert.State.RESOLVED
    events = posted(http_server, "/pd")
    assert [event["event_action"] for event in events] == ["trigger", "resolve", "resolve"]
    assert events[0]["dedup_key"] == events[1]["dedup_key"] == f"{alert.fingerprint}-{alert.pk}"
    assert events[2]["dedup_key"] == alert.fingerprint, "and the incident a message from before per-occurrence keys " \
                                                        "opened"
    if with_route:
        assert [body["status"] for body in posted(http_server, "/hook")] == ["firing", "resolved"]
    assert set(Notification.objects.filter(channel=pager).values_list("kind", flat=True)) == {"escalation",
                                                                                                 "resolved"}
    # The same condition again: a new incident, not the closed one's key.
    t1 = t0 + timedelta(minutes=30)
    for minutes in (0, 5):
        evaluate(t1 + timedelta(minutes=minutes), redis=False)
        deliver_due(t1 + timedelta(minutes=minutes))
    again = posted(http_server, "/pd")[3]
    assert again["event_action"] == "trigger" and again["dedup_key"] != events[0]["dedup_key"]


def test_a_silence_or_route_with_a_catastrophic_pattern_does_not_stall_the_planner(redis, webhook, operator_user):
    """``(.*.*)*X`` against a 17-character alert name took 75 s in Python's backtracking engine, in every pass, and the
    evaluator's lease ran out while nothing was notified. RE2 matches it in time linear in the value."""
    only("redis-unreachable")
    pattern = [{"label": "alertname", "op": "=~", "value": "(.*.*)*X"}]
    silence_create(matchers=pattern, ends_at=timezone.now() + timedelta(hours=1), reason="typo", user=operator_user)
    NotificationRoute.objects.create(name="typo route", position=0, matchers=pattern, group_wait_seconds=0,
                                     continue_matching=True).channels.add(webhook)
    t0 = timezone.now()
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(evaluate(t0, redis=False)), daemon=True)
    thread.start()
    thread.join(20)  # milliseconds with RE2; a backtracking engine would take days on this value
    assert outcome, "the notification plan did not finish: a silence's pattern stalls the evaluator"
    [notification] = outcome[0]
    assert notification.route == webhook.route, "the pattern matched nothing: the catch-all route took the alert"


def test_a_notification_a_worker_is_sending_is_not_taken_back(redis, http_server):
    """The job waited behind captions and its worker began the send just before the evaluator would have taken the
    claim back; the evaluator's pass during that send must leave it to the worker (it took it back and sent it a
    second time)."""
    passes, received = [], []

    def slow_receiver(request, body):
        received.append(body)
        if len(received) == 1:  # the evaluator's next pass, while the worker's POST is in flight
            passes.append(notifications_dispatch())
        respond(200, b"{}")(request, body)

    channel = NotificationChannel.objects.create(name="hook", kind="webhook",
                                                 config={"url": http_server.route("/slow", slow_receiver)})
    NotificationRoute.objects.create(name="all", group_wait_seconds=0).channels.add(channel)
    only("few-workers")
    AlertRule.objects.update(for_seconds=0)
    [notification] = evaluate(timezone.now(), workers=1)
    # Handed to a worker as long ago as a claim lasts; the worker starts it now.
    Notification.objects.filter(pk=notification.pk).update(
        status=Notification.Status.SENDING, claimed_at=timezone.now() - timedelta(seconds=SENDING_LEASE_SECONDS + 1))
    assert notification_deliver(notification_id=notification.pk, attempt=0, worker="worker-1") == "delivered"
    assert passes == [{"queued": 0, "inline": 0, "taken_back": 0}]
    assert len(posted(http_server, "/slow")) == 1
    assert list(notification.delivery_attempts.values_list("worker", flat=True)) == ["worker-1"]


def test_two_overlapping_plans_write_the_first_message_once(redis, webhook, monkeypatch):
    """A lease hand-over during a slow pass: evaluator B plans while A, which read the candidates before, still
    plans. A's writes are fenced on what it read, so its plan is dropped instead of writing the message again."""
    import monitoring.alerts.notify as notifications

    only("few-workers")
    AlertRule.objects.update(for_seconds=0)
    t0 = timezone.now()
    alerts_evaluate(now=t0, readings=Readings(now=t0, snapshot=snapshot(workers=1)))
    escalate, overlapped, calls = notifications._escalate, [], []

    def b_plans_meanwhile(*args):
        calls.append(args)
        if len(calls) == 1:  # A has read and decided everything, and not written yet
            overlapped.append(notifications_plan(now=t0))  # B: the whole plan, committed
        return escalate(*args)

    monkeypatch.setattr(notifications, "_escalate", b_plans_meanwhile)
    assert notifications_plan(now=t0) == [], "A's plan: the alert it read was notified meanwhile"
    assert len(overlapped[0]) == 1
    assert list(Notification.objects.values_list("kind", "channel__name")) == [("firing", "ops hook")]
    assert Alert.objects.get().events.filter(kind=AlertEvent.Kind.SILENCED).count() == 0


def test_the_planners_query_searches_its_index_instead_of_scanning_the_history():
    """``resolved_notified=False`` became ``NOT resolved_notified``, which SQLite cannot serve from an index: every
    pass read the whole alert table."""
    from django.db import connection

    from monitoring.alerts.notify import planner_candidates

    plan = planner_candidates().explain()
    assert "alert_pending_resolution_idx" in plan, plan
    if connection.vendor == "sqlite":
        assert "SEARCH monitoring_alert USING INDEX alert_pending_resolution_idx" in plan, plan
        assert "SCAN monitoring_alert" not in plan, plan


def test_the_evaluators_open_alerts_are_searched_by_state_not_walked_by_source():
    """With an index on (source, started_at) for the history's filter, SQLite served ``state IN (...) AND source =
    'portal'`` from it: every pass walked every portal alert ever written."""
    from django.db import connection

    from monitoring.alerts.evaluate import portal_open_alerts

    if connection.vendor != "sqlite":
        pytest.skip("SQLite's planner without statistics; MariaDB's optimizer reads the index statistics InnoDB keeps")
    from monitoring.alerts.ingest import ALERTMANAGER_EXPIRY

    for query in (portal_open_alerts().order_by(), Alert.objects.open_from(Alert.Source.ALERTMANAGER).filter(
            last_seen_at__lt=timezone.now() - ALERTMANAGER_EXPIRY).order_by()):
        plan = query.explain()
        assert "SEARCH monitoring_alert USING INDEX alert_state_started_idx (state=?)" in plan, plan
        assert "alert_source_started_idx" not in plan and "SCAN monitoring_alert" not in plan, plan


def test_two_escalation_policies_each_reach_their_own_levels(redis, http_server):
    """The level reached was one column shared by every policy: the database team's policy (level 1 at 10 min) was
    skipped because the default one had reached level 1 at 5 min, and its level 2 was spaced from the other's."""
    from monitoring.models import EscalationStep

    only("redis-unreachable")
    default = EscalationPolicy.objects.get(name="Default escalation")
    default.steps.filter(level__gt=1).delete()
    sysadmin = NotificationChannel.objects.create(name="sysadmin", kind="webhook",
                                                  config={"url": http_server.route("/sys", respond(200, b"{}"))})
    default.steps.get(level=1).channels.add(sysadmin)
    dba = NotificationChannel.objects.create(name="dba", kind="webhook",
                                             config={"url": http_server.route("/dba", respond(200, b"{}"))})
    team = EscalationPolicy.objects.create(name="Database team", severities=["critical"])
    EscalationStep.objects.create(policy=team, level=1, title="DBA on call", after_minutes=10).channels.add(dba)
    EscalationStep.objects.create(policy=team, level=2, title="DBA lead", after_minutes=20).channels.add(dba)
    t0 = timezone.now()
    sent = {}
    for minutes in (0, 5, 10, 15, 20):
        sent[minutes] = sorted((n.channel.name, n.body["text"].split("\n")[0]) for n in
                               evaluate(t0 + timedelta(minutes=minutes), redis=False))
    assert [name for name, _ in sent[5]] == ["sysadmin"]
    assert [name for name, _ in sent[10]] == ["dba"] and "level 1 (DBA on call) of Database team" in sent[10][0][1]
    assert sent[15] == []
    assert [name for name, _ in sent[20]] == ["dba"] and "level 2 (DBA lead)" in sent[20][0][1]
    alert = Alert.objects.get()
    assert alert.escalation_level == 2
    assert {key: value["level"] for key, value in alert.escalations.items()} == {str(default.pk): 1, str(team.pk): 2}


def test_a_test_notification_from_a_host_behind_the_databases_clock_is_not_taken_back_while_sending(
        redis, http_server, admin_user, monkeypatch):
    """The admin host's clock runs ten minutes behind the database's, and the evaluator passes during the test's
    send: the claim is written, and renewed as the send begins, on the database's clock that judges it, so the
    pass leaves it alone (either alone keeps it; a claim on the host's clock and no renewal sent it twice)."""
    passes, received = [], []

    def receiver(request, body):
        received.append(body)
        if len(received) == 1:  # the evaluator's pass while the test's POST is in flight
            passes.append(notifications_dispatch())
        respond(200, b"{}")(request, body)

    channel = NotificationChannel.objects.create(name="hook", kind="webhook",
                                                 config={"url": http_server.route("/test", receiver)})
    host_clock = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: host_clock() - timedelta(minutes=10))
    notification = channel_test(channel=channel, user=admin_user)
    assert notification.status == Notification.Status.DELIVERED
    assert passes == [{"queued": 0, "inline": 0, "taken_back": 0}]
    assert len(received) == 1


@pytest.mark.parametrize("skew_minutes", [5, -5])
def test_a_retry_waits_its_backoff_on_the_databases_clock_whatever_the_senders_clock(redis, http_server,
                                                                                    monkeypatch, skew_minutes):
    """A worker host whose clock runs ahead wrote the retry time on its own clock (the evaluator on another host
    found it due five minutes late); one behind made every retry due at once (a storm against a failing channel).
    The retry is due its backoff after the failure, on the database's clock that judges it."""
    from django.db import connection

    from queues.models import database_now

    channel = NotificationChannel.objects.create(name="hook", kind="webhook",
                                                 config={"url": http_server.route("/busy", respond(503, b"busy"))})
    body = {"kind": "firing", "status": "firing", "subject": "s", "text": "t", "group_key": "g", "portal_url": "",
            "alerts": []}
    notification = Notification.objects.create(channel=channel, kind="firing", subject="s", body=body,
                                               status=Notification.Status.SENDING)
    host_clock = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: host_clock() + timedelta(minutes=skew_minutes))  # the worker's
    assert notification_deliver(notification_id=notification.pk, attempt=0, worker="worker-1") == \
        Notification.Status.PENDING
    monkeypatch.setattr(timezone, "now", host_clock)
    notification.refresh_from_db()
    wait = (notification.next_attempt_at - database_now(connection)).total_seconds()
    assert Notification.BACKOFF_SECONDS[0] - 5 < wait <= Notification.BACKOFF_SECONDS[0], wait
    assert notifications_dispatch() == {"queued": 0, "inline": 0, "taken_back": 0}, "not due before its backoff"


def test_a_message_planned_on_a_host_ahead_of_the_databases_clock_is_due_at_once_for_any_dispatcher(
        redis, webhook, monkeypatch):
    """The evaluator's host runs five minutes ahead: its plan wrote the message due at its own now, and the sampler
    (on another host, sending while the evaluator is silent) found it due five minutes late."""
    only("few-workers")
    AlertRule.objects.update(for_seconds=0)
    host_clock = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: host_clock() + timedelta(minutes=5))  # the evaluator's host
    [notification] = evaluate(timezone.now(), workers=1)
    monkeypatch.setattr(timezone, "now", host_clock)  # the other dispatcher's host
    assert notifications_dispatch() == {"queued": 0, "inline": 1, "taken_back": 0}
    notification.refresh_from_db()
    assert notification.status == Notification.Status.DELIVERED and len(posted(webhook.server)) == 1
