"""The notification transports against real local servers: HTTP (conftest's http_server) and a small SMTP server."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from django.core import mail

from monitoring.alerts.transports import TRANSPORTS, Message, TransportError, http, pagerduty, transport_for
from portal.embedded_redis import free_port
from tests.conftest import respond

ROUTING_KEY = "0123456789abcdef0123456789abcdef"
PORTAL = "http://portal.example.com"


def make_alert(**overrides) -> dict:
    return {"name": "redis_unreachable", "severity": "critical", "state": "firing", "summary": "Redis is unreachable",
            "labels": {"alertname": "redis_unreachable", "severity": "critical", "component": "redis"},
            "annotations": {"description": "PING failed three times"}, "started_at": "2025-03-01T10:00:00+00:00",
            "resolved_at": None, "runbook_url": "https://runbooks.example.com/redis", "url": f"{PORTAL}/alerts/7/",
            "fingerprint": "9f86d081884c7d65", "value": 1.0, **overrides}


def make_message(**overrides) -> Message:
    fields = {"kind": "firing", "status": "firing", "subject": "[FIRING:1] critical: Redis is unreachable",
              "text": "Redis is unreachable\nsince 10:00 UTC", "group_key": '{}:{alertname="redis_unreachable"}',
              "portal_url": f"{PORTAL}/alerts/", "alerts": [make_alert()]}
    return Message(**{**fields, **overrides})


def header(request: dict, name: str) -> str | None:
    return {key.lower(): value for key, value in request["headers"].items()}.get(name.lower())


def config_for(kind: str, url: str) -> dict:
    return {"routing_key": ROUTING_KEY, "url": url} if kind == "pagerduty" else {"url": url}


SERVICE_NAMES = {"slack": "Slack", "webhook": "webhook at 127.0.0.1", "pagerduty": "PagerDuty"}
HTTP_KINDS = list(SERVICE_NAMES)


@pytest.fixture
def local_server_quoted(monkeypatch):
    """The local server stands in for Slack's and PagerDuty's hosts, whose answers are quoted."""
    monkeypatch.setattr(http, "QUOTED_HOSTS", (*http.QUOTED_HOSTS, "127.0.0.1"))


# --- the registry ---------------------------------------------------------------------------------------------

def test_transport_for_builds_each_kind_with_its_config():
    assert set(TRANSPORTS) == {"email", "slack", "webhook", "pagerduty"}
    for kind in TRANSPORTS:
        transport = transport_for(kind, {"url": "https://example.com/"})
        assert transport.kind == kind and transport.config == {"url": "https://example.com/"}


def test_transport_for_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="'sms'"):
        transport_for("sms", {})


@pytest.mark.parametrize("kind, config, field, says", [
    ("slack", {}, "url", "required"),
    ("slack", {"url": "ftp://hooks.slack.com/services/T/B/X"}, "url", "http"),
    ("slack", {"url": "hooks.slack.com/services/T/B/X"}, "url", "http"),
    ("slack", {"url": "https://"}, "url", "no host"),
    ("slack", {"url": "https://hooks.slack.com/x", "channel": "#ops"}, "channel", "unknown setting"),
    ("webhook", {"url": ""}, "url", "required"),
    ("webhook", {"url": "javascript:alert(1)"}, "url", "http"),
    ("webhook", {"url": "https://example.com/", "headers": ["X-Team: ops"]}, "headers", "JSON object"),
    ("webhook", {"url": "https://example.com/", "headers": {"X Team": "ops"}}, "headers", "header name"),
    ("webhook", {"url": "https://example.com/", "headers": {"X-Team": "ops\r\nX-Evil: 1"}}, "headers", "one line"),
    ("webhook", {"url": "https://example.com/", "token": "two words"}, "token", "without spaces"),
    ("webhook", {"url": "https://example.com/", "token": "t0ken", "headers": {"Authorization": "Basic x"}},
     "headers", "not both"),
    ("email", {}, "to", "at least one"),
    ("email", {"to": []}, "to", "at least one"),
    ("email", {"to": "ops@example.com"}, "to", "list"),
    ("email", {"to": ["ops@example.com", "not-an-address", 7]}, "to", "'not-an-address', 7"),
    ("pagerduty", {}, "routing_key", "required"),
    ("pagerduty", {"routing_key": ""}, "routing_key", "required"),
    ("pagerduty", {"routing_key": "   "}, "routing_key", "required"),
    ("pagerduty", {"routing_key": "0123 4567"}, "routing_key", "spaces"),
    ("pagerduty", {"routing_key": ROUTING_KEY, "url": "events.pagerduty.com"}, "url", "http"),
])
def test_config_errors_name_the_field_and_the_problem(kind, config, field, says):
    errors = TRANSPORTS[kind].config_errors(config)
    assert field in errors and says in errors[field], errors


@pytest.mark.parametrize("kind, config", [
    ("slack", {"url": "https://hooks.slack.com/services/T000/B000/XXXX"}),
    ("webhook", {"url": "http://ops.internal:8080/hook"}),
    ("webhook", {"url": "https://example.com/", "token": "s3cret", "headers": {"X-Team": "ops"}}),
    ("email", {"to": ["ops@example.com", "oncall@example.com"]}),
    ("pagerduty", {"routing_key": ROUTING_KEY}),
    ("pagerduty", {"routing_key": ROUTING_KEY, "url": "https://events.eu.pagerduty.com/v2/enqueue"}),
])
def test_config_errors_accept_valid_configs(kind, config):
    assert TRANSPORTS[kind].config_errors(config) == {}


def test_config_errors_refuse_a_config_that_is_not_an_object():
    assert TRANSPORTS["slack"].config_errors(["https://hooks.slack.com/x"]) == {"config": "must be a JSON object"}


def test_send_refuses_an_invalid_config_permanently_without_sending(http_server):
    url = http_server.route("/hook", respond(200, b"ok"))
    transport = transport_for("webhook", {"url": url, "tokn": "s3cret"})  # misspelt: would go out unauthenticated
    with pytest.raises(TransportError) as caught:
        transport.send(make_message())
    assert caught.value.permanent and "tokn: unknown setting" in caught.value.message
    assert http_server.requests == []


# --- Slack ----------------------------------------------------------------------------------------------------

def test_slack_posts_fallback_text_and_a_section_per_alert(http_server):
    url = http_server.route("/services/T0/B0/secret", respond(200, b"ok", "text/html"))
    second = make_alert(name="workers_missing", severity="warning", summary="No workers on queue high",
                        labels={"queue": "high"}, runbook_url="", url=f"{PORTAL}/alerts/8/", fingerprint="b" * 16)
    delivery = transport_for("slack", {"url": url}).send(make_message(alerts=[make_alert(), second]))

    assert (delivery.http_status, delivery.detail) == (200, "ok")
    [request] = http_server.requests
    assert request["method"] == "POST" and header(request, "Content-Type") == "application/json"
    assert header(request, "User-Agent") == "rq-ops-portal"
    body = json.loads(request["body"])
    assert body["text"] == "[FIRING:1] critical: Redis is unreachable\nRedis is unreachable\nsince 10:00 UTC"
    head, first_section, second_section, context = body["blocks"]
    assert head == {"type": "header",
                    "text": {"type": "plain_text", "text": "[FIRING:1] critical: Redis is unreachable"}}
    first = first_section["text"]["text"]
    assert first_section["type"] == "section" and first_section["text"]["type"] == "mrkdwn"
    assert "*redis_unreachable*" in first and "critical" in first and "Redis is unreachable" in first
    assert "`component=redis`" in first and "`severity=critical`" in first
    assert f"<{PORTAL}/alerts/7/|Open in the portal>" in first
    assert "<https://runbooks.example.com/redis|Runbook>" in first
    second_text = second_section["text"]["text"]
    assert "*workers_missing*" in second_text and "`queue=high`" in second_text and "Runbook" not in second_text
    assert context["type"] == "context" and f"<{PORTAL}/alerts/|" in context["elements"][0]["text"]


def test_slack_escapes_markup_so_an_alert_cannot_ping_the_channel(http_server):
    url = http_server.route("/hook", respond(200, b"ok"))
    transport_for("slack", {"url": url}).send(make_message(alerts=[make_alert(summary="<!channel> disk & <b>")]))
    section = json.loads(http_server.requests[0]["body"])["blocks"][1]["text"]["text"]
    assert "&lt;!channel&gt; disk &amp; &lt;b&gt;" in section and "<!channel>" not in section


def test_slack_shows_twenty_alerts_then_says_how_many_more(http_server):
    url = http_server.route("/hook", respond(200, b"ok"))
    alerts = [make_alert(name=f"alert_{number}", fingerprint=f"{number:016x}") for number in range(25)]
    transport_for("slack", {"url": url}).send(make_message(alerts=alerts))
    blocks = json.loads(http_server.requests[0]["body"])["blocks"]
    texts = [block["text"]["text"] for block in blocks if block["type"] == "section"]
    assert len(blocks) <= 50
    assert sum("*alert_" in text for text in texts) == 20 and "*alert_19*" in texts[19]
    assert "and 5 more alerts" in texts[20]


def test_slack_cuts_a_long_subject_to_the_header_limit(http_server):
    url = http_server.route("/hook", respond(200, b"ok"))
    transport_for("slack", {"url": url}).send(make_message(subject="x" * 400))
    header_text = json.loads(http_server.requests[0]["body"])["blocks"][0]["text"]["text"]
    assert len(header_text) == 150 and header_text.endswith("…")


# --- webhook --------------------------------------------------------------------------------------------------

def test_webhook_posts_the_whole_message_with_bearer_token_and_extra_headers(http_server):
    url = http_server.route("/hook", respond(202, b'{"accepted": true}', "application/json"))
    config = {"url": url, "token": "s3cret-token", "headers": {"X-Team": "ops"}}
    delivery = transport_for("webhook", config).send(make_message())

    assert (delivery.http_status, delivery.detail) == (202, "ok")  # its answer is not kept
    [request] = http_server.requests
    assert header(request, "Authorization") == "Bearer s3cret-token"
    assert header(request, "X-Team") == "ops"
    assert header(request, "Content-Type") == "application/json" and header(request, "User-Agent") == "rq-ops-portal"
    assert json.loads(request["body"]) == {
        "version": "1", "kind": "firing", "status": "firing", "group_key": '{}:{alertname="redis_unreachable"}',
        "subject": "[FIRING:1] critical: Redis is unreachable", "text": "Redis is unreachable\nsince 10:00 UTC",
        "portal_url": f"{PORTAL}/alerts/", "alerts": [make_alert()]}


def test_webhook_without_token_sends_no_authorization(http_server):
    url = http_server.route("/hook", respond(204))
    delivery = transport_for("webhook", {"url": url}).send(make_message())
    assert (delivery.http_status, delivery.detail) == (204, "ok")
    assert header(http_server.requests[0], "Authorization") is None


def test_webhook_sends_a_nan_value_as_null_so_the_body_stays_json(http_server):
    url = http_server.route("/hook", respond(200))
    transport_for("webhook", {"url": url}).send(make_message(alerts=[make_alert(value=float("nan"))]))
    body = http_server.requests[0]["body"].decode()
    assert "NaN" not in body and json.loads(body)["alerts"][0]["value"] is None


def test_webhook_redirect_is_permanent_and_not_followed(http_server):
    target = http_server.route("/new", respond(200))
    url = http_server.route("/old", respond(302, headers={"Location": target}))
    with pytest.raises(TransportError) as caught:
        transport_for("webhook", {"url": url}).send(make_message())
    assert caught.value.permanent and caught.value.http_status == 302 and "not followed" in caught.value.message
    assert [request["path"] for request in http_server.requests] == ["/old"]


# --- PagerDuty ------------------------------------------------------------------------------------------------

PAGERDUTY_OK = respond(202, b'{"status":"success","message":"Event processed","dedup_key":"x"}', "application/json")


def test_pagerduty_triggers_each_firing_alert_deduplicated_by_its_fingerprint(http_server):
    url = http_server.route("/v2/enqueue", PAGERDUTY_OK)
    other = make_alert(name="queue_deep", severity="error", summary="Queue high is deep", fingerprint="c" * 16,
                       labels={"queue": "high"}, annotations={}, runbook_url="", value=512.0, url=f"{PORTAL}/alerts/8/")
    delivery = transport_for("pagerduty", {"routing_key": ROUTING_KEY, "url": url}).send(
        make_message(alerts=[make_alert(), other]))

    assert delivery.http_status == 202 and delivery.detail.startswith("2 events accepted")
    first, second = (json.loads(request["body"]) for request in http_server.requests)
    assert first == {
        "routing_key": ROUTING_KEY, "event_action": "trigger", "dedup_key": "9f86d081884c7d65",
        "payload": {"summary": "Redis is unreachable", "source": "rq-ops-portal", "severity": "critical",
                    "component": "redis",
                    "custom_details": {"alertname": "redis_unreachable", "severity": "critical", "component": "redis",
                                       "description": "PING failed three times", "value": 1.0}},
        "links": [{"href": f"{PORTAL}/alerts/7/", "text": "Alert in the RQ Ops Portal"},
                  {"href": "https://runbooks.example.com/redis", "text": "Runbook"}],
        "client": "RQ Ops Portal", "client_url": f"{PORTAL}/alerts/"}
    assert second["dedup_key"] == "c" * 16 and second["payload"]["severity"] == "error"
    assert "component" not in second["payload"]  # PagerDuty refuses a null component
    assert second["links"] == [{"href": f"{PORTAL}/alerts/8/", "text": "Alert in the RQ Ops Portal"}]
    assert second["payload"]["custom_details"] == {"queue": "high", "value": 512.0}


@pytest.mark.parametrize("ours, theirs", [("critical", "critical"), ("error", "error"), ("warning", "warning"),
                                          ("info", "info"), ("CRITICAL", "critical"), ("page", "warning"),
                                          ("", "warning"), (None, "warning")])
def test_pagerduty_maps_severities_and_sends_unknown_ones_as_warning(http_server, ours, theirs):
    url = http_server.route("/v2/enqueue", PAGERDUTY_OK)
    transport_for("pagerduty", {"routing_key": ROUTING_KEY, "url": url}).send(
        make_message(alerts=[make_alert(severity=ours)]))
    assert json.loads(http_server.requests[0]["body"])["payload"]["severity"] == theirs


def test_pagerduty_resolves_a_resolved_alert_with_only_key_action_and_dedup_key(http_server):
    url = http_server.route("/v2/enqueue", PAGERDUTY_OK)
    resolved = make_alert(state="resolved", resolved_at="2025-03-01T10:05:00+00:00")
    still_firing = make_alert(fingerprint="d" * 16)
    transport_for("pagerduty", {"routing_key": ROUTING_KEY, "url": url}).send(
        make_message(kind="resolved", status="resolved", alerts=[resolved, still_firing]))
    first, second = (json.loads(request["body"]) for request in http_server.requests)
    assert first == {"routing_key": ROUTING_KEY, "event_action": "resolve", "dedup_key": "9f86d081884c7d65"}
    assert second["event_action"] == "trigger" and second["dedup_key"] == "d" * 16


def test_pagerduty_cuts_the_summary_to_1024_characters(http_server):
    url = http_server.route("/v2/enqueue", PAGERDUTY_OK)
    transport_for("pagerduty", {"routing_key": ROUTING_KEY, "url": url}).send(
        make_message(alerts=[make_alert(summary="disk full " * 300)]))
    assert len(json.loads(http_server.requests[0]["body"])["payload"]["summary"]) == 1024


def test_pagerduty_test_message_triggers_then_resolves_the_test_incident(http_server):
    url = http_server.route("/v2/enqueue", PAGERDUTY_OK)
    delivery = transport_for("pagerduty", {"routing_key": ROUTING_KEY, "url": url}).send(
        make_message(kind="test", subject="Test notification from the RQ Ops Portal", alerts=[make_alert()]))
    trigger, resolve = (json.loads(request["body"]) for request in http_server.requests)
    assert trigger["event_action"] == "trigger" and trigger["dedup_key"] == "rq-ops-portal-test"
    assert trigger["payload"]["summary"] == "Test notification from the RQ Ops Portal"
    assert trigger["payload"]["source"] == "rq-ops-portal" and trigger["payload"]["severity"] == "info"
    assert resolve == {"routing_key": ROUTING_KEY, "event_action": "resolve", "dedup_key": "rq-ops-portal-test"}
    assert delivery.http_status == 202


def test_pagerduty_message_without_alerts_is_one_event_for_the_group(http_server):
    url = http_server.route("/v2/enqueue", PAGERDUTY_OK)
    transport = transport_for("pagerduty", {"routing_key": ROUTING_KEY, "url": url})
    transport.send(make_message(alerts=[]))
    transport.send(make_message(status="resolved", kind="resolved", alerts=[]))
    trigger, resolve = (json.loads(request["body"]) for request in http_server.requests)
    assert trigger["event_action"] == "trigger" and trigger["dedup_key"] == '{}:{alertname="redis_unreachable"}'
    assert resolve == {"routing_key": ROUTING_KEY, "event_action": "resolve",
                       "dedup_key": '{}:{alertname="redis_unreachable"}'}


def test_pagerduty_refuses_an_alert_without_fingerprint_before_sending_anything(http_server):
    url = http_server.route("/v2/enqueue", PAGERDUTY_OK)
    with pytest.raises(TransportError) as caught:
        transport_for("pagerduty", {"routing_key": ROUTING_KEY, "url": url}).send(
            make_message(alerts=[make_alert(), make_alert(name="nameless", fingerprint="")]))
    assert caught.value.permanent and "'nameless' has none" in caught.value.message
    assert http_server.requests == []


@pytest.mark.usefixtures("local_server_quoted")
def test_pagerduty_failure_on_a_later_event_names_that_event(http_server):
    answers = iter([PAGERDUTY_OK, respond(503, b"Service Unavailable")])
    url = http_server.route("/v2/enqueue", lambda request, body: next(answers)(request, body))
    with pytest.raises(TransportError) as caught:
        transport_for("pagerduty", {"routing_key": ROUTING_KEY, "url": url}).send(
            make_message(alerts=[make_alert(), make_alert(fingerprint="e" * 16)]))
    assert not caught.value.permanent and caught.value.http_status == 503
    assert caught.value.message == f"PagerDuty answered 503: Service Unavailable (event 2 of 2: trigger {'e' * 16})"


def test_pagerduty_timeout_bounds_the_whole_send_not_each_event(http_server):
    url = http_server.route("/v2/enqueue", respond(202, b'{"status":"success"}', delay=0.5))
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        transport_for("pagerduty", {"routing_key": ROUTING_KEY, "url": url}).send(
            make_message(alerts=[make_alert(), make_alert(fingerprint="e" * 16)]), timeout=0.8)
    assert time.monotonic() - started < 1.0  # two events of 0.5 s each do not fit in 0.8 s
    assert not caught.value.permanent and "did not answer" in caught.value.message
    assert "(event 2 of 2: trigger eeeeeeeeeeeeeeee)" in caught.value.message


def test_pagerduty_goes_to_the_events_api_unless_told_otherwise(http_server, monkeypatch):
    assert pagerduty.DEFAULT_URL == "https://events.pagerduty.com/v2/enqueue"
    monkeypatch.setattr(pagerduty, "DEFAULT_URL", http_server.route("/v2/enqueue", PAGERDUTY_OK))  # stays offline
    transport_for("pagerduty", {"routing_key": ROUTING_KEY}).send(make_message())
    assert [request["path"] for request in http_server.requests] == ["/v2/enqueue"]


# --- HTTP status and network failures, for every HTTP transport -----------------------------------------------

@pytest.mark.parametrize("kind, status, answer", [
    ("slack", 200, b"ok"), ("webhook", 200, b""), ("webhook", 201, b"created"), ("webhook", 204, b""),
    ("pagerduty", 202, b'{"status":"success"}'),
])
@pytest.mark.usefixtures("local_server_quoted")
def test_2xx_answers_are_deliveries(http_server, kind, status, answer):
    url = http_server.route("/hook", respond(status, answer))
    delivery = transport_for(kind, config_for(kind, url)).send(make_message(alerts=[make_alert()]))
    # An arbitrary webhook's answer is not kept (Support reads the details); Slack's and PagerDuty's are.
    quoted = "ok" if kind == "webhook" else (answer.decode() or "ok")
    assert delivery.http_status == status and quoted in delivery.detail


@pytest.mark.parametrize("kind, status, answer, permanent", [
    ("slack", 400, b"invalid_payload", True),
    ("slack", 403, b"action_prohibited", True),
    ("slack", 404, b"channel_not_found", True),
    ("slack", 410, b"channel_is_archived", True),
    ("slack", 429, b"rate_limited", False),
    ("slack", 500, b"internal error", False),
    ("slack", 503, b"service unavailable", False),
    ("webhook", 400, b"bad request", True),
    ("webhook", 401, b"unauthorized", True),
    ("webhook", 404, b"not here", True),
    ("webhook", 408, b"request timeout", False),
    ("webhook", 429, b"slow down", False),
    ("webhook", 500, b"oops", False),
    ("webhook", 503, b"down for maintenance", False),
    ("pagerduty", 400, b'{"status":"invalid event","errors":["\'payload.summary\' is missing"]}', True),
    ("pagerduty", 403, b"forbidden", True),
    ("pagerduty", 404, b"not found", True),
    ("pagerduty", 429, b"throttled", False),
    ("pagerduty", 500, b"internal", False),
    ("pagerduty", 503, b"unavailable", False),
])
@pytest.mark.usefixtures("local_server_quoted")
def test_error_answers_are_permanent_or_transient_by_status(http_server, kind, status, answer, permanent):
    url = http_server.route("/hook", respond(status, answer, "text/plain"))
    with pytest.raises(TransportError) as caught:
        transport_for(kind, config_for(kind, url)).send(make_message(alerts=[make_alert()]))
    assert caught.value.permanent is permanent and caught.value.http_status == status
    quoted = "" if kind == "webhook" else f": {answer.decode()}"  # an arbitrary webhook's answer is never quoted
    assert caught.value.message == f"{SERVICE_NAMES[kind]} answered {status}{quoted}"


@pytest.mark.usefixtures("local_server_quoted")
def test_error_message_keeps_200_characters_of_the_answer_and_not_the_secret_url(http_server):
    url = http_server.route("/services/T0/B0/very-secret", respond(404, b"channel_not_found " * 50))
    with pytest.raises(TransportError) as caught:
        transport_for("slack", {"url": url}).send(make_message())
    assert caught.value.message.startswith("Slack answered 404: channel_not_found channel_not_found")
    assert len(caught.value.message) <= len("Slack answered 404: ") + 200
    assert "very-secret" not in caught.value.message


@pytest.mark.usefixtures("local_server_quoted")
def test_rate_limit_error_tells_when_to_come_back(http_server):
    url = http_server.route("/hook", respond(429, b"rate_limited", headers={"Retry-After": "30"}))
    with pytest.raises(TransportError) as caught:
        transport_for("slack", {"url": url}).send(make_message())
    assert caught.value.message == "Slack answered 429 (Retry-After: 30): rate_limited"


@pytest.mark.parametrize("kind", HTTP_KINDS)
def test_closed_port_is_transient(kind):
    url = f"http://127.0.0.1:{free_port()}/hook"
    with pytest.raises(TransportError) as caught:
        transport_for(kind, config_for(kind, url)).send(make_message(), timeout=2)
    assert not caught.value.permanent and caught.value.http_status is None
    assert caught.value.message.startswith(f"cannot reach {SERVICE_NAMES[kind]}")


@pytest.mark.parametrize("kind", HTTP_KINDS)
def test_server_answering_after_the_timeout_is_transient(http_server, kind):
    url = http_server.route("/hook", respond(200, b"ok", delay=3))
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        transport_for(kind, config_for(kind, url)).send(make_message(), timeout=0.3)
    assert time.monotonic() - started < 2
    assert not caught.value.permanent
    assert caught.value.message == f"{SERVICE_NAMES[kind]} did not answer within 0.3 s"


@pytest.mark.parametrize("kind", HTTP_KINDS)
def test_server_dropping_the_connection_is_transient(http_server, kind):
    def hang_up(request, _body):
        request.close_connection = True  # no answer at all: the client sees the connection close

    url = http_server.route("/hook", hang_up)
    with pytest.raises(TransportError) as caught:
        transport_for(kind, config_for(kind, url)).send(make_message(), timeout=2)
    assert not caught.value.permanent and SERVICE_NAMES[kind] in caught.value.message


def dripping(answer: bytes, *, every: float):
    """A route handler that sends ``answer`` one byte every ``every`` seconds, until the client hangs up."""

    def handler(request, _body):
        try:
            for byte in answer:
                request.wfile.write(bytes([byte]))
                time.sleep(every)
        except OSError:
            pass  # cut off by the client

    return handler


# 119 bytes: about 6 s at a byte every 0.05 s.
SLOW_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nX-Padding: " + b"." * 40
               + b"\r\n\r\nok")


@pytest.mark.parametrize("kind", HTTP_KINDS)
def test_a_receiver_trickling_its_answer_is_cut_off_at_the_deadline(http_server, kind):
    """urllib's timeout bounds each network wait: a byte every 0.05 s never trips a 0.5 s one, and the whole
    answer takes 6 s. The send must end by its deadline all the same, or it outlasts its sending lease and is
    sent again."""
    url = http_server.route("/hook", dripping(SLOW_ANSWER, every=0.05))
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        transport_for(kind, config_for(kind, url)).send(make_message(), timeout=0.5)
    assert time.monotonic() - started < 3  # the whole answer takes about 6 s; 3 s leaves room on a loaded machine
    assert not caught.value.permanent
    assert caught.value.message == f"{SERVICE_NAMES[kind]} did not answer within 0.5 s"


# --- email ----------------------------------------------------------------------------------------------------

@pytest.fixture
def locmem_email(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.DEFAULT_FROM_EMAIL = "alerts@portal.example.com"


def test_email_sends_subject_text_and_history_link_to_every_recipient(locmem_email):
    delivery = transport_for("email", {"to": ["ops@example.com", "oncall@example.com"]}).send(make_message())
    assert (delivery.http_status, delivery.detail) == (None, "sent to 2 recipients")
    [sent] = mail.outbox
    assert sent.to == ["ops@example.com", "oncall@example.com"] and sent.from_email == "alerts@portal.example.com"
    assert sent.subject == "[FIRING:1] critical: Redis is unreachable"
    assert sent.body.startswith("Redis is unreachable\nsince 10:00 UTC") and f"{PORTAL}/alerts/" in sent.body
    assert sent.extra_headers["Auto-Submitted"] == "auto-generated"


def test_email_puts_a_multi_line_subject_on_one_line(locmem_email):
    transport_for("email", {"to": ["ops@example.com"]}).send(make_message(subject="Redis\nis down"))
    assert mail.outbox[0].subject == "Redis is down"


class SMTPStandIn:
    """A real SMTP server on 127.0.0.1 that speaks just enough of the protocol for Django's SMTP backend.

    ``replies`` overrides the answer to a command ("MAIL", "RCPT", ...); the answer "HANG UP" closes the connection
    instead; ``greeting=None`` accepts connections and never says anything; ``drip`` sends the greeting one byte
    every ``drip`` seconds."""

    def __init__(self, replies: dict[str, str] | None = None, greeting: str | None = "220 127.0.0.1 ESMTP stand-in",
                 drip: float = 0):
        self.drip = drip
        self.replies = {"EHLO": "250 127.0.0.1", "HELO": "250 127.0.0.1", "MAIL": "250 OK", "RCPT": "250 OK",
                        "DATA": "354 end with <CRLF>.<CRLF>", "RSET": "250 OK", "NOOP": "250 OK", "QUIT": "221 bye",
                        **(replies or {})}
        self.greeting = greeting
        self.commands: list[str] = []
        self.messages: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)
            threading.Thread(target=self._converse, args=(connection,), daemon=True).start()

    def _converse(self, connection: socket.socket):
        with connection, connection.makefile("rb") as lines:
            if self.greeting is None:
                lines.read()  # until the client gives up
                return
            try:
                self._greet(connection)
            except OSError:
                return  # the client hung up
            for line in lines:
                command = line.decode().strip()
                self.commands.append(command)
                verb = command.split(" ")[0].split(":")[0].upper()
                reply = self.replies.get(verb, "502 not implemented")
                if reply == "HANG UP":
                    return
                connection.sendall(reply.encode() + b"\r\n")
                if verb == "DATA" and reply.startswith("354"):
                    data = b""
                    for data_line in lines:
                        if data_line == b".\r\n":
                            break
                        data += data_line
                    self.messages.append(data)
                    connection.sendall(b"250 queued\r\n")
                if verb == "QUIT":
                    return

    def _greet(self, connection: socket.socket):
        greeting = self.greeting.encode() + b"\r\n"
        if not self.drip:
            connection.sendall(greeting)
            return
        for byte in greeting:
            connection.sendall(bytes([byte]))
            time.sleep(self.drip)

    def stop(self):
        self.listener.close()
        for connection in self.connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def smtp_server(settings):
    servers = []

    def start(**kwargs) -> SMTPStandIn:
        server = SMTPStandIn(**kwargs)
        servers.append(server)
        settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
        settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", server.port
        settings.EMAIL_HOST_USER = settings.EMAIL_HOST_PASSWORD = ""
        settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = False
        settings.DEFAULT_FROM_EMAIL = "alerts@portal.example.com"
        return server

    yield start
    for server in servers:
        server.stop()


def test_email_over_smtp_delivers_the_message(smtp_server):
    server = smtp_server()
    delivery = transport_for("email", {"to": ["ops@example.com"]}).send(make_message())
    assert delivery.detail == "sent to 1 recipient"
    commands = [command.upper() for command in server.commands]
    assert "MAIL FROM:<ALERTS@PORTAL.EXAMPLE.COM>" in commands and "RCPT TO:<OPS@EXAMPLE.COM>" in commands
    [data] = server.messages
    assert b"Subject: [FIRING:1] critical: Redis is unreachable" in data and b"Redis is unreachable" in data


def test_email_recipient_refused_with_550_is_permanent(smtp_server):
    server = smtp_server(replies={"RCPT": "550 5.1.1 no such user"})
    with pytest.raises(TransportError) as caught:
        transport_for("email", {"to": ["nobody@example.com"]}).send(make_message())
    assert caught.value.permanent and caught.value.http_status is None
    # Support reads this: no address (the server's reply repeats it too), the recipient's place and the code.
    assert caught.value.message == (f"mail server 127.0.0.1:{server.port} refused the recipients: recipient 1 of 1 "
                                    "(550) (see the channel's addresses)")


def test_email_recipient_greylisted_with_450_is_transient(smtp_server):
    smtp_server(replies={"RCPT": "450 4.7.1 greylisted, try again later"})
    with pytest.raises(TransportError) as caught:
        transport_for("email", {"to": ["ops@example.com"]}).send(make_message())
    assert not caught.value.permanent and "recipient 1 of 1 (450)" in caught.value.message


def test_email_sender_refused_is_permanent(smtp_server):
    smtp_server(replies={"MAIL": "553 5.7.1 sender not allowed"})
    with pytest.raises(TransportError) as caught:
        transport_for("email", {"to": ["ops@example.com"]}).send(make_message())
    assert caught.value.permanent and caught.value.settings_fault, "the portal's settings, not the channel"
    assert "refused the sender alerts@portal.example.com: 553 5.7.1 sender not allowed" in caught.value.message


def test_email_message_refused_with_554_is_permanent(smtp_server):
    smtp_server(replies={"DATA": "554 5.7.1 message rejected as spam"})
    with pytest.raises(TransportError) as caught:
        transport_for("email", {"to": ["ops@example.com"]}).send(make_message())
    assert caught.value.permanent and "refused the message: 554 5.7.1 message rejected as spam" in caught.value.message


def test_email_server_hanging_up_mid_conversation_is_transient(smtp_server):
    smtp_server(replies={"MAIL": "HANG UP"})
    with pytest.raises(TransportError) as caught:
        transport_for("email", {"to": ["ops@example.com"]}).send(make_message())
    assert not caught.value.permanent and "SMTPServerDisconnected" in caught.value.message


def test_email_server_that_never_greets_is_transient_within_the_timeout(smtp_server):
    smtp_server(greeting=None)
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        transport_for("email", {"to": ["ops@example.com"]}).send(make_message(), timeout=0.5)
    assert time.monotonic() - started < 3
    assert not caught.value.permanent


def test_email_server_trickling_its_greeting_is_cut_off_at_the_deadline(smtp_server):
    """smtplib's timeout bounds each network wait too: a greeting of a byte every 0.05 s never trips it."""
    server = smtp_server(greeting="220 " + "slow " * 20, drip=0.05)
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        transport_for("email", {"to": ["ops@example.com"]}).send(make_message(), timeout=0.5)
    assert time.monotonic() - started < 3  # the whole greeting takes about 5 s
    assert not caught.value.permanent
    assert caught.value.message == f"mail server 127.0.0.1:{server.port} did not finish within 0.5 s"
    assert server.messages == []


def test_email_closed_port_is_transient(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_port()
    with pytest.raises(TransportError) as caught:
        transport_for("email", {"to": ["ops@example.com"]}).send(make_message(), timeout=2)
    assert not caught.value.permanent and caught.value.message.startswith("cannot send mail through 127.0.0.1:")


@pytest.mark.parametrize("kind", ["webhook", "slack", "pagerduty"])
def test_a_channel_to_an_internal_address_is_refused_unless_allowed(http_server, settings, kind):
    """An Admin's channel (or a stolen Admin session's) must not make the portal probe the internal network: a
    loopback, private or link-local receiver is refused before anything is sent."""
    url = http_server.route("/internal", respond(200, b"ok"))
    config = {"url": url, "routing_key": "R0UT1NGKEY"} if kind == "pagerduty" else {"url": url}
    settings.NOTIFY_ALLOW_PRIVATE = False
    with pytest.raises(TransportError) as caught:
        transport_for(kind, config).send(make_message())
    assert caught.value.permanent and "non-public address 127.0.0.1" in caught.value.message
    assert "NOTIFY_ALLOW_PRIVATE" in caught.value.message and http_server.requests == []
    settings.NOTIFY_ALLOW_PRIVATE = True
    transport_for(kind, config).send(make_message())
    assert len(http_server.requests) == 1


def test_a_webhooks_answer_is_never_quoted(http_server):
    """Errors and details are shown to Support: an internal service's answer must not land there."""
    secret = b"internal-only: db_password=hunter2; build 4.2.1"
    failing = http_server.route("/fails", respond(500, secret))
    with pytest.raises(TransportError) as caught:
        transport_for("webhook", {"url": failing}).send(make_message())
    assert caught.value.message == "webhook at 127.0.0.1 answered 500" and not caught.value.permanent
    fine = http_server.route("/fine", respond(200, secret))
    assert "hunter2" not in transport_for("webhook", {"url": fine}).send(make_message()).detail


@pytest.mark.parametrize("kind", ["slack", "pagerduty"])
def test_a_slack_or_pagerduty_channel_aimed_elsewhere_gives_only_the_status(http_server, kind):
    """A Slack or PagerDuty channel may point at any URL (an internal service, with NOTIFY_ALLOW_PRIVATE): only
    Slack's and PagerDuty's own answers are quoted in the errors and details that Support reads."""
    secret = b"internal-only: db_password=hunter2; build 4.2.1"
    failing = http_server.route("/fails", respond(500, secret))
    with pytest.raises(TransportError) as caught:
        transport_for(kind, config_for(kind, failing)).send(make_message())
    assert caught.value.message == f"{SERVICE_NAMES[kind]} answered 500" and not caught.value.permanent
    fine = http_server.route("/fine", respond(200, secret))
    delivery = transport_for(kind, config_for(kind, fine)).send(make_message())
    assert delivery.http_status == 200 and "hunter2" not in delivery.detail


@pytest.mark.parametrize("url, quoted", [
    ("https://hooks.slack.com/services/T0/B0/X", True),
    ("https://HOOKS.SLACK.COM./services/T0/B0/X", True),
    ("https://events.pagerduty.com/v2/enqueue", True),
    ("https://events.eu.pagerduty.com/v2/enqueue", True),
    ("https://hooks.slack.com.example.net/services/T0/B0/X", False),
    ("https://notpagerduty.com/v2/enqueue", False),
    ("https://events.pagerduty.com.example.net/v2/enqueue", False),
    ("http://127.0.0.1:8080/services/T0/B0/X", False),
    ("http://slack.internal/hook", False),
])
def test_only_slacks_and_pagerdutys_hosts_have_their_answers_quoted(url, quoted):
    assert http.answer_may_be_quoted(url) is quoted
