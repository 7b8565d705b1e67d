"""Prometheus Alertmanager's webhook: alerts from Prometheus, checked whole and recorded in the portal's history
(deduplicated on Alertmanager's fingerprint and start time); Alertmanager, not the portal, notifies them."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from monitoring.alerts.timeline import fingerprint_of, resolve_one
from monitoring.alerts.transports.base import url_error
from monitoring.models import Alert, AlertEvent, AlertRule, Severity

logger = logging.getLogger(__name__)



def http_url(url: str) -> bool:
    """Whether ``url`` is an http(s) URL with a host (any host, internal names too: ``http://prometheus:9090``): the
    only links the portal stores or shows from what others send."""
    return url_error(url) is None


class PayloadError(ValueError):
    """A webhook body that is not Alertmanager's version 4 payload; the message names the field."""


class PayloadTooLarge(PayloadError):
    """A body with more alerts than one write transaction should hold (413)."""


class TooManyOpenAlerts(Exception):
    """Alertmanager reports more open alerts than the history keeps open at once (503: it retries)."""


# Alertmanager's exported configuration sends one alert per post (group_by all labels); a body this large is a
# misconfiguration or a flood, and one transaction over it would hold SQLite's write lock for seconds.
MAX_ALERTS_PER_BODY = 1000
# Open alerts from Alertmanager kept at once: beyond, new firings are refused until some resolve or expire.
MAX_OPEN_ALERTMANAGER_ALERTS = 5000


ZERO_TIME = "0001-01-01T00:00:00Z"
_AM_SEVERITIES = {value for value, _ in Severity.choices}


def _am_time(value, name: str) -> datetime | None:
    if value in (None, "", ZERO_TIME):
        return None
    if not isinstance(value, str):
        raise PayloadError(f"{name} must be an RFC 3339 time string")
    try:
        parsed = parse_datetime(value)
    except ValueError:  # well-formed but impossible: month 13, day 45
        parsed = None
    if parsed is None:
        raise PayloadError(f"{name} is not an RFC 3339 time: {value[:50]!r}")
    if parsed.year < 1000:
        return None
    return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed, timezone.utc)


def _string_map(value, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise PayloadError(f"{name} must be an object of strings")
    return value


def _am_parse(payload) -> list[dict]:
    if not isinstance(payload, dict):
        raise PayloadError("the body must be a JSON object")
    if str(payload.get("version")) != "4":
        raise PayloadError(f"version must be \"4\" (Alertmanager's webhook payload), got {payload.get('version')!r}")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise PayloadError("alerts must be a list")
    if len(alerts) > MAX_ALERTS_PER_BODY:
        raise PayloadTooLarge(f"alerts holds {len(alerts)} alerts; at most {MAX_ALERTS_PER_BODY} per body (group "
                              f"them in Alertmanager's route, as the exported configuration does)")
    parsed = []
    for index, item in enumerate(alerts):
        where = f"alerts[{index}]"
        if not isinstance(item, dict):
            raise PayloadError(f"{where} must be an object")
        status = item.get("status")
        if status not in ("firing", "resolved"):
            raise PayloadError(f"{where}.status must be 'firing' or 'resolved'")
        labels = _string_map(item.get("labels"), f"{where}.labels")
        if not labels.get("alertname"):
            raise PayloadError(f"{where}.labels.alertname is required")
        starts_at = _am_time(item.get("startsAt"), f"{where}.startsAt")
        if starts_at is None:
            raise PayloadError(f"{where}.startsAt is required")
        fingerprint = item.get("fingerprint") or fingerprint_of(labels)
        if not isinstance(fingerprint, str) or len(fingerprint) > 64:
            raise PayloadError(f"{where}.fingerprint must be a string of at most 64 characters")
        generator = item.get("generatorURL") or ""
        if not isinstance(generator, str):
            raise PayloadError(f"{where}.generatorURL must be a string")
        if generator and not http_url(generator):
            # Prometheus writes its own http(s) address here; anything else (a javascript: link) is dropped and the
            # alert kept: refusing the body would lose the other alerts in it, and Alertmanager would resend it.
            logger.warning("Alertmanager webhook: %s.generatorURL is not an http(s) URL; not stored", where)
            generator = ""
        parsed.append({"status": status, "labels": labels,
                       "annotations": _string_map(item.get("annotations"), f"{where}.annotations"),
                       "starts_at": starts_at, "ends_at": _am_time(item.get("endsAt"), f"{where}.endsAt"),
                       "fingerprint": fingerprint, "generator_url": generator[:1000]})
    return parsed


def _am_fingerprint(item: dict) -> str:
    """An Alertmanager alert's fingerprint in the history (kept apart from the portal's own)."""
    return f"am:{item['fingerprint']}"[:64]


def alertmanager_ingest(payload) -> dict:
    """Lands Alertmanager's alerts in the history. An alert is one row per (fingerprint, start): a repeat of the
    same firing updates it, its resolution resolves it, a new firing of the same labels is a new alert. The whole
    body is checked before anything is written, and written in one transaction."""
    alerts = _am_parse(payload)
    now = timezone.now()
    created = updated = resolved = 0
    # Only new occurrences count against the cap: Alertmanager's repeats of open alerts must keep them alive.
    firing = {(_am_fingerprint(item), item["starts_at"]) for item in alerts if item["status"] == "firing"}
    if firing:
        known = set(Alert.objects.filter(source=Alert.Source.ALERTMANAGER,
                                         fingerprint__in={fingerprint for fingerprint, _ in firing})
                    .values_list("fingerprint", "started_at"))
        firing -= known
    if firing and Alert.objects.open_from(Alert.Source.ALERTMANAGER).count() + len(firing) > \
            MAX_OPEN_ALERTMANAGER_ALERTS:
        raise TooManyOpenAlerts(f"the history already holds {MAX_OPEN_ALERTMANAGER_ALERTS} open alerts from "
                                f"Alertmanager; new firings wait until some resolve or expire")
    with transaction.atomic():
        for item in alerts:
            labels = item["labels"]
            severity = labels.get("severity", "warning")
            severity = severity if severity in _AM_SEVERITIES else Severity.WARNING
            fingerprint = _am_fingerprint(item)
            alert = Alert.objects.select_for_update().filter(
                source=Alert.Source.ALERTMANAGER, fingerprint=fingerprint, started_at=item["starts_at"]).first()
            summary = (item["annotations"].get("summary") or item["annotations"].get("description")
                       or labels["alertname"])[:500]
            if alert is None:
                previous = Alert.objects.select_for_update().filter(open_key=fingerprint).first()
                if previous is not None:  # an older firing that Alertmanager never resolved to us
                    resolve_one(previous, at=item["starts_at"], now=now,
                                 message="superseded by a new firing of the same alert")
                firing = item["status"] == "firing"
                rule = AlertRule.objects.filter(name=labels["rule"]).first() if labels.get("rule") else None
                alert = Alert.objects.create(
                    rule=rule, source=Alert.Source.ALERTMANAGER, name=labels["alertname"][:200],
                    fingerprint=fingerprint,
                    open_key=fingerprint if firing else None, severity=severity, resolved_notified=True,
                    component=labels.get("component", "")[:40], summary=summary, labels=labels,
                    annotations=item["annotations"], state=Alert.State.FIRING if firing else Alert.State.RESOLVED,
                    started_at=item["starts_at"], holding_since=item["starts_at"], fired_at=item["starts_at"],
                    resolved_at=None if firing else (item["ends_at"] or now), last_seen_at=now,
                    generator_url=item["generator_url"])
                AlertEvent.objects.create(alert=alert, kind=AlertEvent.Kind.FIRING, at=now,
                                          message=f"from Prometheus Alertmanager: {summary}")
                if not firing:
                    AlertEvent.objects.create(alert=alert, kind=AlertEvent.Kind.RESOLVED, at=now,
                                              message="resolved in Prometheus")
                    resolved += 1
                created += 1
                continue
            if item["status"] == "resolved" and alert.state != Alert.State.RESOLVED:
                alert.last_seen_at = now
                resolve_one(alert, at=item["ends_at"] or now, now=now, message="resolved in Prometheus")
                resolved += 1
            elif item["status"] == "firing" and alert.state != Alert.State.RESOLVED:
                changed = alert.annotations != item["annotations"] or alert.labels != labels
                alert.annotations, alert.labels, alert.summary, alert.last_seen_at = \
                    item["annotations"], labels, summary, now
                alert.save(update_fields=["annotations", "labels", "summary", "last_seen_at"])
                if changed:
                    AlertEvent.objects.create(alert=alert, kind=AlertEvent.Kind.UPDATED, at=now,
                                              message="labels or annotations changed")
                updated += 1
            elif item["status"] == "firing" and alert.events.filter(kind=AlertEvent.Kind.EXPIRED).exists() and \
                    not Alert.objects.filter(open_key=fingerprint).exists():
                # Closed as expired (Alertmanager had gone quiet for a day) and now reported firing again with the
                # same start: it never stopped. Open again, rather than resolved in the history while it fires.
                alert.state, alert.open_key, alert.resolved_at, alert.last_seen_at = \
                    Alert.State.FIRING, fingerprint, None, now
                alert.save(update_fields=["state", "open_key", "resolved_at", "last_seen_at"])
                AlertEvent.objects.create(alert=alert, kind=AlertEvent.Kind.RETURNED, at=now,
                                          message="Alertmanager reports it firing again after it had expired")
                updated += 1
            else:
                updated += 1  # a repeat of what we already have
    return {"received": len(alerts), "created": created, "updated": updated, "resolved": resolved}


# Alertmanager re-sends a firing alert at least every repeat interval (4 h by default) and sends its resolution; one
# not heard of for this long was lost with an Alertmanager that went away. It is closed as expired (Alerta's
# lifecycle), not left firing in the history for ever.
ALERTMANAGER_EXPIRY = timedelta(hours=24)


def alertmanager_alerts_expire(*, now: datetime | None = None) -> int:
    now = now or timezone.now()
    expired = 0
    with transaction.atomic():
        for alert in Alert.objects.open_from(Alert.Source.ALERTMANAGER).order_by().filter(
                last_seen_at__lt=now - ALERTMANAGER_EXPIRY).select_for_update():
            resolve_one(alert, at=alert.last_seen_at, now=now, kind=AlertEvent.Kind.EXPIRED,
                         message=f"Alertmanager has not reported it since {alert.last_seen_at:%Y-%m-%d %H:%M %Z}")
            expired += 1
    return expired


