"""Alert evaluation and the operator's alert actions.

How an alert lives
------------------
Each enabled ``AlertRule`` is judged once per pass on its signal (monitoring.alert_rules). The condition of a rule
is one alert, found again on every pass by its fingerprint (a hash of the rule's labels); the unique ``open_key``
column holds the fingerprint while the alert is open, so two evaluators could never open it twice.

- The condition holds and no alert is open: a PENDING alert starts (``holding_since`` = now). With ``for`` = 0 it
  fires at once; otherwise it fires once the condition has held for ``for`` seconds without a break.
- The condition stops holding: the alert notes ``cleared_at``. If the condition returns within the rule's
  ``clear_seconds`` the same alert continues (``flaps`` counts it; a pending alert restarts its ``for``); if it stays
  away that long, the alert resolves, with ``resolved_at`` = when it cleared. So a flapping condition is one alert
  with a count, not one alert and one page per flip.
- The signal cannot be read (Redis does not answer, so queue lengths are unknown): nothing changes.

Every change is an ``AlertEvent`` row, the alert's timeline. Inhibition: a firing alert whose rule lists an
inhibiting rule with a firing alert (Redis unreachable causes "no workers") is marked as caused by it; the
notification planner (monitoring.notifications) skips it while the cause fires.

Alerts from Prometheus arrive through Alertmanager's webhook (``alertmanager_ingest``) and land in the same table,
deduplicated on Alertmanager's fingerprint and start time.

One evaluator per deployment: a lease row in the database (``Lease``), taken and renewed on the database's own
clock by conditional update. It lives in the database, not in Redis, because reporting that Redis is down is part
of the evaluator's work. While the database itself is down nothing can be written: every evaluator, active or
standing by, remembers when it found the database gone, and records the database alert, fired then and resolved
at its first pass that reaches the database again. The first to record it writes it; the others find it there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from monitoring.alert_rules import SIGNALS, Reading, Readings
from monitoring.matchers import MatcherError, matchers_validate
from monitoring.models import Alert, AlertEvent, AlertRule, Lease, Severity, Silence
from monitoring.monitors import EVALUATOR, monitor_pass
from monitoring.transports.base import url_error

logger = logging.getLogger(__name__)

EVALUATOR_LEASE = "alert-evaluator"
LEASE_SECONDS = 30


class AlertError(Exception):
    """An alert action that cannot be done (the message says why, for the admin or the command line)."""


# Why an Alertmanager alert is not silenced or shelved here.
ALERTMANAGER_NOTIFIES = ("Prometheus Alertmanager notifies this alert, not the portal: silence it in Alertmanager "
                         "(amtool silence add); a silence or shelving here would stop nothing.")


def http_url(url: str) -> bool:
    """Whether ``url`` is an http(s) URL with a host (any host, internal names too: ``http://prometheus:9090``): the
    only links the portal stores or shows from what others send."""
    return url_error(url) is None


def portal_open_alerts():
    """The open alerts the evaluator judges (see ``AlertQuerySet.open_from``)."""
    return Alert.objects.open_from(Alert.Source.PORTAL)


def fingerprint_of(labels: dict) -> str:
    text = "\x1f".join(f"{key}\x1e{labels[key]}" for key in sorted(labels))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _event(alert: Alert, kind: str, message: str = "", *, at: datetime, user=None, **detail) -> AlertEvent:
    return AlertEvent(alert=alert, kind=kind, message=message[:500], at=at,
                      user=user if getattr(user, "pk", None) else None, detail=detail)


def _summary(rule: AlertRule, reading: Reading) -> str:
    signal = SIGNALS.get(rule.signal)
    unit = f" {signal.unit}" if signal and signal.unit and signal.unit != "ratio" else ""
    value = "" if reading.value is None else f" ({reading.value:g}{unit}, threshold {rule.comparison} " \
                                             f"{rule.threshold:g}{unit})"
    return f"{rule.title}{value}"[:500]


@dataclass
class EvaluationResult:
    at: datetime
    rules: int = 0
    unknown: list[str] = field(default_factory=list)
    changes: list[tuple[str, str]] = field(default_factory=list)  # (rule name, event kind)

    def as_dict(self) -> dict:
        return {"at": self.at.isoformat(), "rules": self.rules, "unknown": self.unknown,
                "changes": [f"{name}: {kind}" for name, kind in self.changes]}


# The columns the evaluator writes on an alert. Saving only these leaves an acknowledgement or a shelving that an
# operator made during the pass as it is.
EVALUATOR_FIELDS = ["state", "summary", "value", "last_seen_at", "holding_since", "fired_at", "cleared_at",
                    "resolved_at", "open_key", "flaps", "inhibited_by", "resolved_notified"]


def alerts_evaluate(*, now: datetime | None = None, readings: Readings | None = None,
                    signals: set[str] | None = None) -> EvaluationResult:
    """One evaluation pass over every enabled rule (see the module docstring). ``now`` and ``readings`` are
    injectable, for tests and for recording a past outage. ``signals``: only the rules of these signals (the
    sampler judging monitoring-stale while the evaluator is silent); the other rules' alerts are left alone."""
    now = now or timezone.now()
    readings = readings or Readings(now=now)
    enabled = AlertRule.objects.filter(enabled=True)
    if signals is not None:
        enabled = enabled.filter(signal__in=signals)
    rules = list(enabled.prefetch_related("inhibited_by"))
    result = EvaluationResult(at=now, rules=len(rules))
    # Every figure first (Redis and database reads can take a while when one of them is slow), then the alerts
    # are loaded and changed in a short transaction.
    judged = []
    for rule in rules:
        signal = SIGNALS.get(rule.signal)
        reading = None
        if signal is None:
            logger.error("alert rule %s names an unknown signal %r", rule.name, rule.signal)
        elif signal.about_workers and readings.fleet_starting:
            pass  # unknown while the workers start: the alert keeps its state (a start does not page)
        else:
            try:
                reading = signal.compute(readings, rule)
            except Exception:  # one broken figure must not stop the other rules
                logger.exception("alert rule %s: reading %s failed", rule.name, rule.signal)
        if reading is None:
            result.unknown.append(rule.name)
        labels = rule.all_labels()
        judged.append((rule, reading, labels, fingerprint_of(labels)))
    events: list[AlertEvent] = []
    changed: dict[int, Alert] = {}
    with transaction.atomic():
        judging = portal_open_alerts()
        if signals is not None:
            judging = judging.filter(rule__signal__in=signals)
        open_alerts = {alert.fingerprint: alert for alert in judging.order_by().select_related("rule")}
        judged_fingerprints = {fingerprint for _, _, _, fingerprint in judged}
        for fingerprint, alert in list(open_alerts.items()):
            if fingerprint not in judged_fingerprints:
                # Its rule was disabled, deleted, or edited into other labels: nothing judges it any more.
                alert_resolve(alert, at=now, now=now, events=events,
                              message="its rule was disabled, deleted or changed; no longer evaluated")
                changed[alert.pk] = alert
                del open_alerts[fingerprint]
        for rule, reading, labels, fingerprint in judged:
            if reading is None:
                continue
            alert = open_alerts.get(fingerprint)
            holds = reading.applies and reading.value is not None and rule.breached(reading.value)
            if holds:
                alert = _condition_holds(rule, alert, reading, labels, fingerprint, now, events)
                open_alerts[fingerprint] = alert
                changed[alert.pk] = alert
            elif alert is not None and _condition_absent(rule, alert, reading, now, events):
                changed[alert.pk] = alert
        _inhibit(rules, open_alerts, now, events, changed)
        for alert in changed.values():
            alert.save(update_fields=EVALUATOR_FIELDS)
        AlertEvent.objects.bulk_create(events)
    result.changes = [(event.alert.name, event.kind) for event in events]
    return result


def _condition_holds(rule, alert, reading, labels, fingerprint, now, events) -> Alert:
    if alert is None:
        alert = Alert.objects.create(
            rule=rule, name=rule.name, fingerprint=fingerprint, open_key=fingerprint, severity=rule.severity,
            component=rule.component, summary=_summary(rule, reading), labels=labels,
            annotations={"runbook": rule.runbook, **({"detail": reading.detail} if reading.detail else {})},
            value=reading.value, threshold=rule.threshold, started_at=now, holding_since=now, last_seen_at=now)
        events.append(_event(alert, AlertEvent.Kind.PENDING, alert.summary, at=now, value=reading.value))
    else:
        if alert.cleared_at is not None:
            alert.cleared_at = None
            alert.flaps += 1
            if alert.state == Alert.State.PENDING:
                alert.holding_since = now  # "for" means an unbroken stretch
            events.append(_event(alert, AlertEvent.Kind.RETURNED, f"the condition returned (flap {alert.flaps})",
                                 at=now, value=reading.value))
        alert.value, alert.last_seen_at = reading.value, now
        alert.summary = _summary(rule, reading)
    if alert.state == Alert.State.PENDING and (now - alert.holding_since).total_seconds() >= rule.for_seconds:
        alert.state, alert.fired_at = Alert.State.FIRING, now
        events.append(_event(alert, AlertEvent.Kind.FIRING, alert.summary, at=now, value=reading.value))
    return alert


def _condition_absent(rule, alert, reading, now, events) -> bool:
    """The condition does not hold; returns whether the alert changed."""
    if alert.cleared_at is None:
        alert.cleared_at = now
        events.append(_event(alert, AlertEvent.Kind.CLEARED, reading.detail or "the condition no longer holds",
                             at=now, value=reading.value))
    if (now - alert.cleared_at).total_seconds() >= rule.clear_seconds:
        alert_resolve(alert, at=alert.cleared_at, now=now, events=events,
                      message="resolved" if alert.fired_at else "cleared before it fired")
    return True


def alert_resolve(alert: Alert, *, at: datetime, now: datetime, events: list, message: str,
                  kind: str = AlertEvent.Kind.RESOLVED) -> None:
    alert.state, alert.resolved_at, alert.open_key = Alert.State.RESOLVED, at, None
    # Nobody was told it fired: there is no resolution to send either. Only alerts still owing one keep
    # resolved_notified False, so the planner's query stays small however long the history grows.
    if alert.notified_at is None or alert.source != Alert.Source.PORTAL:
        alert.resolved_notified = True
    events.append(_event(alert, kind, message, at=now))


def _resolve_one(alert: Alert, *, at: datetime, now: datetime, message: str,
                 kind: str = AlertEvent.Kind.RESOLVED) -> None:
    """alert_resolve for a single alert outside an evaluation pass: saved with its timeline row."""
    events: list[AlertEvent] = []
    alert_resolve(alert, at=at, now=now, events=events, message=message, kind=kind)
    # Only what resolving changes: an acknowledgement or shelving committed since the row was read stays.
    alert.save(update_fields=["state", "resolved_at", "open_key", "resolved_notified", "last_seen_at"])
    AlertEvent.objects.bulk_create(events)


def _inhibit(rules, open_alerts, now, events, changed) -> None:
    """Marks firing alerts caused by another firing alert, naming the root cause (Redis unreachable, not the "no
    workers" alert that Redis being unreachable also causes)."""
    firing_by_rule = {alert.rule_id: alert for alert in open_alerts.values()
                      if alert.state == Alert.State.FIRING and alert.rule_id}
    causes: dict[int, list[Alert]] = {}
    alerts: dict[int, Alert] = {}
    for rule in rules:
        alert = open_alerts.get(fingerprint_of(rule.all_labels()))
        if alert is None or alert.state != Alert.State.FIRING:
            continue
        found = [firing_by_rule[source.pk] for source in rule.inhibited_by.all() if source.pk in firing_by_rule]
        if found:
            causes[alert.pk], alerts[alert.pk] = found, alert

    def root(alert: Alert, seen: set[int]) -> Alert:
        for cause in causes.get(alert.pk, []):
            if cause.pk not in seen:
                return root(cause, seen | {alert.pk})
        return alert

    for pk, alert in alerts.items():
        cause = root(alert, set())
        if cause.pk == pk or alert.inhibited_by_id == cause.pk:
            continue  # a cycle of rules inhibiting each other, or already marked
        alert.inhibited_by = cause
        changed[pk] = alert
        events.append(_event(alert, AlertEvent.Kind.INHIBITED, f"caused by: {cause.summary}", at=now,
                             cause=cause.pk))


# --- one evaluator per deployment -----------------------------------------------------------------------------

def lease_holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def lease_acquire(*, name: str = EVALUATOR_LEASE, holder: str, seconds: int = LEASE_SECONDS) -> bool:
    """Takes or renews the lease on the database's clock; True while this holder has it."""
    from queues.models import database_now

    now = database_now(connection)
    until = now + timedelta(seconds=seconds)
    taken = Lease.objects.filter(name=name).filter(
        holder=holder).update(expires_at=until) or \
        Lease.objects.filter(name=name, expires_at__lt=now).update(holder=holder, expires_at=until)
    if taken:
        return True
    try:
        with transaction.atomic():
            Lease.objects.create(name=name, holder=holder, expires_at=until)
        return True
    except IntegrityError:
        return False


def lease_release(*, name: str = EVALUATOR_LEASE, holder: str) -> None:
    Lease.objects.filter(name=name, holder=holder).delete()


def lease_current(name: str = EVALUATOR_LEASE) -> Lease | None:
    return Lease.objects.filter(name=name).first()


def database_outage_record(*, started_at: datetime, ended_at: datetime, error: str) -> Alert | None:
    """Records a database outage the evaluator lived through (nothing could be written during it): the
    database rule's alert, fired at the start and resolved at the end, so the history and the notifications
    show it. Does nothing if that rule is disabled or the outage was shorter than its 'for'."""
    rule = AlertRule.objects.filter(signal="database_up", enabled=True).first()
    if rule is None or (ended_at - started_at).total_seconds() < rule.for_seconds:
        return None
    labels = rule.all_labels()
    now = timezone.now()
    with transaction.atomic():
        # Every evaluator that lived through the outage records it: the first one records it, the others find it.
        # The rule's row serialises them (MySQL; SQLite's transactions take the write lock as they begin).
        AlertRule.objects.select_for_update().filter(pk=rule.pk).exists()
        if Alert.objects.filter(rule=rule, started_at__lte=ended_at, resolved_at__gte=started_at).exists():
            return None
        alert = Alert.objects.create(
            rule=rule, name=rule.name, fingerprint=fingerprint_of(labels), open_key=None, severity=rule.severity,
            component=rule.component, summary=f"{rule.title} (recorded after it answered again)", labels=labels,
            annotations={"runbook": rule.runbook, "detail": error[:500], "recorded": "after the outage"},
            value=0.0, threshold=rule.threshold,
            state=Alert.State.RESOLVED, started_at=started_at, holding_since=started_at, fired_at=started_at,
            resolved_at=ended_at, last_seen_at=ended_at)
        AlertEvent.objects.bulk_create([
            _event(alert, AlertEvent.Kind.FIRING, f"the database did not answer: {error}", at=started_at),
            _event(alert, AlertEvent.Kind.RESOLVED, "the database answers again; recorded now", at=now),
        ])
    return alert


@dataclass
class EvaluatorState:
    """What an evaluator process keeps between passes: whether it holds the lease, and since when the database has
    not answered (recorded as an alert once it answers again)."""

    holder: str = field(default_factory=lambda: lease_holder_name())
    started_at: datetime | None = None  # a long-running evaluator's start (its first passes wait for the workers)
    interval: float | None = None  # seconds between its passes (ALERTS_EVALUATION_INTERVAL unless told)
    holding: bool = False
    database_down_since: datetime | None = None
    database_error: str = ""


def alerts_cycle(*, state: EvaluatorState, now: datetime | None = None) -> dict:
    """One evaluator pass: lease, evaluation, notification plan, dispatch. Returns what it did (for the log)."""
    from django.db import close_old_connections

    from monitoring.notifications import notifications_dispatch, notifications_plan

    now = now or timezone.now()
    close_old_connections()
    report: dict = {}
    try:
        if state.database_down_since is not None:
            # The database answers again: the outage this evaluator lived through is recorded now, ending now,
            # whether or not it holds the lease (the standby may be the first to renew it).
            recorded = database_outage_record(started_at=state.database_down_since, ended_at=now,
                                              error=state.database_error)
            report["database_outage_recorded"] = recorded.pk if recorded else None
            state.database_down_since = None
        state.holding = lease_acquire(holder=state.holder)
        if not state.holding:
            lease = lease_current()
            return {"lease": False, "holder": lease.holder if lease else "", **report}
        report["lease"] = True
        # Recorded as the pass begins: the evaluator never judges itself silent (after a restart its row is as old
        # as the downtime); a hung pass ages the row, and the sampler judges that.
        monitor_pass(EVALUATOR, holder=state.holder, interval=state.interval or settings.ALERTS_EVALUATION_INTERVAL)
        readings = Readings(now=now, started_at=state.started_at)
        report["evaluation"] = alerts_evaluate(now=now, readings=readings).as_dict()
        report["expired"] = alertmanager_alerts_expire(now=now)
        report["planned"] = len(notifications_plan(now=now))
        report["dispatch"] = notifications_dispatch(keep_lease=lambda: lease_acquire(holder=state.holder))
        return report
    except DatabaseError as error:
        try:
            connection.close()
        except DatabaseError:
            pass
        if database_answers():
            # A deadlock, a constraint another evaluator raced us to, bad data: the database is there. Not an
            # outage; this pass is lost and the next one starts afresh.
            logger.exception("alert evaluation pass failed on a database error")
            return {"error": f"{type(error).__name__}: {error}"}
        if state.database_down_since is None:
            state.database_down_since, state.database_error = now, str(error) or type(error).__name__
        return {"database": f"unreachable: {error}"}


def database_answers() -> bool:
    """A fresh connection and SELECT 1 (the check that tells an outage from an error in one statement)."""
    try:
        connection.close()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except DatabaseError:
        try:
            connection.close()
        except DatabaseError:
            pass
        return False


# --- operator actions -------------------------------------------------------------------------------------------

def _audit(*, user, action: str, alert: Alert | None = None, detail: dict | None = None, address=None,
           target: str = "") -> None:
    from queues.fleet import audit

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
    if until is not None and alert.source == Alert.Source.ALERTMANAGER:
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


def silence_create(*, matchers: list[dict], ends_at: datetime, reason: str, user, starts_at: datetime | None = None,
                   address: str | None = None) -> Silence:
    now = timezone.now()
    starts_at = starts_at or now
    try:
        matchers = matchers_validate(matchers)
    except MatcherError as error:
        raise AlertError(str(error)) from None
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
    now = timezone.now()
    if silence.ends_at <= now:
        raise AlertError("This silence has already ended.")
    with transaction.atomic():
        Silence.objects.filter(pk=silence.pk).update(ends_at=max(now, silence.starts_at), expired_by=user)
        _audit(user=user, action="silence_expire", target=f"silence {silence.pk}: {silence}", address=address)
    silence.refresh_from_db()
    return silence


# --- Prometheus Alertmanager's webhook --------------------------------------------------------------------------

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
                    _resolve_one(previous, at=item["starts_at"], now=now,
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
                _resolve_one(alert, at=item["ends_at"] or now, now=now, message="resolved in Prometheus")
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
            _resolve_one(alert, at=alert.last_seen_at, now=now, kind=AlertEvent.Kind.EXPIRED,
                         message=f"Alertmanager has not reported it since {alert.last_seen_at:%Y-%m-%d %H:%M %Z}")
            expired += 1
    return expired


# --- the current alerts, for /api/rq/alerts ---------------------------------------------------------------------

LEVELS = {Severity.CRITICAL: "critical", Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "info"}


def alerts_current() -> dict:
    """The open alerts (pending and firing), newest first, in the old endpoint's shape plus ours: the 500 newest
    (``shown``); ``alert_count`` counts them all."""
    from django.conf import settings
    from django.urls import reverse

    # The open alerts are few (Alertmanager's are capped): their keys are sorted here, so the query stays on the
    # state index (ORDER BY started_at would walk the whole history's started_at index), and only the 500 newest
    # rows are loaded.
    keys = sorted(Alert.objects.open().order_by().values_list("started_at", "pk"), reverse=True)[:500]
    by_pk = Alert.objects.select_related("rule", "acknowledged_by").in_bulk([pk for _, pk in keys])
    rows = [by_pk[pk] for _, pk in keys if pk in by_pk]
    alerts = []
    for alert in rows:
        rule = alert.rule
        alerts.append({
            "id": alert.pk, "level": LEVELS.get(alert.severity, alert.severity), "message": alert.summary,
            "metric": rule.signal if rule else alert.labels.get("alertname", alert.name),
            "value": alert.value, "threshold": alert.threshold,
            "timestamp": (alert.fired_at or alert.started_at).isoformat(),
            "state": alert.state, "since": alert.started_at.isoformat(), "rule": alert.name,
            "source": alert.source, "component": alert.component, "labels": alert.labels,
            "acknowledged_by": alert.acknowledged_by.get_username() if alert.acknowledged_by else None,
            "acknowledged_at": alert.acknowledged_at.isoformat() if alert.acknowledged_at else None,
            "inhibited_by": alert.inhibited_by_id, "flaps": alert.flaps,
            "runbook_url": alert.runbook_url or (settings.PORTAL_URL + reverse("admin:monitoring_alertrule_change",
                                                                               args=[rule.pk]) if rule else ""),
            "url": settings.PORTAL_URL + reverse("admin:monitoring_alert_change", args=[alert.pk]),
        })
    total = len(rows) if len(rows) < 500 else Alert.objects.open().count()
    firing = Alert.objects.firing().count() if len(rows) >= 500 else \
        sum(1 for alert in rows if alert.state == Alert.State.FIRING)
    return {"alerts": alerts, "alert_count": total, "firing_count": firing, "shown": len(alerts),
            "timestamp": timezone.now().isoformat()}
