"""Alert evaluation: the rules judged on every pass, one evaluator per deployment.

How an alert lives
------------------
Each enabled ``AlertRule`` is judged once per pass on its signal (monitoring.alerts.rules). The condition of a rule
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
notification planner (monitoring.alerts.notify) skips it while the cause fires.

Alerts from Prometheus arrive through Alertmanager's webhook (``alertmanager_ingest``) and land in the same table,
deduplicated on Alertmanager's fingerprint and start time.

One evaluator per deployment: a lease row in the database (``Lease``), taken and renewed on the database's own
clock by conditional update. It lives in the database, not in Redis, because reporting that Redis is down is part
of the evaluator's work. While the database itself is down nothing can be written: every evaluator, active or
standing by, remembers when it found the database gone, and records the database alert, fired then and resolved
at its first pass that reaches the database again. The first to record it writes it; the others find it there.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.utils import timezone

from monitoring.alerts.ingest import alertmanager_alerts_expire
from monitoring.alerts.rules import SIGNALS, Reading, Readings
from monitoring.alerts.timeline import alert_resolve, event, fingerprint_of
from monitoring.metrics.monitors import EVALUATOR, monitor_pass
from monitoring.models import Alert, AlertEvent, AlertRule, Lease

logger = logging.getLogger(__name__)


EVALUATOR_LEASE = "alert-evaluator"
LEASE_SECONDS = 30


def portal_open_alerts():
    """The open alerts the evaluator judges (see ``AlertQuerySet.open_from``)."""
    return Alert.objects.open_from(Alert.Source.PORTAL)


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
        events.append(event(alert, AlertEvent.Kind.PENDING, alert.summary, at=now, value=reading.value))
    else:
        if alert.cleared_at is not None:
            alert.cleared_at = None
            alert.flaps += 1
            if alert.state == Alert.State.PENDING:
                alert.holding_since = now  # "for" means an unbroken stretch
            events.append(event(alert, AlertEvent.Kind.RETURNED, f"the condition returned (flap {alert.flaps})",
                                 at=now, value=reading.value))
        alert.value, alert.last_seen_at = reading.value, now
        alert.summary = _summary(rule, reading)
    if alert.state == Alert.State.PENDING and (now - alert.holding_since).total_seconds() >= rule.for_seconds:
        alert.state, alert.fired_at = Alert.State.FIRING, now
        events.append(event(alert, AlertEvent.Kind.FIRING, alert.summary, at=now, value=reading.value))
    return alert


def _condition_absent(rule, alert, reading, now, events) -> bool:
    """The condition does not hold; returns whether the alert changed."""
    if alert.cleared_at is None:
        alert.cleared_at = now
        events.append(event(alert, AlertEvent.Kind.CLEARED, reading.detail or "the condition no longer holds",
                             at=now, value=reading.value))
    if (now - alert.cleared_at).total_seconds() >= rule.clear_seconds:
        alert_resolve(alert, at=alert.cleared_at, now=now, events=events,
                      message="resolved" if alert.fired_at else "cleared before it fired")
    return True


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
        events.append(event(alert, AlertEvent.Kind.INHIBITED, f"caused by: {cause.summary}", at=now,
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
            event(alert, AlertEvent.Kind.FIRING, f"the database did not answer: {error}", at=started_at),
            event(alert, AlertEvent.Kind.RESOLVED, "the database answers again; recorded now", at=now),
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

    from monitoring.alerts.notify import notifications_dispatch, notifications_plan

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


