"""The Alertmanager webhook (good, duplicate, resolved, malformed, wrong token) and /api/rq/alerts."""

import copy
import json
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from monitoring.alerts.actions import alert_acknowledge
from monitoring.alerts.evaluate import alerts_evaluate
from monitoring.alerts.rules import Readings
from monitoring.models import Alert, AlertEvent, AlertRule
from tests.monitoring.test_alert_evaluation import database_unreachable, only, snapshot

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("seeded_alert_rules")]

TOKEN = "webhook-token-0123456789"
URL = "/api/alerts/alertmanager"

PAYLOAD = {
    "version": "4", "groupKey": '{}:{alertname="RQBacklogHigh"}', "truncatedAlerts": 0, "status": "firing",
    "receiver": "rq-ops-portal", "groupLabels": {"alertname": "RQBacklogHigh"},
    "commonLabels": {"alertname": "RQBacklogHigh", "severity": "warning"}, "commonAnnotations": {},
    "externalURL": "http://alertmanager:9093",
    "alerts": [{
        "status": "firing",
        "labels": {"alertname": "RQBacklogHigh", "severity": "warning", "component": "queues",
                   "rule": "backlog-high", "instance": "portal:8000"},
        "annotations": {"summary": "More than 100 jobs wait", "runbook_url": "https://runbooks.example/backlog"},
        "startsAt": "2026-11-30T22:14:05.123Z", "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=sum%28rq_queue_length%29", "fingerprint": "c0ffee1234567890",
    }],
}


@pytest.fixture
def post(client, settings):
    settings.ALERTS_WEBHOOK_TOKEN = TOKEN

    def send(body, token=TOKEN, raw=None):
        headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
        return client.post(URL, data=raw if raw is not None else json.dumps(body), content_type="application/json",
                           **headers)

    return send


def test_alertmanager_alert_lands_in_the_history_with_labels_and_times(post):
    response = post(PAYLOAD)
    assert response.status_code == 200 and response.json()["created"] == 1
    alert = Alert.objects.get()
    assert alert.source == "alertmanager" and alert.name == "RQBacklogHigh" and alert.state == "firing"
    assert alert.severity == "warning" and alert.component == "queues" and alert.rule.name == "backlog-high"
    assert alert.labels["instance"] == "portal:8000" and alert.summary == "More than 100 jobs wait"
    assert alert.started_at.isoformat().startswith("2026-11-30T22:14:05.123")
    assert alert.runbook_url == "https://runbooks.example/backlog"
    assert alert.generator_url.startswith("http://prometheus:9090/graph")


def test_a_repeated_payload_updates_the_same_alert_and_resolution_resolves_it(post):
    post(PAYLOAD)
    assert post(PAYLOAD).json() == {"status": "ok", "received": 1, "created": 0, "updated": 1, "resolved": 0}
    assert Alert.objects.count() == 1
    resolved = copy.deepcopy(PAYLOAD)
    resolved["status"] = resolved["alerts"][0]["status"] = "resolved"
    resolved["alerts"][0]["endsAt"] = "2026-11-30T22:44:05Z"
    assert post(resolved).json()["resolved"] == 1
    alert = Alert.objects.get()
    assert alert.state == "resolved" and alert.open_key is None
    assert alert.time_to_resolve == timedelta(minutes=29, seconds=59, milliseconds=877)
    assert post(resolved).json()["resolved"] == 0, "resolving twice changes nothing"
    again = copy.deepcopy(PAYLOAD)
    again["alerts"][0]["startsAt"] = "2026-12-01T03:00:00Z"
    post(again)
    assert Alert.objects.count() == 2, "a new firing of the same labels is a new alert"


@pytest.mark.parametrize("body, field", [
    ({**PAYLOAD, "version": "3"}, "version"),
    ({**PAYLOAD, "alerts": "nope"}, "alerts"),
    ({**PAYLOAD, "alerts": [{**PAYLOAD["alerts"][0], "status": "burning"}]}, "alerts[0].status"),
    ({**PAYLOAD, "alerts": [{**PAYLOAD["alerts"][0], "labels": {"severity": "warning"}}]}, "alertname"),
    ({**PAYLOAD, "alerts": [{**PAYLOAD["alerts"][0], "startsAt": "yesterday"}]}, "alerts[0].startsAt"),
    ({**PAYLOAD, "alerts": [{**PAYLOAD["alerts"][0], "labels": {"alertname": 5}}]}, "alerts[0].labels"),
    ([1, 2], "object"),
])
def test_a_malformed_body_is_refused_whole_with_a_reason(post, body, field):
    response = post(body)
    assert response.status_code == 400 and field in response.json()["error"]
    assert not Alert.objects.exists()


def test_a_bad_second_alert_leaves_the_first_unwritten(post):
    body = copy.deepcopy(PAYLOAD)
    body["alerts"].append({**PAYLOAD["alerts"][0], "fingerprint": "beef", "startsAt": None})
    response = post(body)
    assert response.status_code == 400 and "alerts[1].startsAt" in response.json()["error"]
    assert not Alert.objects.exists() and not AlertEvent.objects.exists()


def test_not_json_is_a_400(post):
    response = post(None, raw="{not json")
    assert response.status_code == 400 and "not JSON" in response.json()["error"]


def test_the_webhook_needs_the_token(post, client, settings):
    assert post(PAYLOAD, token="wrong-token-0123456789").status_code == 403
    response = post(PAYLOAD, token=None)
    assert response.status_code == 401 and response.json()["error"].startswith("authentication required")
    assert client.get(URL).status_code == 405
    settings.ALERTS_WEBHOOK_TOKEN = None
    closed = post(PAYLOAD)
    assert closed.status_code == 403 and "ALERTS_WEBHOOK_TOKEN" in closed.json()["error"]
    assert not Alert.objects.exists()


def test_current_alerts_keep_the_old_fields_and_add_ours(client, support_user, operator_user, redis):
    only("few-workers", "backlog-high")
    t0 = timezone.now()
    alerts_evaluate(now=t0, readings=Readings(now=t0, snapshot=snapshot(workers=1, lengths={"normal": 150})))
    alerts_evaluate(now=t0 + timedelta(minutes=6),
                    readings=Readings(now=t0, snapshot=snapshot(workers=1, lengths={"normal": 150})))
    alert_acknowledge(alert=Alert.objects.get(name="few-workers"), user=operator_user, note="looking")
    client.force_login(support_user)
    body = client.get(reverse("api-alerts")).json()
    assert body["alert_count"] == 2 and body["firing_count"] == 1
    by_rule = {alert["rule"]: alert for alert in body["alerts"]}
    few = by_rule["few-workers"]
    assert {key: few[key] for key in ("level", "metric", "value", "threshold", "state", "acknowledged_by")} == {
        "level": "warning", "metric": "few-workers", "value": 1, "threshold": 2, "state": "firing",
        "acknowledged_by": "otto-operator"}  # not the old endpoint's active_workers: that was "no workers at all"
    assert (few["signal"], few["signal_value"], few["signal_threshold"]) == ("workers_alive", 1.0, 2.0)
    assert few["message"].startswith("Fewer than 2 workers") and few["since"] and few["timestamp"]
    assert few["runbook_url"].endswith(f"/admin/monitoring/alertrule/{AlertRule.objects.get(name='few-workers').pk}"
                                       f"/change/")
    assert by_rule["backlog-high"]["state"] == "pending"


def test_current_alerts_have_the_same_access_as_the_other_apis(client, outsider_user, settings):
    settings.METRICS_TOKEN = "metrics-token-0123456789"
    assert client.get(reverse("api-alerts")).status_code == 401
    assert client.get(reverse("api-alerts"), HTTP_AUTHORIZATION="Bearer metrics-token-0123456789").status_code == 200
    client.force_login(outsider_user)
    assert client.get(reverse("api-alerts")).status_code == 403
    assert client.post(reverse("api-alerts")).status_code in (403, 405)


@pytest.mark.django_db(transaction=True)
def test_a_database_error_is_a_json_503_with_retry_after_not_an_html_500(post, client, settings):
    """Alertmanager retries a 5xx and a scraper reads JSON: on a database error both endpoints answer a JSON 503
    with Retry-After, and the driver's text (a file path, a host) stays in the log."""
    settings.METRICS_TOKEN = "metrics-token-0123456789"
    with database_unreachable():
        answers = {"webhook": post(PAYLOAD),
                   "alerts": client.get(reverse("api-alerts"), HTTP_AUTHORIZATION="Bearer metrics-token-0123456789")}
    for name, response in answers.items():
        assert response.status_code == 503, name
        assert response["Content-Type"] == "application/json" and int(response["Retry-After"]) > 0, name
        assert response.json() == {"error": "the database does not answer; try again shortly"}, name
    assert not Alert.objects.exists()


def test_an_alertmanager_alert_no_longer_reported_expires(post):
    from monitoring.alerts.ingest import ALERTMANAGER_EXPIRY, alertmanager_alerts_expire

    post(PAYLOAD)
    alert = Alert.objects.get()
    assert alertmanager_alerts_expire(now=alert.last_seen_at + ALERTMANAGER_EXPIRY - timedelta(minutes=1)) == 0
    assert alertmanager_alerts_expire(now=alert.last_seen_at + ALERTMANAGER_EXPIRY + timedelta(minutes=1)) == 1
    alert.refresh_from_db()
    assert alert.state == "resolved" and alert.resolved_at == alert.last_seen_at
    assert alert.events.last().kind == "expired"
    # Alertmanager was gone for a day and reports it again with the same start: it never stopped firing.
    assert post(PAYLOAD).json()["created"] == 0
    alert.refresh_from_db()
    assert alert.state == "firing" and alert.resolved_at is None and alert.open_key == alert.fingerprint
    assert list(alert.events.order_by("id").values_list("kind", flat=True))[-2:] == ["expired", "returned"]


def test_impossible_dates_and_deep_nesting_are_400_not_500(post):
    bad_date = copy.deepcopy(PAYLOAD)
    bad_date["alerts"][0]["startsAt"] = "2026-13-45T00:00:00Z"
    response = post(bad_date)
    assert response.status_code == 400 and "alerts[0].startsAt" in response.json()["error"]
    response = post(None, raw="[" * 100_000 + "]" * 100_000)
    assert response.status_code == 400 and "nested" in response.json()["error"]
    assert not Alert.objects.exists()


def test_a_generator_url_that_is_not_http_is_not_stored_and_never_a_link(post, client, support_user):
    """On Django before 5.2.17 the admin showed any URLField value as a link: a javascript: one from the webhook
    became a stored script link on every role's alert page."""
    body = json.loads(json.dumps(PAYLOAD))
    body["alerts"][0]["generatorURL"] = "javascript:alert(document.cookie)//"
    assert post(body).status_code == 200
    alert = Alert.objects.get()
    assert alert.generator_url == "" and alert.labels["instance"] == "portal:8000", "the alert is kept, the link not"
    Alert.objects.filter(pk=alert.pk).update(generator_url="javascript:alert(1)//")  # a row stored before the check
    client.force_login(support_user)
    page = client.get(reverse("admin:monitoring_alert_change", args=[alert.pk])).content.decode()
    assert 'href="javascript:' not in page and "javascript:alert(1)//" in page


def test_resolving_an_alert_read_before_an_acknowledgement_keeps_the_acknowledgement(post, operator_user):
    """The webhook and the expiry read the alert, then saved every column: an acknowledgement committed in between
    was overwritten while its timeline row stayed."""
    from monitoring.alerts.timeline import resolve_one

    post(PAYLOAD)
    read = Alert.objects.get()  # the webhook's (or the expiry's) copy
    alert_acknowledge(alert=Alert.objects.get(), user=operator_user, note="on it")
    resolve_one(read, at=timezone.now(), now=timezone.now(), message="resolved in Prometheus")
    alert = Alert.objects.get()
    assert alert.state == Alert.State.RESOLVED
    assert alert.acknowledged_by == operator_user and alert.acknowledgement_note == "on it"


def test_too_many_alerts_in_one_body_is_a_413_naming_the_field(post):
    """A 1 MiB body holds about 11,000 alerts: one write transaction of 25 s while every other writer waits."""
    body = json.loads(json.dumps(PAYLOAD))
    body["alerts"] = [dict(PAYLOAD["alerts"][0], fingerprint=f"f{index:05d}") for index in range(1001)]
    response = post(body)
    assert response.status_code == 413 and response.json()["field"] == "alerts"
    assert "at most 1000" in response.json()["error"] and not Alert.objects.exists()


def test_new_firings_beyond_the_open_alert_cap_wait_with_a_503(post, monkeypatch):
    import monitoring.alerts.ingest

    monkeypatch.setattr(monitoring.alerts.ingest, "MAX_OPEN_ALERTMANAGER_ALERTS", 1)
    assert post(PAYLOAD).status_code == 200
    assert post(PAYLOAD).status_code == 200, "a repeat of an open alert keeps it alive, whatever the cap"
    second = json.loads(json.dumps(PAYLOAD))
    second["alerts"][0]["fingerprint"] = "another"
    response = post(second)
    assert response.status_code == 503 and response["Retry-After"] and "open alerts" in response.json()["error"]
    assert Alert.objects.count() == 1


@pytest.fixture
def asgi_port():
    """The portal under uvicorn (the local runner and the WebSocket unit serve HTTP through portal.asgi too)."""
    import http.client
    import subprocess
    import sys

    from django.conf import settings

    from portal.embedded_redis import free_port
    from tests.conftest import subprocess_env
    from tests.processes import stop_process, wait_for

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "portal.asgi:application", "--host", "127.0.0.1",
                               "--port", str(port)], cwd=settings.BASE_DIR,
                              env=subprocess_env(ALERTS_WEBHOOK_TOKEN=TOKEN), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        def answers():
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/healthz")
                return True
            except OSError:
                return False

        wait_for(answers, 60, "the ASGI server to listen")
        yield port
    finally:
        stop_process(server)


def large_payload(size: int) -> bytes:
    body = json.loads(json.dumps(PAYLOAD))
    body["alerts"][0]["annotations"]["description"] = "x" * size  # still a valid payload
    return json.dumps(body).encode()


@pytest.mark.django_db(transaction=True)
def test_a_chunked_body_over_the_limit_is_refused_under_the_asgi_server(asgi_port):
    """Transfer-Encoding: chunked has no Content-Length to check: under uvicorn a 2 MiB body was taken whole and
    written."""
    import http.client

    data = large_payload(2 * 1024 * 1024)
    connection = http.client.HTTPConnection("127.0.0.1", asgi_port, timeout=60)
    try:
        connection.request("POST", URL, body=(data[index:index + 65536] for index in range(0, len(data), 65536)),
                           headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
                           encode_chunked=True)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before the whole body went out: the answer is waiting to be read
    response = connection.getresponse()
    answer = response.read()
    assert response.status == 413, answer[:300]
    assert json.loads(answer) == {"error": "the body is larger than 1048576 bytes"}
    assert not Alert.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_chunked_body_is_refused_once_past_the_limit_without_waiting_for_its_end(asgi_port):
    """Django's ASGI handler spools the whole body (memory, then disk) before any view runs: a client that kept
    sending had the server store all of it. The webhook's body is now counted as it arrives: 413 as soon as it
    passes the limit, while the client has not finished (here it never does)."""
    import socket

    data = large_payload(1024 * 1024 + 65536)
    with socket.create_connection(("127.0.0.1", asgi_port), timeout=15) as raw:
        raw.sendall(f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                    "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for index in range(0, len(data), 65536):
            chunk = data[index:index + 65536]
            raw.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        # No last chunk: the body never ends. The answer must come anyway.
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                piece = raw.recv(65536)
                if not piece:
                    break
                answer += piece
        except TimeoutError:
            pass
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300] or "no answer within 15 s: the body was being waited for"
    assert json.loads(body) == {"error": "the body is larger than 1048576 bytes"}
    assert not Alert.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_one_occurrence_is_one_row_even_when_two_peers_deliver_it_at_once(post):
    """Two Alertmanager peers delivered an already-resolved alert at the same moment: it has no open_key to collide
    on, and both rows were written. The database now refuses a second row for one occurrence (the webhook answers
    such a race 503, and Alertmanager's retry finds the row); a repeated delivery updates the first."""
    from django.db import IntegrityError, transaction

    resolved = json.loads(json.dumps(PAYLOAD))
    resolved["alerts"][0].update(status="resolved", endsAt="2026-11-30T22:20:00Z")
    assert post(resolved).status_code == 200
    first = Alert.objects.get()
    with pytest.raises(IntegrityError), transaction.atomic():
        Alert.objects.create(source=first.source, fingerprint=first.fingerprint, started_at=first.started_at,
                             name=first.name, severity=first.severity, summary=first.summary, state=first.state,
                             holding_since=first.started_at, last_seen_at=first.last_seen_at)
    assert post(resolved).status_code == 200 and Alert.objects.count() == 1
