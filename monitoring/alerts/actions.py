"""The operators' actions on alerts: acknowledge, shelve, silence; each audited."""

from __future__ import annotations

import logging
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from monitoring.alerts.notify import PAGED_BY_ALERTMANAGER, notified_by_alertmanager
from monitoring.matchers import MatcherError, matchers_validate, pattern_compile
from monitoring.models import Alert, AlertEvent, AlertRule, Silence

logger = logging.getLogger(__name__)



class AlertError(Exception):
    """An alert action that cannot be done (the message says why, for the admin or the command line; ``field`` names
    the input at fault, for the API)."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


# Why an Alertmanager alert is not silenced or shelved here.
ALERTMANAGER_NOTIFIES = ("Prometheus Alertmanager notifies this alert, not the portal: silence it in Alertmanager "
                         "(amtool silence add); a silence or shelving here would stop nothing.")


def _audit(*, user, action: str, alert: Alert | None = None, detail: dict | None = None, address=None,
           target: str = "") -> None:
    from queues.audit import audit

    audit(user=user, action=action, target=target or (f"alert {alert.pk}: {alert.name}" if alert else ""),
          count=1, detail=detail or {}, address=address)


def alert_acknowledge(*, alert: Alert, user, note: str = "", address: str | None = None) -> Alert:
    """Stops reminders and escalation for this alert; it stays in the history and resolves as usual."""
    now = timezone.now()
    with transaction.atomic():
        updated = Alert.objects.filter(pk=alert.pk, acknowledged_at__isnull=True).exclude(
            state=Alert.State.RESOLVED).update(acknowledged_at=now, acknowledged_by=user,
                                               acknowledgement_note=note[:500])
        if not updated:
            alert.refresh_from_db()
            raise AlertError("This alert is already acknowledged." if alert.acknowledged_at else
                             "This alert is resolved; there is nothing to acknowledge.")
        AlertEvent.objects.create(alert=alert, kind=AlertEvent.Kind.ACKNOWLEDGED, at=now, user=user,
                                  message=note[:500])
        _audit(user=user, action="alert_acknowledge", alert=alert, detail={"note": note}, address=address)
    alert.refresh_from_db()
    return alert


def alert_unacknowledge(*, alert: Alert, user, address: str | None = None) -> Alert:
    now = timezone.now()
    with transaction.atomic():
        if not Alert.objects.filter(pk=alert.pk, acknowledged_at__isnull=False).update(
                acknowledged_at=None, acknowledged_by=None, acknowledgement_note=""):
            raise AlertError("This alert is not acknowledged.")
        AlertEvent.objects.create(alert=alert, kind=AlertEvent.Kind.UNACKNOWLEDGED, at=now, user=user)
        _audit(user=user, action="alert_unacknowledge", alert=alert, address=address)
    alert.refresh_from_db()
    return alert


def alert_shelve(*, alert: Alert, user, until: datetime | None, address: str | None = None) -> Alert:
    """Shelving hides nothing: it stops notifications until ``until`` (None unshelves)."""
    now = timezone.now()
    if until is not None and notified_by_alertmanager(alert):
        raise AlertError(ALERTMANAGER_NOTIFIES)
    if until is not None and until <= now:
        raise AlertError("'until' must be in the future.")
    if until is not None and alert.state == Alert.State.RESOLVED:
        raise AlertError("This alert is resolved; there is nothing to shelve.")
    if until is None and not alert.is_shelved(now):
        raise AlertError("This alert is not shelved.")
    with transaction.atomic():
        Alert.objects.filter(pk=alert.pk).update(shelved_until=until, shelved_by=user if until else None)
        kind = AlertEvent.Kind.SHELVED if until else AlertEvent.Kind.UNSHELVED
        AlertEvent.objects.create(alert=alert, kind=kind, at=now, user=user,
                                  message=f"until {until:%Y-%m-%d %H:%M %Z}" if until else "")
        _audit(user=user, action="alert_shelve" if until else "alert_unshelve", alert=alert,
               detail={"until": until.isoformat() if until else None}, address=address)
    alert.refresh_from_db()
    return alert


def silence_stops_nothing(matchers: list[dict]) -> str | None:
    """Why a silence of these (valid) matchers would stop nothing, or None. An ``alertname`` matcher that takes only
    rules whose alerts Alertmanager pages (their Prometheus twin is the live page: ``PAGED_BY_ALERTMANAGER``), by
    name (``=``) or by a pattern that matches no other rule's name (``=~``), limits the silence to alerts the portal
    never notifies; the alert's own page refuses that silence already."""
    rules = dict(AlertRule.objects.values_list("name", "signal"))
    paged = {name for name, signal in rules.items() if signal in PAGED_BY_ALERTMANAGER}
    if not paged:
        return None
    for matcher in matchers:
        if matcher["label"] != "alertname" or matcher["op"] not in ("=", "=~"):
            continue
        if matcher["op"] == "=":
            taken = {matcher["value"]} & rules.keys()
        else:
            pattern = pattern_compile(matcher["value"])
            taken = {name for name in rules if pattern.fullmatch(name)}
        if taken and taken <= paged:
            return (f"alertname{matcher['op']}{matcher['value']} takes only {', '.join(sorted(taken))}, which "
                    f"Prometheus Alertmanager pages (its twin is the live page), not the portal: silence it in "
                    f"Alertmanager (amtool silence add); a silence here would stop nothing.")
    return None


def silence_create(*, matchers: list[dict], ends_at: datetime, reason: str, user, starts_at: datetime | None = None,
                   address: str | None = None) -> Silence:
    now = timezone.now()
    starts_at = starts_at or now
    try:
        matchers = matchers_validate(matchers)
    except MatcherError as error:
        raise AlertError(str(error)) from None
    refused = silence_stops_nothing(matchers)
    if refused:
        raise AlertError(f"matchers: {refused}", field="matchers")
    if not reason.strip():
        raise AlertError("reason: say why notifications are silenced.")
    if ends_at <= starts_at:
        raise AlertError("ends_at: the end must be after the start.")
    with transaction.atomic():
        silence = Silence.objects.create(matchers=matchers, starts_at=starts_at, ends_at=ends_at,
                                         reason=reason.strip()[:500], created_by=user if getattr(user, "pk", None)
                                         else None)
        _audit(user=user, action="silence_create", target=f"silence {silence.pk}: {silence}",
               detail={"matchers": matchers, "starts_at": starts_at.isoformat(), "ends_at": ends_at.isoformat(),
                       "reason": reason}, address=address)
    return silence


def silence_expire(*, silence: Silence, user, address: str | None = None) -> Silence:
    """Ends the silence now; one that had not started yet ends before it starts (both set to now), so that it is
    expired, not pending. A silence already ended (or expired by someone else meanwhile) is refused."""
    now = timezone.now()
    if silence.ends_at <= now:
        raise AlertError("This silence has already ended.")
    with transaction.atomic():
        if not Silence.objects.filter(pk=silence.pk, ends_at__gt=now).update(
                starts_at=min(silence.starts_at, now), ends_at=now, expired_by=user):
            raise AlertError("This silence has already ended.")
        _audit(user=user, action="silence_expire", target=f"silence {silence.pk}: {silence}", address=address)
    silence.refresh_from_db()
    return silence


