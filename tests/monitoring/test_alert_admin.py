"""Alert pages in the admin: who may read and act, the alert page's timeline and links, filters, export, summary,
the firing-alerts banner, silences, rules, channels (a test notification to a real local HTTP server)."""

import csv
import io
import json
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from monitoring.alerts.actions import AlertError, alert_acknowledge, silence_create
from monitoring.alerts.timeline import fingerprint_of
from monitoring.models import (
    Alert,
    AlertEvent,
    AlertRule,
    DeliveryAttempt,
    EscalationPolicy,
    Notification,
    NotificationChannel,
    NotificationRoute,
    Silence,
)
from portal.context_processors import alerts_banner
from queues.models import AuditEntry, CaptionTask, FleetEvent, TaskStatus
from tests.conftest import respond

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("seeded_alert_rules")]

CHANGELIST = "admin:monitoring_alert_changelist"


def make_alert(rule_name="normal-backlog-high", *, state="firing", started=None, **fields) -> Alert:
    """An alert of a seeded rule, as the evaluator would have written it (the evaluator has its own tests)."""
    rule = AlertRule.objects.get(name=rule_name)
    started = started or timezone.now() - timedelta(minutes=10)
    labels = {**rule.all_labels(), **fields.pop("extra_labels", {})}
    values = dict(rule=rule, name=rule.name, fingerprint=fingerprint_of(labels), severity=rule.severity,
                  component=rule.component, summary=rule.title, labels=labels, state=state, started_at=started,
                  holding_since=started, fired_at=None if state == "pending" else started, last_seen_at=started,
                  annotations={"runbook": rule.runbook})
    values.update(fields)
    return Alert.objects.create(**values)


def page(client, url, **params):
    response = client.get(url, params)
    assert response.status_code == 200, response.status_code
    return response.content.decode()


def alert_url(name, alert):
    return reverse(f"admin:monitoring_alert_{name}", args=[alert.pk])


def listed(response) -> set[int]:
    return {alert.pk for alert in response.context["cl"].result_list}


# --- who may do what ----------------------------------------------------------------------------------------------

def test_support_reads_alerts_but_every_action_is_refused_even_when_posted(client, support_user):
    alert = make_alert()
    client.force_login(support_user)
    assert alert.summary in page(client, reverse(CHANGELIST))
    detail = page(client, alert_url("change", alert))
    assert alert.summary in detail and 'class="alert-action"' not in detail
    posts = {"acknowledge": {"note": "mine"}, "unacknowledge": {}, "shelve": {"shelve_for": "4h"}, "unshelve": {},
             "silence": {"matchers": "alertname=normal-backlog-high", "hours": "4", "reason": "noise"}}
    for name, data in posts.items():
        assert client.get(alert_url(name, alert)).status_code == 403
        assert client.post(alert_url(name, alert), data).status_code == 403
    crafted = client.post(reverse(CHANGELIST), {"action": "acknowledge_selected", "_selected_action": [alert.pk],
                                                "confirm": "yes", "note": "bulk"})
    assert crafted.status_code == 403
    alert.refresh_from_db()
    assert alert.acknowledged_at is None and alert.shelved_until is None
    assert not AlertEvent.objects.exists() and not Silence.objects.exists() and not AuditEntry.objects.exists()


def test_outsider_is_sent_to_login(client, outsider_user):
    alert = make_alert()
    client.force_login(outsider_user)
    for url in (reverse(CHANGELIST), alert_url("acknowledge", alert), reverse("admin:monitoring_alert_export")):
        response = client.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"]


def test_operator_acknowledges_with_a_note_after_confirming(client, operator_user):
    alert = make_alert()
    client.force_login(operator_user)
    question = page(client, alert_url("acknowledge", alert))
    assert "Reminders and escalation stop" in question and 'name="note"' in question
    assert Alert.objects.get(pk=alert.pk).acknowledged_at is None  # the GET changes nothing

    done = client.post(alert_url("acknowledge", alert), {"note": "looking at the normal pool"}, follow=True)
    assert done.redirect_chain[-1][0] == alert_url("change", alert)
    assert f"Acknowledged: {alert.summary}." in done.content.decode()
    alert.refresh_from_db()
    assert (alert.acknowledged_by, alert.acknowledgement_note) == (operator_user, "looking at the normal pool")
    event = alert.events.get(kind=AlertEvent.Kind.ACKNOWLEDGED)
    assert (event.user, event.message) == (operator_user, "looking at the normal pool")
    entry = AuditEntry.objects.get(action="alert_acknowledge")
    assert (entry.user, entry.address) == (operator_user, "127.0.0.1")

    again = client.post(alert_url("acknowledge", alert), {"note": "twice"}, follow=True)
    assert "This alert is already acknowledged." in again.content.decode()
    assert AuditEntry.objects.filter(action="alert_acknowledge").count() == 1


def test_acknowledging_a_resolved_alert_is_an_error_message_not_a_traceback(client, operator_user):
    alert = make_alert(state="resolved", resolved_at=timezone.now())
    client.force_login(operator_user)
    response = client.post(alert_url("acknowledge", alert), {"note": ""}, follow=True)
    assert response.status_code == 200
    assert "This alert is resolved; there is nothing to acknowledge." in response.content.decode()
    assert not AlertEvent.objects.exists()


def test_operator_removes_an_acknowledgement(client, operator_user, admin_user):
    alert = alert_acknowledge(alert=make_alert(), user=admin_user, note="mine")
    client.force_login(operator_user)
    assert "Remove acknowledgement" in page(client, alert_url("change", alert))
    client.post(alert_url("unacknowledge", alert))
    alert.refresh_from_db()
    assert alert.acknowledged_at is None and alert.acknowledged_by is None
    assert alert.events.filter(kind=AlertEvent.Kind.UNACKNOWLEDGED, user=operator_user).exists()
    assert AuditEntry.objects.filter(action="alert_unacknowledge", user=operator_user).exists()


def test_operator_shelves_for_a_period_or_until_a_time_and_unshelves(client, operator_user):
    alert = make_alert()
    client.force_login(operator_user)
    assert "until a chosen time" in page(client, alert_url("shelve", alert))

    client.post(alert_url("shelve", alert), {"shelve_for": "4h"})
    alert.refresh_from_db()
    expected = timezone.now() + timedelta(hours=4)
    assert abs((alert.shelved_until - expected).total_seconds()) < 60 and alert.shelved_by == operator_user

    missing = client.post(alert_url("shelve", alert), {"shelve_for": "until", "until": ""})
    assert missing.status_code == 400 and "Until: Give the time the shelving ends." in missing.content.decode()
    past = client.post(alert_url("shelve", alert), {"shelve_for": "until", "until": "2001-01-01T10:00"})
    assert past.status_code == 400 and "Until: The time must be in the future." in past.content.decode()
    later = timezone.localtime() + timedelta(days=2)
    client.post(alert_url("shelve", alert), {"shelve_for": "until", "until": later.strftime("%Y-%m-%dT%H:%M")})
    alert.refresh_from_db()
    assert alert.shelved_until == later.replace(second=0, microsecond=0)

    client.post(alert_url("unshelve", alert))
    alert.refresh_from_db()
    assert alert.shelved_until is None
    kinds = list(alert.events.values_list("kind", flat=True))
    assert kinds == [AlertEvent.Kind.SHELVED, AlertEvent.Kind.SHELVED, AlertEvent.Kind.UNSHELVED]
    refused = client.post(alert_url("unshelve", alert), follow=True)
    assert "This alert is not shelved." in refused.content.decode()
    assert alert.events.count() == 3


def test_silence_alerts_like_this_prefills_matchers_and_requires_a_reason(client, operator_user):
    alert = make_alert()
    client.force_login(operator_user)
    form = page(client, alert_url("silence", alert))
    assert "alertname=normal-backlog-high, component=queues, queue=normal, severity=critical" in form

    no_reason = client.post(alert_url("silence", alert), {"matchers": "alertname=normal-backlog-high", "hours": "4",
                                                          "reason": "  "})
    assert no_reason.status_code == 400 and "Reason: This field is required." in no_reason.content.decode()
    bad = client.post(alert_url("silence", alert), {"matchers": "queue", "hours": "4", "reason": "deploy"})
    assert bad.status_code == 400 and "Matchers: &#x27;queue&#x27; has no operator" in bad.content.decode()
    assert not Silence.objects.exists()

    client.post(alert_url("silence", alert), {"matchers": "alertname=normal-backlog-high, queue=~normal|high",
                                              "hours": "24", "reason": "deploying the normal pool"})
    silence = Silence.objects.get()
    assert silence.matchers == [{"label": "alertname", "op": "=", "value": "normal-backlog-high"},
                                {"label": "queue", "op": "=~", "value": "normal|high"}]
    assert abs((silence.ends_at - timezone.now() - timedelta(hours=24)).total_seconds()) < 60
    assert silence.created_by == operator_user and silence.matches(alert.labels)
    assert AuditEntry.objects.get(action="silence_create").detail["reason"] == "deploying the normal pool"


def test_bulk_acknowledge_confirms_then_acknowledges_only_open_unacknowledged_alerts(client, operator_user):
    open_alerts = [make_alert(), make_alert("redis-unreachable")]
    resolved = make_alert("backlog-high", state="resolved", resolved_at=timezone.now())
    client.force_login(operator_user)
    selected = [str(alert.pk) for alert in (*open_alerts, resolved)]
    question = client.post(reverse(CHANGELIST), {"action": "acknowledge_selected", "_selected_action": selected,
                                                 "index": "0"})
    assert "Acknowledge 2 of the 3 selected alert(s)?" in question.content.decode()
    assert not Alert.objects.filter(acknowledged_at__isnull=False).exists()

    done = client.post(reverse(CHANGELIST), {"action": "acknowledge_selected", "_selected_action": selected,
                                             "select_across": "0", "confirm": "yes", "note": "on it"}, follow=True)
    assert "Acknowledged 2 alert(s). 1 were resolved or already acknowledged." in done.content.decode()
    assert set(Alert.objects.filter(acknowledged_by=operator_user).values_list("pk", flat=True)) == \
        {alert.pk for alert in open_alerts}
    assert AuditEntry.objects.filter(action="alert_acknowledge").count() == 2


# --- the alert page -------------------------------------------------------------------------------------------

def test_alert_page_shows_timeline_notifications_with_attempts_cause_and_runbook(client, support_user):
    now = timezone.now()
    cause = make_alert("redis-unreachable", started=now - timedelta(minutes=30))
    alert = make_alert("no-active-workers", started=now - timedelta(minutes=29), inhibited_by=cause)
    caused = make_alert("health-unhealthy", started=now - timedelta(minutes=28), inhibited_by=alert)
    for minutes, kind, message in [(29, "pending", "No caption worker is alive"), (28, "firing", "fires"),
                                   (27, "inhibited", "caused by: Redis is unreachable"),
                                   (26, "notified", "firing message to ops-hook delivered"),
                                   (25, "escalated", "Escalated to level 2 (Database administrator)"),
                                   (24, "acknowledged", "restarting workers"), (23, "cleared", "back"),
                                   (22, "returned", "the condition returned (flap 1)"), (21, "resolved", "resolved")]:
        AlertEvent.objects.create(alert=alert, kind=kind, message=message, at=now - timedelta(minutes=minutes),
                                  user=support_user if kind == "acknowledged" else None)
    channel = NotificationChannel.objects.create(name="ops-hook", kind="webhook",
                                                 config={"url": "http://127.0.0.1:9/hook"})
    notification = Notification.objects.create(channel=channel, kind="firing", status="delivered",
                                               subject="[FIRING:1] critical: No caption worker is alive")
    notification.alerts.add(alert)
    DeliveryAttempt.objects.create(notification=notification, channel=channel, outcome="transient",
                                   http_status=503, error="webhook answered 503: busy", duration_ms=12,
                                   at=now - timedelta(minutes=27))
    DeliveryAttempt.objects.create(notification=notification, channel=channel, outcome="delivered", http_status=200,
                                   duration_ms=8, at=now - timedelta(minutes=26))
    AlertRule.objects.filter(name="no-active-workers").update(runbook_url="https://wiki.example/runbooks/workers")
    client.force_login(support_user)

    html = page(client, alert_url("change", alert))
    timeline = html[html.index('id="alert-timeline"'):html.index('id="alert-notifications"')]
    kinds = ["pending", "firing", "inhibited", "notified", "escalated", "acknowledged", "cleared", "returned",
             "resolved"]
    positions = [timeline.index(f'data-event="{kind}"') for kind in kinds]
    assert positions == sorted(positions)  # in the order they happened
    assert "restarting workers" in timeline and support_user.username in timeline
    notifications = html[html.index('id="alert-notifications"'):]
    assert "ops-hook: Transient failure, HTTP 503, webhook answered 503: busy, 12 ms" in notifications
    assert "ops-hook: Delivered, HTTP 200, 8 ms" in notifications
    concerns = html[html.index('id="alert-concerns"'):html.index('id="alert-timeline"')]
    assert "Check `manage.py runworkers`" in concerns  # the rule's runbook
    assert 'href="https://wiki.example/runbooks/workers"' in concerns
    assert alert_url("change", cause) in concerns[concerns.index('id="alert-cause"'):]
    assert alert_url("change", caused) in concerns[concerns.index('id="alert-caused"'):]
    assert reverse("admin:monitoring_alertrule_change", args=[alert.rule_id]) in html


def test_runbook_link_from_an_annotation_must_be_http(client, support_user):
    alert = make_alert(annotations={"runbook_url": "javascript:alert(1)"})
    AlertRule.objects.filter(pk=alert.rule_id).update(runbook_url="")
    client.force_login(support_user)
    html = page(client, alert_url("change", alert))
    assert "javascript:alert(1)" in html and 'href="javascript:' not in html  # shown as text, never a link


def test_dead_letter_link_lists_the_tasks_that_failed_while_the_alert_lasted(client, support_user, redis):
    started = timezone.now() - timedelta(hours=3)
    alert = make_alert(started=started, state="resolved", resolved_at=started + timedelta(hours=1))

    def failed(at, priority="normal", status=TaskStatus.FAILED):
        return CaptionTask.objects.create(image_ref="x.png", priority=priority, status=status, finished_at=at).pk

    inside = failed(started + timedelta(minutes=20))
    just_before = failed(started - timedelta(minutes=4))
    too_early = failed(started - timedelta(minutes=30))
    too_late = failed(started + timedelta(hours=2))
    other_queue = failed(started + timedelta(minutes=20), priority="low")
    completed = failed(started + timedelta(minutes=20), status=TaskStatus.COMPLETED)
    client.force_login(support_user)
    context = client.get(alert_url("change", alert)).context
    links = dict(context["related_links"])
    response = client.get(links["Dead letters of this time (queue normal)"])
    assert response.status_code == 200
    shown = {task.pk for task in response.context["cl"].result_list}
    assert shown == {inside, just_before}
    assert not shown & {too_early, too_late, other_queue, completed}


def test_fleet_events_link_shows_the_events_of_the_alert_window(client, support_user):
    started = timezone.now() - timedelta(hours=3)
    alert = make_alert("no-active-workers", started=started, state="resolved",
                       resolved_at=started + timedelta(minutes=30))
    during = FleetEvent.objects.create(kind="worker_crashed", worker_name="w1", at=started + timedelta(minutes=1))
    FleetEvent.objects.create(kind="worker_started", worker_name="w2", at=started + timedelta(hours=1))
    client.force_login(support_user)
    links = dict(client.get(alert_url("change", alert)).context["related_links"])
    assert "Live workers" in links  # a workers alert links the live worker list too
    response = client.get(links["Fleet events of this time"])
    assert [event.pk for event in response.context["cl"].result_list] == [during.pk]


# --- the list -------------------------------------------------------------------------------------------------

@pytest.fixture
def history():
    now = timezone.now()
    return {
        "critical_firing": make_alert(started=now - timedelta(hours=1)),
        "warning_resolved": make_alert("backlog-high", state="resolved", started=now - timedelta(days=3),
                                       resolved_at=now - timedelta(days=3) + timedelta(minutes=20)),
        "old_pending": make_alert("processing-slow", state="pending", started=now - timedelta(days=20)),
        "alertmanager": make_alert("redis-unreachable", source="alertmanager", rule=None, name="RedisDown",
                                   summary="Redis down on cache-2", fingerprint="am:abc123",
                                   extra_labels={"instance": "cache-2"}, started=now - timedelta(days=40)),
    }


def test_list_filters_by_severity_state_rule_source_label_and_period(client, support_user, history):
    client.force_login(support_user)
    url = reverse(CHANGELIST)
    pk = {name: alert.pk for name, alert in history.items()}
    assert listed(client.get(url, {"severity__exact": "warning"})) == {pk["warning_resolved"], pk["old_pending"]}
    assert listed(client.get(url, {"state__exact": "firing"})) == {pk["critical_firing"], pk["alertmanager"]}
    assert listed(client.get(url, {"source__exact": "alertmanager"})) == {pk["alertmanager"]}
    rule = history["warning_resolved"].rule_id
    assert listed(client.get(url, {"rule__id__exact": rule})) == {pk["warning_resolved"]}
    assert listed(client.get(url, {"component": "queues"})) == {pk["critical_firing"], pk["warning_resolved"]}
    assert listed(client.get(url, {"label": "queue=normal"})) == {pk["critical_firing"]}
    assert listed(client.get(url, {"label": "instance=cache-2,component=redis"})) == {pk["alertmanager"]}
    assert listed(client.get(url, {"label": "queue=low"})) == set()
    assert listed(client.get(url, {"period": "24h"})) == {pk["critical_firing"]}
    assert listed(client.get(url, {"period": "7d"})) == {pk["critical_firing"], pk["warning_resolved"]}
    assert listed(client.get(url, {"period": "30d"})) == {pk["critical_firing"], pk["warning_resolved"],
                                                          pk["old_pending"]}
    started = history["warning_resolved"].started_at
    assert pk["warning_resolved"] in listed(client.get(url, {"started_at__year": started.year,
                                                             "started_at__month": started.month,
                                                             "started_at__day": started.day}))


def drill_down(html: str) -> str:
    links = html[html.index('class="toplinks"'):]
    return links[:links.index("</nav>")]


def test_date_drill_down_offers_the_periods_between_first_and_last_alert_without_a_distinct_scan(client,
                                                                                                support_user):
    utc = dt_timezone.utc
    make_alert(started=datetime(2023, 9, 5, 12, tzinfo=utc), state="resolved",
               resolved_at=datetime(2023, 9, 5, 13, tzinfo=utc))
    november = make_alert("backlog-high", started=datetime(2023, 11, 20, 12, tzinfo=utc), state="resolved",
                          resolved_at=datetime(2023, 11, 20, 13, tzinfo=utc))
    make_alert(started=datetime(2025, 2, 10, 12, tzinfo=utc))
    client.force_login(support_user)
    url = reverse(CHANGELIST)
    with CaptureQueriesContext(connection) as queries:
        html = page(client, url)
    assert not any("DISTINCT" in query["sql"] for query in queries.captured_queries)
    toplinks = drill_down(html)
    assert [f"started_at__year={year}" in toplinks for year in (2022, 2023, 2024, 2025, 2026)] == \
        [False, True, True, True, False]
    months = drill_down(page(client, url, started_at__year=2023))
    assert [name in months for name in ("August", "September", "October", "November", "December")] == \
        [False, True, True, True, False]  # October has none: offered, as the price of not scanning
    days = drill_down(page(client, url, started_at__year=2023, started_at__month=11))
    assert "November 20" in days and "November 19" not in days and "November 21" not in days
    assert listed(client.get(url, {"started_at__year": 2023, "started_at__month": 11})) == {november.pk}


def test_the_queue_label_filter_reads_the_indexed_column_the_alert_keeps_in_step(client, support_user, history):
    """At 200,000 alerts the JSON filter took 103 + 86 ms and grew with the history: the queue label is copied to a
    column of its own, indexed with started_at, kept in step when the labels change; a value too long to index is
    found through the JSON."""
    client.force_login(support_user)
    url = reverse(CHANGELIST)
    long_name = "q" * 150
    long = make_alert("backlog-high", extra_labels={"queue": long_name})
    assert (history["critical_firing"].queue, long.queue) == ("normal", "")
    with CaptureQueriesContext(connection) as queries:
        assert listed(client.get(url, {"label": "queue=normal"})) == {history["critical_firing"].pk}
    listing = [query["sql"] for query in queries.captured_queries if "monitoring_alert" in query["sql"]]
    assert listing and not any("JSON" in sql.upper() for sql in listing), listing
    assert any('"monitoring_alert"."queue" =' in sql.replace("`", '"') for sql in listing), listing
    assert listed(client.get(url, {"label": f"queue={long_name}"})) == {long.pk}

    moved = history["critical_firing"]
    moved.labels = {**moved.labels, "queue": "high"}
    moved.save(update_fields=["labels"])
    assert Alert.objects.get(pk=moved.pk).queue == "high"
    assert listed(client.get(url, {"label": "queue=high"})) == {moved.pk}
    assert listed(client.get(url, {"label": "queue=normal"})) == set()


def test_label_filter_that_is_not_label_equals_value_is_refused(client, support_user, history):
    client.force_login(support_user)
    response = client.get(reverse(CHANGELIST), {"label": "nonsense"})
    assert response.status_code == 302 and "e=1" in response["Location"]


def test_search_covers_summary_name_and_fingerprint(client, support_user, history):
    client.force_login(support_user)
    url = reverse(CHANGELIST)
    assert listed(client.get(url, {"q": "cache-2"})) == {history["alertmanager"].pk}
    assert listed(client.get(url, {"q": "processing-slow"})) == {history["old_pending"].pk}
    fingerprint = history["critical_firing"].fingerprint
    assert listed(client.get(url, {"q": fingerprint[:12]})) == {history["critical_firing"].pk}


def test_list_shows_columns_and_badges(client, support_user, history):
    alert_acknowledge(alert=history["critical_firing"], user=support_user, note="")
    client.force_login(support_user)
    html = page(client, reverse(CHANGELIST))
    assert "background:#c62828" in html  # the firing badge
    assert support_user.username in html  # acknowledged by
    assert "20 min" in html  # duration of the resolved warning
    assert reverse("admin:monitoring_alert_summary") in html
    assert reverse("admin:monitoring_alert_export") in html


def test_list_costs_the_same_queries_for_three_alerts_as_for_thirty(client, operator_user, history,
                                                                    django_assert_num_queries):
    client.force_login(operator_user)
    url = reverse(CHANGELIST)
    with CaptureQueriesContext(connection) as few:
        assert client.get(url).status_code == 200
    for _ in range(26):
        make_alert(acknowledged_by=operator_user, acknowledged_at=timezone.now())
    with django_assert_num_queries(len(few.captured_queries)):
        response = client.get(url)
    assert len(response.context["cl"].result_list) == 30


# --- export and summary ---------------------------------------------------------------------------------------

def csv_rows(response) -> list[dict]:
    assert response["Content-Type"].startswith("text/csv")
    text = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_export_has_the_columns_and_honours_the_list_filter_and_search(client, support_user, history):
    alert_acknowledge(alert=history["critical_firing"], user=support_user, note="")
    client.force_login(support_user)
    list_page = page(client, reverse(CHANGELIST), **{"state__exact": "firing"})
    assert f'{reverse("admin:monitoring_alert_export")}?state__exact=firing' in list_page

    rows = csv_rows(client.get(reverse("admin:monitoring_alert_export"), {"state__exact": "firing"}))
    assert {int(row["id"]) for row in rows} == {history["critical_firing"].pk, history["alertmanager"].pk}
    assert list(rows[0]) == ["id", "state", "severity", "name", "summary", "component", "labels", "started_at",
                             "fired_at", "acknowledged_at", "acknowledged_by", "resolved_at", "flaps", "source"]
    firing = next(row for row in rows if int(row["id"]) == history["critical_firing"].pk)
    assert firing["acknowledged_by"] == support_user.username and firing["severity"] == "critical"
    assert json.loads(firing["labels"])["queue"] == "normal"
    searched = csv_rows(client.get(reverse("admin:monitoring_alert_export"), {"q": "cache-2"}))
    assert [row["summary"] for row in searched] == ["Redis down on cache-2"]


def test_csv_cells_that_look_like_formulas_are_quoted(client, support_user):
    make_alert(summary="=HYPERLINK(\"http://evil.example\")")
    client.force_login(support_user)
    [row] = csv_rows(client.get(reverse("admin:monitoring_alert_export")))
    assert row["summary"] == "'=HYPERLINK(\"http://evil.example\")"


def test_summary_computes_mean_times_to_acknowledge_and_resolve(client, support_user):
    fired = timezone.now() - timedelta(hours=5)
    make_alert(started=fired, acknowledged_at=fired + timedelta(minutes=2), state="resolved",
               resolved_at=fired + timedelta(minutes=10))
    again = fired + timedelta(seconds=1)  # one occurrence of a condition per start
    make_alert(started=again, acknowledged_at=again + timedelta(minutes=4), state="resolved",
               resolved_at=again + timedelta(minutes=20), flaps=3)
    make_alert(started=fired + timedelta(seconds=2))  # still firing, not acknowledged: in neither mean
    make_alert("backlog-high", started=fired, state="resolved", resolved_at=fired + timedelta(hours=1))
    make_alert("backlog-high", started=timezone.now() - timedelta(days=10))  # outside the period
    client.force_login(support_user)
    response = client.get(reverse("admin:monitoring_alert_summary"), {"days": "7"})
    totals = response.context["summary"]["totals"]
    assert (totals["total"], totals["fired"], totals["acknowledged"], totals["flaps"]) == (4, 4, 2, 3)
    assert totals["mtta"] == timedelta(minutes=3)
    assert totals["mttr"] == timedelta(minutes=(10 + 20 + 60) / 3)
    rules = {row["name"]: row for row in response.context["summary"]["rules"]}
    assert rules["normal-backlog-high"]["mtta"] == timedelta(minutes=3)
    assert rules["normal-backlog-high"]["mttr"] == timedelta(minutes=15)
    assert rules["backlog-high"]["mtta"] is None and rules["backlog-high"]["total"] == 1
    html = response.content.decode()
    assert '<td data-figure="mtta">3 min</td>' in html and '<td data-figure="mttr">30 min</td>' in html
    assert '<td data-severity="critical">3</td>' in html and '<td data-severity="warning">1</td>' in html
    noisiest = response.context["summary"]["noisiest"]
    assert noisiest[0]["name"] == "normal-backlog-high" and noisiest[0]["noise"] == 3 + 3


def test_summary_takes_a_date_range_and_names_the_wrong_field(client, support_user):
    make_alert(started=timezone.now() - timedelta(days=30))
    client.force_login(support_user)
    day = (timezone.localdate() - timedelta(days=30)).isoformat()
    response = client.get(reverse("admin:monitoring_alert_summary"), {"since": day, "until": day})
    assert response.context["summary"]["totals"]["total"] == 1
    refused = client.get(reverse("admin:monitoring_alert_summary"), {"since": day})
    assert refused.status_code == 400 and "To (inclusive): Give both dates, or neither." in refused.content.decode()
    assert client.get(reverse("admin:monitoring_alert_summary"), {"days": "0"}).status_code == 400
    far = client.get(reverse("admin:monitoring_alert_summary"), {"since": day, "until": "9999-12-31"})
    assert far.status_code == 400 and "Give a date between 2000 and 9000." in far.content.decode()


def test_rule_labels_must_be_text_and_may_not_replace_the_rules_own(client, admin_user):
    rule = AlertRule.objects.get(name="normal-backlog-high")
    client.force_login(admin_user)
    url = reverse("admin:monitoring_alertrule_change", args=[rule.pk])
    for labels, message in (('["queue"]', "Give an object of text labels"),
                            ('{"severity": "info"}', "severity come from the rule"),
                            ('{"queue": 5}', "Give an object of text labels"),
                            # Each of these made promtool refuse the exported rules, or exported a rule that
                            # always (or never) fires.
                            ('{"queue": "normal\\"} or vector(1) #"}', "is not a queue"),
                            ('{"queue": "nromal"}', "is not a queue"),
                            ('{"\u00e9quipe": "ops"}', "ASCII letters"),
                            ('{"rule": "other-rule"}', "rule come from the rule")):
        response = client.post(url, rule_form(rule, labels=labels))
        assert response.status_code == 200 and message in response.content.decode(), labels
    rule.refresh_from_db()
    assert rule.labels == {"queue": "normal"}


# --- the banner -----------------------------------------------------------------------------------------------

def test_banner_names_firing_alerts_on_every_admin_page(client, support_user):
    firing = make_alert()
    resolved = make_alert("backlog-high", state="resolved", resolved_at=timezone.now())
    client.force_login(support_user)
    for url in (reverse("admin:index"), reverse("admin:monitoring_silence_changelist")):
        html = page(client, url)
        banner = html[html.index('id="firing-alerts"'):]
        banner = banner[:banner.index("</ul>")]
        assert "1 alert firing" in banner and f'data-alert="{firing.pk}"' in banner
        assert f'data-alert="{resolved.pk}"' not in banner
        assert f'{reverse(CHANGELIST)}?state__exact=firing' in banner


def test_banner_says_more_than_five_when_more_fire(client, support_user):
    for name in ["redis-unreachable", "no-active-workers", "backlog-high", "wait-long", "few-workers",
                 "fallback-active"]:
        make_alert(name)
    client.force_login(support_user)
    html = page(client, reverse("admin:index"))
    assert "More than 5 alerts firing" in html and html.count("data-alert=") == 5


def test_banner_costs_one_query_and_none_without_permission_or_off_the_admin(support_user, django_user_model,
                                                                            django_assert_num_queries):
    make_alert()
    request = RequestFactory().get("/admin/")
    request.user = support_user
    support_user.has_perm("monitoring.view_alert")  # an admin page has read the permissions by the time
    with django_assert_num_queries(1) as captured:
        context = alerts_banner(request)
    assert "monitoring_alert" in captured.captured_queries[0]["sql"]
    assert context["firing_alerts"]["count"] == 1

    no_alerts = django_user_model.objects.create_user("staff-without-alerts", is_staff=True)
    no_alerts.user_permissions.add(Permission.objects.get(codename="view_captiontask"))
    request.user = no_alerts
    no_alerts.has_perm("monitoring.view_alert")
    with django_assert_num_queries(0):
        assert alerts_banner(request) == {}
    api = RequestFactory().get("/api/rq/health")
    api.user = support_user
    with django_assert_num_queries(0):
        assert alerts_banner(api) == {}


def test_banner_is_absent_for_staff_who_may_not_view_alerts(client, django_user_model):
    make_alert()
    user = django_user_model.objects.create_user("tasks-only", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_captiontask"))
    client.force_login(user)
    assert 'id="firing-alerts"' not in page(client, reverse("admin:index"))


# --- silences -------------------------------------------------------------------------------------------------

def test_operator_creates_a_silence_from_matcher_text_and_expires_it(client, operator_user):
    client.force_login(operator_user)
    add = reverse("admin:monitoring_silence_add")
    now = timezone.localtime()
    later = now + timedelta(hours=2)
    form = {"matchers": "alertname=redis-unreachable, queue=~normal|high", "reason": "Redis maintenance",
            "starts_at_0": now.strftime("%Y-%m-%d"), "starts_at_1": now.strftime("%H:%M:%S"),
            "ends_at_0": later.strftime("%Y-%m-%d"), "ends_at_1": later.strftime("%H:%M:%S")}
    refused = client.post(add, {**form, "matchers": "alertname"})
    assert refused.status_code == 200 and "has no operator" in refused.content.decode()
    backwards = client.post(add, {**form, "ends_at_0": "2001-01-01", "ends_at_1": "00:00:00"})
    assert "The end must be after the start." in backwards.content.decode()
    assert not Silence.objects.exists()

    assert client.post(add, form).status_code == 302
    silence = Silence.objects.get()
    assert silence.matchers[1] == {"label": "queue", "op": "=~", "value": "normal|high"}
    assert silence.created_by == operator_user and silence.is_active(timezone.now())
    assert AuditEntry.objects.filter(action="silence_create", user=operator_user).count() == 1

    listing = client.get(reverse("admin:monitoring_silence_changelist"), {"state": "active"})
    assert [row.pk for row in listing.context["cl"].result_list] == [silence.pk]
    expire = reverse("admin:monitoring_silence_expire", args=[silence.pk])
    assert expire in page(client, reverse("admin:monitoring_silence_change", args=[silence.pk]))
    assert "End the silence" in page(client, expire)
    client.post(expire)
    silence.refresh_from_db()
    assert not silence.is_active(timezone.now()) and silence.expired_by == operator_user
    assert AuditEntry.objects.filter(action="silence_expire").count() == 1
    expired = client.get(reverse("admin:monitoring_silence_changelist"), {"state": "expired"})
    assert [row.pk for row in expired.context["cl"].result_list] == [silence.pk]
    assert client.get(reverse("admin:monitoring_silence_changelist"),
                      {"state": "upcoming"}).context["cl"].result_count == 0


def test_support_views_silences_but_cannot_create_or_expire(client, support_user, operator_user):
    silence = Silence.objects.create(matchers=[{"label": "alertname", "op": "=", "value": "x"}], reason="r",
                                     ends_at=timezone.now() + timedelta(hours=1), created_by=operator_user)
    client.force_login(support_user)
    assert page(client, reverse("admin:monitoring_silence_change", args=[silence.pk]))
    assert client.get(reverse("admin:monitoring_silence_add")).status_code == 403
    assert client.post(reverse("admin:monitoring_silence_add"), {"matchers": "a=b", "reason": "r"}).status_code == 403
    expire = reverse("admin:monitoring_silence_expire", args=[silence.pk])
    assert client.get(expire).status_code == 403 and client.post(expire).status_code == 403
    crafted = client.post(reverse("admin:monitoring_silence_changelist"),
                          {"action": "expire_selected", "_selected_action": [silence.pk], "confirm": "yes"})
    assert crafted.status_code == 403
    silence.refresh_from_db()
    assert silence.is_active(timezone.now()) and not AuditEntry.objects.exists()


# --- rules ----------------------------------------------------------------------------------------------------

def rule_form(rule: AlertRule, **changes) -> dict:
    data = {"name": rule.name, "title": rule.title, "signal": rule.signal, "comparison": rule.comparison,
            "threshold": rule.threshold, "for_seconds": rule.for_seconds, "clear_seconds": rule.clear_seconds,
            "severity": rule.severity, "component": rule.component, "labels": json.dumps(rule.labels),
            "initial-labels": json.dumps(rule.labels),  # as the page sends it (labels has a callable default)
            "enabled": "on" if rule.enabled else "", "runbook": rule.runbook, "runbook_url": rule.runbook_url,
            "inhibited_by": [str(pk) for pk in rule.inhibited_by.values_list("pk", flat=True)]}
    data.update(changes)
    return {key: value for key, value in data.items() if value != ""}


def test_admin_edits_a_rule_and_the_audit_row_has_old_and_new_values(client, admin_user):
    rule = AlertRule.objects.get(name="normal-backlog-high")
    redis_rule = AlertRule.objects.get(name="redis-unreachable")
    client.force_login(admin_user)
    url = reverse("admin:monitoring_alertrule_change", args=[rule.pk])
    response = client.post(url, rule_form(rule, threshold="250", for_seconds="60",
                                          inhibited_by=[str(redis_rule.pk)]))
    assert response.status_code == 302
    rule.refresh_from_db()
    assert (rule.threshold, rule.for_seconds) == (250, 60)
    assert list(rule.inhibited_by.all()) == [redis_rule]
    entry = AuditEntry.objects.get(action="alert_rule_change")
    assert entry.user == admin_user and entry.address == "127.0.0.1" and rule.name in entry.target
    assert entry.detail["changed"]["threshold"] == [200.0, 250.0]
    assert entry.detail["changed"]["for_seconds"] == [0, 60]
    assert entry.detail["changed"]["inhibited_by"] == [["no-active-workers", "redis-unreachable"],
                                                       ["redis-unreachable"]]
    assert set(entry.detail["changed"]) == {"threshold", "for_seconds", "inhibited_by"}

    client.post(url, rule_form(rule))  # saved without a change: no audit row
    assert AuditEntry.objects.filter(action="alert_rule_change").count() == 1


def test_rule_form_refuses_an_unknown_signal_and_a_threshold_that_is_not_a_number(client, admin_user):
    rule = AlertRule.objects.get(name="normal-backlog-high")
    client.force_login(admin_user)
    url = reverse("admin:monitoring_alertrule_change", args=[rule.pk])
    form = client.get(url).content.decode()
    assert '<option value="queue_backlog" selected>' in form
    response = client.post(url, rule_form(rule, signal="queue_lenght", threshold="lots"))
    errors = response.context["adminform"].form.errors
    assert "signal" in errors and "threshold" in errors
    rule.refresh_from_db()
    assert (rule.signal, rule.threshold) == ("queue_backlog", 200) and not AuditEntry.objects.exists()


def test_support_reads_rules_but_cannot_change_them(client, support_user):
    rule = AlertRule.objects.get(name="normal-backlog-high")
    client.force_login(support_user)
    url = reverse("admin:monitoring_alertrule_change", args=[rule.pk])
    html = page(client, url)
    assert rule.title in html and 'name="_save"' not in html
    assert client.post(url, rule_form(rule, threshold="1")).status_code == 403
    assert client.get(reverse("admin:monitoring_alertrule_add")).status_code == 403
    rule.refresh_from_db()
    assert rule.threshold == 200 and not AuditEntry.objects.exists()


def test_operators_tune_thresholds_and_durations_only(client, operator_user):
    rule = AlertRule.objects.get(name="normal-backlog-high")
    client.force_login(operator_user)
    url = reverse("admin:monitoring_alertrule_change", args=[rule.pk])
    html = page(client, url)
    assert 'name="threshold"' in html and 'name="for_seconds"' in html and 'name="clear_seconds"' in html
    assert 'name="severity"' not in html and 'name="signal"' not in html and 'name="enabled"' not in html
    response = client.post(url, {"threshold": "300", "for_seconds": "120", "clear_seconds": "30",
                                 "severity": "info", "enabled": "", "signal": "dead_letters"})
    assert response.status_code == 302
    rule.refresh_from_db()
    assert (rule.threshold, rule.for_seconds, rule.clear_seconds) == (300, 120, 30)
    assert (rule.severity, rule.enabled, rule.signal) == ("critical", True, "queue_backlog"), "read-only for them"
    entry = AuditEntry.objects.get(action="alert_rule_change")
    assert entry.user == operator_user and set(entry.detail["changed"]) == {"threshold", "for_seconds",
                                                                             "clear_seconds"}
    assert client.get(reverse("admin:monitoring_alertrule_add")).status_code == 403
    assert client.post(reverse("admin:monitoring_alertrule_delete", args=[rule.pk]), {"post": "yes"}).status_code \
        == 403
    assert AlertRule.objects.filter(pk=rule.pk).exists()


# --- channels, routes, escalation, notifications --------------------------------------------------------------

@pytest.fixture
def webhook(http_server):
    url = http_server.route("/hook", respond(200, b"ok"))
    return NotificationChannel.objects.create(name="ops-hook", kind="webhook", config={"url": url})


def test_test_notification_reaches_the_webhook_and_is_recorded(client, admin_user, webhook, http_server):
    client.force_login(admin_user)
    url = reverse("admin:monitoring_notificationchannel_test", args=[webhook.pk])
    assert url in page(client, reverse("admin:monitoring_notificationchannel_change", args=[webhook.pk]))
    assert "Send a test notification to ops-hook" in page(client, url)
    assert http_server.requests == []  # the confirmation sends nothing

    done = client.post(url, follow=True)
    assert "Test notification delivered to ops-hook (HTTP 200)." in done.content.decode()
    [request] = http_server.requests
    body = json.loads(request["body"])
    assert request["path"] == "/hook" and body["kind"] == "test" and "ops-hook" in body["text"]
    notification = Notification.objects.get(channel=webhook)
    assert (notification.kind, notification.status, notification.created_by) == ("test", "delivered", admin_user)
    attempt = DeliveryAttempt.objects.get(notification=notification)
    assert (attempt.outcome, attempt.http_status, attempt.channel) == ("delivered", 200, webhook)
    assert AuditEntry.objects.filter(action="channel_test", user=admin_user).exists()


def test_failed_test_notification_shows_the_status_and_the_error(client, admin_user, http_server):
    url = http_server.route("/gone", respond(404, b"no such hook"))
    channel = NotificationChannel.objects.create(name="old-hook", kind="webhook", config={"url": url})
    client.force_login(admin_user)
    done = client.post(reverse("admin:monitoring_notificationchannel_test", args=[channel.pk]), follow=True)
    html = done.content.decode()
    assert "Test notification to old-hook: Failed (permanent) (HTTP 404): " in html and "404" in html
    assert DeliveryAttempt.objects.get().outcome == "permanent"


def test_disabled_channel_shows_why_and_re_enable_resets_it(client, admin_user, webhook):
    NotificationChannel.objects.filter(pk=webhook.pk).update(
        enabled=False, permanent_failures=3, disabled_at=timezone.now(),
        disabled_reason="disabled after 3 permanent failures in a row; last: webhook answered 410")
    client.force_login(admin_user)
    listing = page(client, reverse("admin:monitoring_notificationchannel_changelist"))
    assert "disabled after 3 permanent failures in a row; last: webhook answered 410" in listing
    enable = reverse("admin:monitoring_notificationchannel_enable", args=[webhook.pk])
    assert enable in page(client, reverse("admin:monitoring_notificationchannel_change", args=[webhook.pk]))
    assert "It was disabled: disabled after 3" in page(client, enable)
    assert not NotificationChannel.objects.get(pk=webhook.pk).enabled

    client.post(enable)
    webhook.refresh_from_db()
    assert (webhook.enabled, webhook.permanent_failures, webhook.disabled_reason) == (True, 0, "")
    entry = AuditEntry.objects.get(action="channel_enable")
    assert entry.user == admin_user and "410" in entry.detail["was"]


@pytest.mark.parametrize("role", ["support_user", "operator_user"])
def test_channels_are_for_admins_only(client, request, role, webhook, http_server):
    client.force_login(request.getfixturevalue(role))
    assert client.get(reverse("admin:monitoring_notificationchannel_changelist")).status_code == 403
    assert client.get(reverse("admin:monitoring_notificationchannel_change", args=[webhook.pk])).status_code == 403
    for name in ("test", "enable"):
        url = reverse(f"admin:monitoring_notificationchannel_{name}", args=[webhook.pk])
        assert client.get(url).status_code == 403 and client.post(url).status_code == 403
    assert http_server.requests == [] and not Notification.objects.exists()


def test_channel_config_is_checked_by_its_transport_and_changes_are_audited_without_values(client, admin_user):
    client.force_login(admin_user)
    add = reverse("admin:monitoring_notificationchannel_add")
    refused = client.post(add, {"name": "bad", "kind": "webhook", "config": '{"url": "ftp://example.org"}',
                                "enabled": "on"})
    assert "url: must start with http:// or https://" in refused.content.decode()
    assert not NotificationChannel.objects.exists()
    client.post(add, {"name": "good", "kind": "webhook", "enabled": "on",
                      "config": '{"url": "https://hooks.example.org/x", "token": "s3cret"}'})
    entry = AuditEntry.objects.get(action="channel_create")
    assert "config" in entry.detail["changed"] and "s3cret" not in json.dumps(entry.detail)


def test_route_form_names_a_wrong_severity_and_matcher(client, admin_user, webhook):
    client.force_login(admin_user)
    response = client.post(reverse("admin:monitoring_notificationroute_add"), {
        "name": "ops", "position": "10", "severities": '["critical", "urgent"]',
        "matchers": '[{"label": "queue", "op": "~", "value": "x"}]', "channels": [webhook.pk], "group_by": "[]",
        "group_wait_seconds": "30", "repeat_interval_seconds": "3600", "enabled": "on"})
    errors = response.context["adminform"].form.errors
    assert "Unknown severity urgent" in errors["severities"][0]
    assert "operator '~'" in errors["matchers"][0]
    assert not NotificationRoute.objects.filter(name="ops").exists()  # nothing written


def test_escalation_policy_with_steps_is_created_and_audited(client, admin_user, webhook):
    client.force_login(admin_user)
    response = client.post(reverse("admin:monitoring_escalationpolicy_add"), {
        "name": "nights", "severities": '["critical"]', "enabled": "on",
        "steps-TOTAL_FORMS": "1", "steps-INITIAL_FORMS": "0", "steps-MIN_NUM_FORMS": "0",
        "steps-MAX_NUM_FORMS": "1000", "steps-0-level": "1", "steps-0-title": "On-call engineer",
        "steps-0-after_minutes": "15", "steps-0-channels": [webhook.pk]})
    assert response.status_code == 302
    policy = EscalationPolicy.objects.get(name="nights")
    assert [(step.level, step.after_minutes) for step in policy.steps.all()] == [(1, 15)]
    entry = AuditEntry.objects.get(action="escalation_policy_create")
    assert entry.detail["escalation steps"]["added"] == ["1. On-call engineer after 15 min"]


def test_notification_page_shows_its_delivery_attempts_to_support(client, support_user):
    channel = NotificationChannel.objects.create(name="ops-hook", kind="webhook", config={"url": "http://x.test/"})
    notification = Notification.objects.create(channel=channel, kind="firing", status="gave_up", subject="[FIRING]",
                                               last_error="timed out")
    alert = make_alert()
    notification.alerts.add(alert)
    DeliveryAttempt.objects.create(notification=notification, channel=channel, outcome="transient",
                                   error="webhook at x.test did not answer within 10 s", duration_ms=10000)
    client.force_login(support_user)
    html = page(client, reverse("admin:monitoring_notification_change", args=[notification.pk]))
    assert "did not answer within 10 s" in html and alert_url("change", alert) in html
    listing = client.get(reverse("admin:monitoring_notification_changelist"), {"status__exact": "gave_up"})
    assert [row.pk for row in listing.context["cl"].result_list] == [notification.pk]
    assert client.get(reverse("admin:monitoring_notification_changelist"),
                      {"status__exact": "delivered"}).context["cl"].result_count == 0


def test_admin_index_lists_the_alert_pages_each_role_may_see(client, admin_user, support_user):
    client.force_login(admin_user)
    html = page(client, reverse("admin:index"))
    for name in ["Alerts", "Alert rules", "Silences", "Notifications", "Notification channels",
                 "Notification routes", "Escalation policies"]:
        assert f">{name}</a>" in html
    client.force_login(support_user)
    html = page(client, reverse("admin:app_list", args=["monitoring"]))
    for name in ["Alerts", "Alert rules", "Silences", "Notifications"]:
        assert f">{name}</a>" in html
    assert "Notification channels" not in html and "Escalation policies" not in html


def test_a_silence_pattern_is_checked_by_the_engine_that_matches_it(client, operator_user):
    """RE2's syntax, which is Alertmanager's: a look-ahead Python's engine takes is refused, naming the matcher."""
    client.force_login(operator_user)
    now = timezone.localtime()
    later = now + timedelta(hours=2)
    form = {"reason": "maintenance", "starts_at_0": now.strftime("%Y-%m-%d"), "starts_at_1": now.strftime("%H:%M:%S"),
            "ends_at_0": later.strftime("%Y-%m-%d"), "ends_at_1": later.strftime("%H:%M:%S")}
    add = reverse("admin:monitoring_silence_add")
    refused = client.post(add, {**form, "matchers": "component!~(?!queues).*"})
    text = refused.content.decode()
    assert refused.status_code == 200 and "matcher 1 (component!~(?!queues).*)" in text and "RE2" in text
    refused = client.post(add, {**form, "matchers": "équipe=ops"})
    assert refused.status_code == 200 and "label name" in refused.content.decode()
    assert not Silence.objects.exists()
    assert client.post(add, {**form, "matchers": "alertname=~(.*.*)*X"}).status_code == 302


def test_a_flapping_alerts_page_shows_its_newest_timeline_rows_only(client, support_user):
    from monitoring.alerts.admin.base import TIMELINE_ROWS

    alert = make_alert()
    start = timezone.now() - timedelta(days=1)
    AlertEvent.objects.bulk_create([AlertEvent(alert=alert, kind=AlertEvent.Kind.RETURNED, message=f"flap {number}",
                                               at=start + timedelta(seconds=number))
                                    for number in range(TIMELINE_ROWS + 5)])
    client.force_login(support_user)
    html = page(client, reverse("admin:monitoring_alert_change", args=[alert.pk]))
    assert 'id="timeline-older"' in html and html.count('data-event="returned"') == TIMELINE_ROWS
    assert f"flap {TIMELINE_ROWS + 4}<" in html and "flap 4<" not in html, "the newest, oldest first"
    assert 'id="notifications-older"' not in html


def test_an_alertmanager_alerts_page_offers_no_silence_and_names_its_notifier(client, operator_user):
    alert = make_alert(source=Alert.Source.ALERTMANAGER)
    client.force_login(operator_user)
    html = page(client, reverse("admin:monitoring_alert_change", args=[alert.pk]))
    assert alert_url("acknowledge", alert) in html
    assert alert_url("silence", alert) not in html and alert_url("shelve", alert) not in html
    assert "Prometheus Alertmanager, not the portal" in html and "amtool silence add" in html
    # The buttons are gone, and the pages refuse it on the server too.
    refused = client.post(alert_url("shelve", alert), {"shelve_for": "4h"}, follow=True)
    assert "Alertmanager notifies this alert" in refused.content.decode()
    refused = client.post(alert_url("silence", alert), {"matchers": "alertname=X", "hours": "2", "reason": "r"},
                          follow=True)
    assert "Alertmanager notifies this alert" in refused.content.decode()
    alert.refresh_from_db()
    assert alert.shelved_until is None and not Silence.objects.exists()
    portal = make_alert("backlog-high")
    html = page(client, reverse("admin:monitoring_alert_change", args=[portal.pk]))
    assert alert_url("silence", portal) in html and "the portal (its routes" in html


def test_the_database_alerts_page_names_alertmanager_and_refuses_a_portal_silence_or_shelving(client,
                                                                                            operator_user):
    """Prometheus' twin of database-unreachable is paged by Alertmanager (the portal cannot write while its database
    is down). Its page said the portal notified it and offered a silence and a shelving that stopped nothing."""
    alert = make_alert("database-unreachable")
    client.force_login(operator_user)
    html = page(client, reverse("admin:monitoring_alert_change", args=[alert.pk]))
    assert "Prometheus Alertmanager, not the portal" in html and "the portal (its routes" not in html
    assert 'amtool silence add alertname="RQDatabaseUnreachable"' in html and "is the live page" in html
    assert alert_url("acknowledge", alert) in html
    assert alert_url("silence", alert) not in html and alert_url("shelve", alert) not in html
    for name, data in {"shelve": {"shelve_for": "4h"},
                       "silence": {"matchers": "alertname=database-unreachable", "hours": "2", "reason": "r"}}.items():
        refused = client.post(alert_url(name, alert), data, follow=True).content.decode()
        assert "Alertmanager notifies this alert" in refused and "amtool silence add" in refused, name
    alert.refresh_from_db()
    assert alert.shelved_until is None and not Silence.objects.exists()


def test_the_silences_page_refuses_a_silence_of_the_database_alert_naming_alertmanager(client, operator_user):
    """The database alert's own page refused a portal silence, but the Silences page took alertname=database-unreachable
    and saved a silence that stopped nothing: Alertmanager pages that alert through its twin."""
    client.force_login(operator_user)
    now = timezone.localtime()
    later = now + timedelta(hours=2)
    form = {"matchers": "alertname=database-unreachable, severity=critical", "reason": "database maintenance",
            "starts_at_0": now.strftime("%Y-%m-%d"), "starts_at_1": now.strftime("%H:%M:%S"),
            "ends_at_0": later.strftime("%Y-%m-%d"), "ends_at_1": later.strftime("%H:%M:%S")}
    refused = client.post(reverse("admin:monitoring_silence_add"), form)
    assert refused.status_code == 200
    assert "takes only database-unreachable, which Prometheus Alertmanager pages" in refused.content.decode()
    assert "amtool silence add" in refused.content.decode()
    assert not Silence.objects.exists()
    for pattern in ("database-unreachable", "(database-unreachable)", "database-unreach.*"):
        refused = client.post(reverse("admin:monitoring_silence_add"), {**form, "matchers": f"alertname=~{pattern}"})
        assert "Prometheus Alertmanager pages" in refused.content.decode(), pattern
    with pytest.raises(AlertError, match="Prometheus Alertmanager pages"):  # the service refuses it too
        silence_create(matchers=[{"label": "alertname", "op": "=", "value": "database-unreachable"}], ends_at=later,
                       reason="database maintenance", user=operator_user)
    # A silence that also takes the portal's own alerts (a severity, a wider pattern) is the portal's to keep.
    for matchers in ("severity=critical", "alertname=~(database|redis)-unreachable"):
        assert client.post(reverse("admin:monitoring_silence_add"), {**form, "matchers": matchers}
                           ).status_code == 302, matchers
    assert Silence.objects.count() == 2


def test_the_history_keeps_alert_retention_days_and_never_what_is_still_needed(settings):
    """Alerts, their timelines, notifications and delivery attempts grew without end."""
    from monitoring.alerts.retention import alert_history_prune
    from monitoring.models import DeliveryAttempt, Notification, NotificationChannel

    settings.ALERT_RETENTION_DAYS = 30
    long_ago = timezone.now() - timedelta(days=40)
    old = make_alert(state="resolved", started=long_ago, resolved_at=long_ago, resolved_notified=True)
    owed = make_alert("backlog-high", state="resolved", started=long_ago, resolved_at=long_ago)  # resolution owed
    still_open = make_alert("wait-long", started=long_ago)
    recent = make_alert("dead-letters-high", state="resolved", resolved_at=timezone.now(), resolved_notified=True)
    AlertEvent.objects.create(alert=old, kind=AlertEvent.Kind.RESOLVED, at=long_ago)
    channel = NotificationChannel.objects.create(name="hook", kind="webhook", config={"url": "https://x.example/"})

    def notification(alert):
        sent = Notification.objects.create(channel=channel, kind="firing", subject="s", body={}, created_at=long_ago,
                                           next_attempt_at=long_ago, status=Notification.Status.DELIVERED)
        sent.alerts.set([alert])
        DeliveryAttempt.objects.create(notification=sent, channel=channel, at=long_ago, outcome="delivered")
        return sent

    gone, kept = notification(old), notification(still_open)
    assert alert_history_prune(batch=1) == {"alerts": 1, "notifications": 1}
    assert set(Alert.objects.values_list("pk", flat=True)) == {owed.pk, still_open.pk, recent.pk}
    assert not AlertEvent.objects.filter(alert_id=old.pk).exists()
    assert list(Notification.objects.values_list("pk", flat=True)) == [kept.pk], \
        "the open alert's message stays: the planner reads it to know its route was told"
    assert not DeliveryAttempt.objects.filter(notification_id=gone.pk).exists()
