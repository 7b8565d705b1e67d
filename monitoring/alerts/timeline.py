"""An alert's timeline and identity, shared by the evaluator and the Alertmanager ingestion: the fingerprint that
finds a condition's alert again, the timeline rows, and resolving an alert."""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime

from monitoring.models import Alert, AlertEvent

logger = logging.getLogger(__name__)



def fingerprint_of(labels: dict) -> str:
    text = "\x1f".join(f"{key}\x1e{labels[key]}" for key in sorted(labels))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def event(alert: Alert, kind: str, message: str = "", *, at: datetime, user=None, **detail) -> AlertEvent:
    return AlertEvent(alert=alert, kind=kind, message=message[:500], at=at,
                      user=user if getattr(user, "pk", None) else None, detail=detail)


def alert_resolve(alert: Alert, *, at: datetime, now: datetime, events: list, message: str,
                  kind: str = AlertEvent.Kind.RESOLVED) -> None:
    alert.state, alert.resolved_at, alert.open_key = Alert.State.RESOLVED, at, None
    # Nobody was told it fired: there is no resolution to send either. Only alerts still owing one keep
    # resolved_notified False, so the planner's query stays small however long the history grows.
    if alert.notified_at is None or alert.source != Alert.Source.PORTAL:
        alert.resolved_notified = True
    events.append(event(alert, kind, message, at=now))


def resolve_one(alert: Alert, *, at: datetime, now: datetime, message: str,
                 kind: str = AlertEvent.Kind.RESOLVED) -> None:
    """alert_resolve for a single alert outside an evaluation pass: saved with its timeline row."""
    events: list[AlertEvent] = []
    alert_resolve(alert, at=at, now=now, events=events, message=message, kind=kind)
    # Only what resolving changes: an acknowledgement or shelving committed since the row was read stays.
    alert.save(update_fields=["state", "resolved_at", "open_key", "resolved_notified", "last_seen_at"])
    AlertEvent.objects.bulk_create(events)


