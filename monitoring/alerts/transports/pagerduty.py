"""PagerDuty Events API v2: one event per alert, deduplicated by the alert's fingerprint and id (one incident per
occurrence of a condition).

A retried message sends all its events again, which is safe: PagerDuty folds a trigger into the open incident of
the same dedup_key, and a resolve of a resolved incident does nothing.
"""

from __future__ import annotations

import hashlib

from monitoring.alerts.transports.base import Delivery, Message, Transport, TransportError, one_line, url_error
from monitoring.alerts.transports.deadline import Deadline
from monitoring.alerts.transports.http import post_json

DEFAULT_URL = "https://events.pagerduty.com/v2/enqueue"
SOURCE = "rq-ops-portal"
TEST_DEDUP_KEY = "rq-ops-portal-test"
SEVERITIES = ("critical", "error", "warning", "info")  # the only ones PagerDuty accepts; ours are the same
MAX_SUMMARY_CHARS = 1024
MAX_DEDUP_KEY_CHARS = 255


class PagerDutyTransport(Transport):
    kind = "pagerduty"
    label = "PagerDuty"
    fields = ("routing_key", "url")

    @classmethod
    def field_errors(cls, config: dict) -> dict[str, str]:
        errors = {}
        key = config.get("routing_key")
        if not isinstance(key, str) or not key.strip():
            errors["routing_key"] = "required: the 32-character integration key of the service's Events API v2 " \
                                    "integration"
        elif any(character.isspace() for character in key):
            errors["routing_key"] = "must not contain spaces"
        if "url" in config and (problem := url_error(config["url"])):
            errors["url"] = problem
        return errors

    def deliver(self, message: Message, *, timeout: float) -> Delivery:
        events = pagerduty_events(message, routing_key=self.config["routing_key"])
        url = self.config.get("url") or DEFAULT_URL
        deadline = Deadline(timeout)  # the timeout bounds the whole send, not each event
        for number, event in enumerate(events, start=1):
            try:
                status, answer = post_json(url, event, service="PagerDuty", timeout=deadline.remaining())
            except TransportError as error:
                if len(events) == 1:
                    raise
                raise TransportError(
                    f"{error.message} (event {number} of {len(events)}: {event['event_action']} "
                    f"{event['dedup_key']})", permanent=error.permanent, http_status=error.http_status) from error
        plural = "s" if len(events) > 1 else ""
        accepted = f"{len(events)} event{plural} accepted"
        return Delivery(http_status=status, detail=one_line(f"{accepted}: {answer}" if answer else accepted))


def pagerduty_events(message: Message, *, routing_key: str) -> list[dict]:
    """The events a message sends, in order.

    An alert whose state is "resolved" resolves its incident, any other alert triggers it (again). A test message
    triggers and then resolves an incident of its own. A message without alerts is one event for the whole group,
    deduplicated by its group key."""
    if message.kind == "test":
        test = {"summary": one_line(message.subject, MAX_SUMMARY_CHARS) or "Test from the RQ Ops Portal",
                "source": SOURCE, "severity": "info", "custom_details": {"text": message.text}}
        return [_trigger(routing_key, TEST_DEDUP_KEY, test, message.portal_url, links=[]),
                _resolve(routing_key, TEST_DEDUP_KEY)]
    if not message.alerts:
        dedup_key = _group_dedup_key(message.group_key)
        if message.status == "resolved":
            return [_resolve(routing_key, dedup_key)]
        group = {"summary": one_line(message.subject, MAX_SUMMARY_CHARS) or "RQ Ops Portal alert",
                 "source": SOURCE, "severity": "warning", "custom_details": {"text": message.text}}
        return [_trigger(routing_key, dedup_key, group, message.portal_url, links=[])]

    events = []
    for alert in message.alerts:
        fingerprint = alert.get("fingerprint")
        if not fingerprint:
            # Without it the incident could never be resolved; refuse before anything is sent.
            raise TransportError(f"PagerDuty needs a fingerprint for each alert; {alert.get('name')!r} has none",
                                 permanent=True)
        # One incident per occurrence: the rule's fingerprint and the alert's id. Keyed by the fingerprint alone,
        # every later occurrence of the rule folded into an incident that nobody had closed.
        dedup_key = f"{fingerprint}-{alert['id']}" if alert.get("id") else fingerprint
        if alert.get("state") == "resolved":
            events.append(_resolve(routing_key, dedup_key))
            if dedup_key != fingerprint:
                # An incident a message from before per-occurrence keys opened (a resolve of an unknown or
                # resolved incident does nothing).
                events.append(_resolve(routing_key, fingerprint))
            continue
        labels, annotations = alert.get("labels") or {}, alert.get("annotations") or {}
        payload = {"summary": one_line(alert.get("summary") or alert.get("name") or message.subject, MAX_SUMMARY_CHARS),
                   "source": SOURCE, "severity": pagerduty_severity(alert.get("severity")),
                   "custom_details": {**labels, **annotations, "value": alert.get("value")}}
        if labels.get("component"):
            payload["component"] = labels["component"]  # PagerDuty refuses a null component; leave it out
        links = [{"href": alert.get("url") or message.portal_url, "text": "Alert in the RQ Ops Portal"}]
        if alert.get("runbook_url"):
            links.append({"href": alert["runbook_url"], "text": "Runbook"})
        events.append(_trigger(routing_key, dedup_key, payload, message.portal_url, links=links))
    return events


def pagerduty_severity(severity) -> str:
    severity = str(severity or "").lower()
    return severity if severity in SEVERITIES else "warning"


def _trigger(routing_key: str, dedup_key: str, payload: dict, portal_url: str, *, links: list[dict]) -> dict:
    event = {"routing_key": routing_key, "event_action": "trigger", "dedup_key": dedup_key, "payload": payload,
             "client": "RQ Ops Portal"}
    if portal_url:
        event["client_url"] = portal_url
    links = [link for link in links if link["href"]]
    if links:
        event["links"] = links
    return event


def _resolve(routing_key: str, dedup_key: str) -> dict:
    return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": dedup_key}


def _group_dedup_key(group_key: str) -> str:
    if group_key and len(group_key) <= MAX_DEDUP_KEY_CHARS:
        return group_key
    return "rq-ops-portal-group-" + hashlib.sha256(group_key.encode()).hexdigest()
