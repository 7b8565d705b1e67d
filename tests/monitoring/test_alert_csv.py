"""The alert history's CSV export and the history's filters: a cell that looks like a formula is quoted, and the
component and source filters are served by their indexes."""

import csv
import io
from datetime import timedelta

import pytest
from django.contrib.admin.sites import site
from django.db import connection
from django.test import RequestFactory
from django.urls import reverse
from django.utils import timezone

from monitoring.alerts.actions import alert_acknowledge
from monitoring.alerts.timeline import fingerprint_of
from monitoring.models import Alert, AlertRule

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("seeded_alert_rules")]


def firing_alert(rule_name: str = "normal-backlog-high", **fields) -> Alert:
    """A firing alert of a seeded rule, as the evaluator writes it."""
    rule = AlertRule.objects.get(name=rule_name)
    started = timezone.now() - timedelta(minutes=10)
    labels = rule.all_labels()
    values = dict(rule=rule, name=rule.name, fingerprint=fingerprint_of(labels), severity=rule.severity,
                  component=rule.component, summary=rule.title, labels=labels, state=Alert.State.FIRING,
                  started_at=started, holding_since=started, fired_at=started, last_seen_at=started)
    return Alert.objects.create(**{**values, **fields})


def exported_rows(client, **params) -> list[dict]:
    response = client.get(reverse("admin:monitoring_alert_export"), params)
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))


def test_an_acknowledger_whose_name_looks_like_a_formula_is_quoted(client, django_user_model, support_user):
    """Django usernames may start with +, - or @: a spreadsheet opens such a cell as a formula."""
    plus = django_user_model.objects.create_user(username="+x", password="pw-plus", is_staff=True)
    alert = firing_alert()
    alert_acknowledge(alert=alert, user=plus, note="on it")
    client.force_login(support_user)
    [row] = exported_rows(client)
    assert row["acknowledged_by"] == "'+x"


# --- the history's filters use their indexes ------------------------------------------------------------------

def changelist_page_plan(support_user, **params) -> str:
    """The plan of the query for the first page of the alert history with these filters, as the admin runs it."""
    request = RequestFactory().get(reverse("admin:monitoring_alert_changelist"), params)
    request.user = support_user
    changelist = site._registry[Alert].get_changelist_instance(request)
    return changelist.queryset[:changelist.list_per_page].explain()


@pytest.mark.parametrize("params, index", [
    ({"component": "redis"}, "alert_component_started_idx"),
    ({"source__exact": "alertmanager"}, "alert_source_started_idx"),
])
def test_the_component_and_source_filters_search_their_index(support_user, params, index):
    """Without them a rare component or source walked the whole started_at index, newest first, for every page."""
    firing_alert()
    firing_alert("backlog-high", source=Alert.Source.ALERTMANAGER, component="redis")
    plan = changelist_page_plan(support_user, **params)
    assert index in plan, plan
    if connection.vendor == "sqlite":
        assert f"SEARCH monitoring_alert USING INDEX {index}" in plan, plan
        assert "SCAN monitoring_alert" not in plan, plan
