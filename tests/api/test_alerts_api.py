"""Alerts and silences over the HTTP API: the history's filters, one alert's timeline, acknowledge and shelve with
the admin's rules, silences created and expired; each change audited via the token."""

from datetime import timedelta

import pytest
from django.utils import timezone

from monitoring.alerts.timeline import fingerprint_of
from monitoring.models import Alert, AlertEvent, AlertRule, Silence
from queues.models import AuditEntry
from tests.conftest import alert_rules_seed

pytestmark = pytest.mark.django_db


def make_alert(name="normal-backlog-high", *, state="firing", minutes_ago=10, **fields) -> Alert:
    alert_rules_seed()
    rule = AlertRule.objects.get(name=name)
    started = timezone.now() - timedelta(minutes=minutes_ago)
    labels = {**rule.all_labels(), **fields.pop("extra_labels", {})}
    values = dict(rule=rule, name=rule.name, fingerprint=fingerprint_of(labels), severity=rule.severity,
                  component=rule.component, summary=rule.title, labels=labels, state=state, started_at=started,
                  holding_since=started, fired_at=None if state == "pending" else started, last_seen_at=started)
    values.update(fields)
    return Alert.objects.create(**values)


def test_the_history_filters_like_the_admin_and_pages_by_cursor(as_support):
    firing = make_alert()
    resolved = make_alert(state="resolved", resolved_at=timezone.now(), minutes_ago=60 * 24 * 3)
    other = make_alert("no-active-workers")
    ids = lambda **params: [row["id"] for row in as_support.get("/api/v1/alerts", params).json()["results"]]  # noqa: E731
    assert ids() == [other.pk, resolved.pk, firing.pk]
    assert ids(state="resolved") == [resolved.pk]
    assert ids(rule="no-active-workers") == [other.pk]
    assert ids(period="24h") == [other.pk, firing.pk]
    assert ids(label="queue=normal") == [resolved.pk, firing.pk]
    assert ids(severity=other.severity, component=other.component)[0] == other.pk
    first = as_support.get("/api/v1/alerts", {"limit": 2}).json()
    assert len(first["results"]) == 2 and first["next_cursor"]
    rest = as_support.get("/api/v1/alerts", {"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [row["id"] for row in rest["results"]] == [firing.pk] and rest["next_cursor"] is None
    refused = as_support.get("/api/v1/alerts", {"label": "queue"})
    assert refused.status_code == 400 and refused.json()["field"] == "label"


def test_acknowledge_then_shelve_with_the_timeline_and_audit_via_the_token(as_operator, operator_user):
    alert = make_alert()
    response = as_operator.post(f"/api/v1/alerts/{alert.pk}/acknowledge", {"note": "looking at it"})
    assert response.status_code == 200
    assert response.json()["acknowledged_by"] == operator_user.username
    assert response.json()["acknowledgement_note"] == "looking at it"
    again = as_operator.post(f"/api/v1/alerts/{alert.pk}/acknowledge")
    assert again.status_code == 409 and again.json()["error"] == "This alert is already acknowledged."
    shelved = as_operator.post(f"/api/v1/alerts/{alert.pk}/shelve", {"duration_minutes": 90}).json()
    assert shelved["shelved_by"] == operator_user.username
    until = timezone.datetime.fromisoformat(shelved["shelved_until"].replace("Z", "+00:00"))
    assert timedelta(minutes=89) < until - timezone.now() <= timedelta(minutes=90)
    timeline = as_operator.get(f"/api/v1/alerts/{alert.pk}").json()["timeline"]
    assert [event["kind"] for event in timeline] == [AlertEvent.Kind.ACKNOWLEDGED, AlertEvent.Kind.SHELVED]
    assert all(event["user"] == operator_user.username for event in timeline)
    assert as_operator.post(f"/api/v1/alerts/{alert.pk}/unshelve").json()["shelved_until"] is None
    assert as_operator.post(f"/api/v1/alerts/{alert.pk}/unshelve").status_code == 409
    entries = AuditEntry.objects.filter(action__startswith="alert_")
    assert {entry.action for entry in entries} == {"alert_acknowledge", "alert_shelve", "alert_unshelve"}
    assert {entry.detail["via"] for entry in entries} == {"API token deploy hook"}


@pytest.mark.parametrize("body, field", [
    ({}, "until"),
    ({"until": "2020-01-01T00:00:00Z"}, "until"),
    ({"until": "2030-01-01T00:00:00"}, "until"),  # no time zone
    ({"duration_minutes": 0}, "duration_minutes"),
    ({"duration_minutes": 10, "until": "2099-01-01T00:00:00Z"}, "until"),
])
def test_shelving_refuses_what_it_cannot_do_naming_the_field(as_operator, body, field):
    alert = make_alert()
    response = as_operator.post(f"/api/v1/alerts/{alert.pk}/shelve", body)
    assert response.status_code == 400 and response.json()["field"] == field, response.json()
    assert Alert.objects.get(pk=alert.pk).shelved_until is None


def test_a_resolved_or_alertmanager_alert_is_not_shelved(as_operator):
    resolved = make_alert(state="resolved", resolved_at=timezone.now())
    response = as_operator.post(f"/api/v1/alerts/{resolved.pk}/shelve", {"duration_minutes": 30})
    assert response.status_code == 409 and "resolved" in response.json()["error"]
    external = make_alert(source=Alert.Source.ALERTMANAGER)
    response = as_operator.post(f"/api/v1/alerts/{external.pk}/shelve", {"duration_minutes": 30})
    assert response.status_code == 409 and "amtool silence add" in response.json()["error"]
    assert as_operator.post("/api/v1/alerts/987654/acknowledge").status_code == 404


def test_a_silence_is_created_listed_and_expired(as_operator, operator_user):
    body = {"matchers": [{"label": "alertname", "op": "=~", "value": "normal-.*"}], "reason": "deploy",
            "duration_minutes": 30}
    response = as_operator.post("/api/v1/silences", body)
    assert response.status_code == 201, response.content
    silence = response.json()
    assert silence["state"] == "active" and silence["created_by"] == operator_user.username
    assert Silence.objects.get(pk=silence["id"]).matches({"alertname": "normal-backlog-high"})
    listed = as_operator.get("/api/v1/silences", {"state": "active"}).json()["results"]
    assert [row["id"] for row in listed] == [silence["id"]]
    expired = as_operator.post(f"/api/v1/silences/{silence['id']}/expire")
    assert expired.status_code == 200 and expired.json()["state"] == "expired"
    assert expired.json()["expired_by"] == operator_user.username
    assert as_operator.post(f"/api/v1/silences/{silence['id']}/expire").status_code == 409
    assert {entry.action for entry in AuditEntry.objects.all()} == {"silence_create", "silence_expire"}


@pytest.mark.parametrize("change, field", [
    ({"matchers": []}, "matchers"),
    ({"matchers": [{"label": "9lives", "value": "x"}]}, "matchers"),
    ({"matchers": [{"label": "alertname", "op": "=~", "value": "(unclosed"}]}, "matchers"),
    ({"matchers": [{"label": "alertname", "op": "~", "value": "x"}]}, "matchers[0].op"),
    ({"matchers": [{"label": "alertname", "value": "database-unreachable"}]}, "matchers"),  # Alertmanager pages it
    ({"reason": "  "}, "reason"),
    ({"duration_minutes": None}, "ends_at"),
    ({"duration_minutes": None, "ends_at": "2020-01-01T00:00:00Z"}, "ends_at"),
])
def test_a_bad_silence_is_refused_naming_the_field_and_nothing_is_written(as_operator, change, field):
    alert_rules_seed()  # the rules a fresh install has (a transactional test before this one emptied them)
    body = {"matchers": [{"label": "alertname", "value": "x"}], "reason": "deploy", "duration_minutes": 30, **change}
    body = {name: value for name, value in body.items() if value is not None}
    response = as_operator.post("/api/v1/silences", body)
    assert response.status_code == 400 and response.json()["field"] == field, response.json()
    assert not Silence.objects.exists() and not AuditEntry.objects.exists()


def test_a_silence_that_had_not_started_expires_once(as_operator):
    starts = (timezone.now() + timedelta(hours=1)).isoformat()
    silence = as_operator.post("/api/v1/silences", {"matchers": [{"label": "alertname", "value": "x"}],
                                                    "reason": "tonight", "starts_at": starts,
                                                    "duration_minutes": 60}).json()
    assert silence["state"] == "pending"
    expired = as_operator.post(f"/api/v1/silences/{silence['id']}/expire")
    assert expired.status_code == 200 and expired.json()["state"] == "expired"
    assert as_operator.get("/api/v1/silences", {"state": "pending"}).json()["results"] == []
    assert as_operator.post(f"/api/v1/silences/{silence['id']}/expire").status_code == 409
    assert AuditEntry.objects.filter(action="silence_expire").count() == 1


def test_the_timeline_is_the_newest_events_as_on_the_alerts_page(as_support):
    alert = make_alert()
    start = timezone.now() - timedelta(days=1)
    AlertEvent.objects.bulk_create([AlertEvent(alert=alert, kind=AlertEvent.Kind.NOTIFIED, message=str(index),
                                               at=start + timedelta(seconds=index)) for index in range(305)])
    timeline = as_support.get(f"/api/v1/alerts/{alert.pk}").json()["timeline"]
    assert len(timeline) == 300 and timeline[0]["message"] == "5" and timeline[-1]["message"] == "304"
