"""Who is told about alerts, and the delivery of each message.

Planning (``notifications_plan``, run by the evaluator after each pass) decides which messages are due and writes
them as ``Notification`` rows, one per channel and alert group, in the same transaction that marks the alerts as
notified: a plan is never half done and never done twice (its writes are fenced on the alerts as it read them, so of
two plans that overlap only the first is written).

- First message: a firing alert that is not acknowledged, shelved, silenced or caused by another firing alert, whose
  condition still holds (not waiting out its clear time), and has not been notified, goes to every enabled channel
  of the first route that takes it (and of later routes while a route says "continue"). Alerts of one route with
  equal ``group_by`` labels are one group: the group's message waits until its oldest member has fired
  ``group_wait`` seconds ago and then carries every member not yet sent.
- Reminder: a firing alert still unacknowledged ``repeat_interval`` after its last message, again grouped.
- Resolved: an alert that was notified and has resolved, to the same routes when they ``send_resolved``, and to
  every channel an escalation told (always: a page is closed).
- Escalation: a firing alert of a policy's severity still unacknowledged ``after_minutes`` after it fired goes to
  the next level's channels. Each level is a timeline row, even one without channels.

One notifier per condition (``notified_by_alertmanager``): alerts Alertmanager sent, and the portal's alerts of the
rules whose Prometheus twin Alertmanager pages (``PAGED_BY_ALERTMANAGER``), are recorded here and never notified:
Alertmanager pages them, and sends their resolution, itself.

Delivery (``notification_deliver``) is a job on the existing RQ workers (``monitoring.jobs``) when Redis answers,
and runs in the evaluator's process when it does not, so a Redis outage is still reported. A notification is
claimed by a conditional update on its attempt count, so a job that runs twice sends once. Transient failures
(timeouts, 429, 5xx) are retried with backoff (``Notification.BACKOFF_SECONDS``) up to ``MAX_ATTEMPTS``; a permanent
one (most 4xx, a refused recipient) ends the notification, and a channel with ``DISABLE_AFTER`` permanent failures
in a row is disabled with the reason shown in the admin. Every send is a ``DeliveryAttempt`` row.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from datetime import datetime

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Max
from django.urls import reverse
from django.utils import timezone

from monitoring.models import (
    Alert,
    AlertEvent,
    DeliveryAttempt,
    EscalationPolicy,
    Notification,
    NotificationChannel,
    NotificationRoute,
    Silence,
)

logger = logging.getLogger(__name__)

# A notification job's limit: rq ends a send that runs longer.
NOTIFY_JOB_TIMEOUT = 60
# A notification in "sending" whose claim is older than this is sent by the evaluator itself: handed to a worker that
# did not start it (its job was lost with a Redis restart, every worker is busy with long captions), or started by
# a worker that died mid-send. The sender renews the claim as it starts, and a started send ends within the job's
# timeout, so a send in progress is never taken back. Claims are on the database's clock, which every host shares.
SENDING_LEASE_SECONDS = NOTIFY_JOB_TIMEOUT + 30
# Notifications the evaluator sends itself per pass while Redis does not answer (each can take a timeout).
INLINE_BUDGET = 20
SEND_TIMEOUT = 10.0
# Signals whose alerts the portal cannot send while they hold: the database is where its notifications are written.
# Their Prometheus twins are paged by Alertmanager (monitoring.alerts.exports labels them notified_by="alertmanager");
# the portal records such an outage once the database answers, and sends nothing about it.
PAGED_BY_ALERTMANAGER = {"database_up"}


def notified_by_alertmanager(alert: Alert) -> bool:
    """Whether Alertmanager pages for this alert rather than the portal: it came from Alertmanager, or its rule's
    Prometheus twin is the live page. A portal silence, shelving or notification would then stop or add nothing but
    a second page; the alert page, the shelve and silence actions and the planner ask this."""
    if alert.source == Alert.Source.ALERTMANAGER:
        return True
    return alert.rule_id is not None and alert.rule is not None and alert.rule.signal in PAGED_BY_ALERTMANAGER


def _alert_url(alert: Alert) -> str:
    return settings.PORTAL_URL + reverse("admin:monitoring_alert_change", args=[alert.pk])


def alert_payload(alert: Alert) -> dict:
    return {"name": alert.name, "severity": alert.severity, "state": alert.state, "summary": alert.summary,
            "labels": alert.labels, "annotations": alert.annotations,
            "started_at": (alert.fired_at or alert.started_at).isoformat(),
            "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
            "runbook_url": alert.runbook_url, "url": _alert_url(alert), "fingerprint": alert.fingerprint,
            "id": alert.pk, "value": alert.value}


def message_compose(*, kind: str, alerts: list[Alert], group_key: str, title: str = "") -> dict:
    """The message body every transport receives (monitoring.alerts.transports.Message's fields)."""
    status = "resolved" if kind == Notification.Kind.RESOLVED else "firing"
    worst = max((alert.severity for alert in alerts), key=lambda s: ["info", "warning", "error", "critical"].index(s),
                default="info")
    names = ", ".join(sorted({alert.summary for alert in alerts}))[:200]
    prefix = {"firing": "FIRING", "resolved": "RESOLVED", "repeat": "STILL FIRING", "escalation": "ESCALATED",
              "test": "TEST"}[kind]
    subject = f"[{prefix}:{len(alerts)}] {worst}: {names}" if alerts else f"[{prefix}] {title}"
    lines = [title] if title else []
    for alert in alerts:
        since = (alert.fired_at or alert.started_at).strftime("%Y-%m-%d %H:%M:%S %Z")
        ended = f", resolved {alert.resolved_at:%H:%M:%S}" if alert.resolved_at else ""
        lines.append(f"- [{alert.severity}] {alert.summary} (since {since}{ended})")
        if alert.rule_id and alert.rule and alert.rule.runbook:
            lines.append(f"  Runbook: {alert.rule.runbook}")
        lines.append(f"  {_alert_url(alert)}")
    portal_url = settings.PORTAL_URL + reverse("admin:monitoring_alert_changelist")
    return {"kind": kind, "status": status, "subject": subject[:300], "text": "\n".join(lines),
            "group_key": group_key, "portal_url": portal_url, "alerts": [alert_payload(alert) for alert in alerts]}


def _group_key(route: NotificationRoute, alert: Alert) -> str:
    values = ",".join(f"{label}={alert.labels.get(label, '')}" for label in route.group_by or [])
    return f"{route.name}:{{{values}}}"[:300]


def _quiet(alert: Alert, now: datetime, silences: list[Silence]) -> Silence | str | None:
    """Why this alert is not to be notified now: a silence, "shelved", "acknowledged", "caused"; None if it is."""
    if alert.acknowledged_at:
        return "acknowledged"
    if alert.is_shelved(now):
        return "shelved"
    if alert.inhibited_by_id and alert.inhibited_by and alert.inhibited_by.state == Alert.State.FIRING:
        return "caused"
    return next((silence for silence in silences if silence.matches(alert.labels)), None)


def _routes_for(alert: Alert, routes: list[NotificationRoute]) -> list[NotificationRoute]:
    chosen = []
    for route in routes:
        if route.takes(alert):
            chosen.append(route)
            if not route.continue_matching:
                break
    return chosen


def _queue(notifications: list, *, channel, route, kind, alerts, group_key, now, title="") -> None:
    body = message_compose(kind=kind, alerts=alerts, group_key=group_key, title=title)
    notifications.append((Notification(channel=channel, route=route, kind=kind, group_key=group_key,
                                       subject=body["subject"], body=body, next_attempt_at=now, created_at=now),
                          alerts))


def _told(alert_ids: list[int]) -> tuple[dict[tuple[int, int], datetime], dict[int, set[int]]]:
    """Who was told each alert fires. First: when each (alert, route) pair last had a firing message or reminder
    (each route keeps its own group wait and repeat interval, and the resolution goes to the routes that were
    told). Second: the channels each alert was escalated to, which are told it ended too. Two indexed queries over
    the candidates' notifications."""
    if not alert_ids:
        return {}, {}
    rows = Notification.objects.filter(
        alerts__in=alert_ids, route__isnull=False,
        kind__in=[Notification.Kind.FIRING, Notification.Kind.REPEAT]).order_by().values_list(
        "alerts", "route").annotate(last=Max("created_at"))
    escalated: dict[int, set[int]] = defaultdict(set)
    for alert_id, channel_id in Notification.objects.filter(
            alerts__in=alert_ids, kind=Notification.Kind.ESCALATION).order_by().values_list("alerts", "channel"):
        escalated[alert_id].add(channel_id)
    return {(alert_id, route_id): last for alert_id, route_id, last in rows}, escalated


def planner_candidates():
    """Open alerts and resolutions still owed are exactly the rows with resolved_notified False: a search of
    alert_pending_resolution_idx, a handful of rows however long the history. ``IN (false)``, not ``= false``:
    Django writes the latter as ``NOT resolved_notified``, which SQLite cannot look up in an index, so every pass
    scanned the whole table. No ORDER BY: the model's default (newest first) made SQLite walk the started_at index
    over the whole history; no filter on state: SQLite then picked the state index and walked every resolved
    alert."""
    return Alert.objects.filter(resolved_notified__in=[False], source=Alert.Source.PORTAL).order_by() \
        .select_related("rule", "inhibited_by")


def notifications_plan(*, now: datetime | None = None) -> list[Notification]:
    """Writes the messages that are due (see the module docstring); returns them. Alerts Alertmanager pages for
    (``notified_by_alertmanager``) are not notified here: Alertmanager notifies its own receivers (the exported
    configuration), so they are recorded only."""
    from queues.models import database_now

    now = now or timezone.now()
    routes = list(NotificationRoute.objects.filter(enabled=True).prefetch_related("channels"))
    silences = list(Silence.objects.filter(starts_at__lte=now, ends_at__gt=now))
    candidates = [alert for alert in planner_candidates() if alert.state != Alert.State.PENDING]
    # What this plan read of each candidate: its writes are fenced on it (below).
    read = {alert.pk: (alert.notified_at, alert.resolved_notified, alert.escalated_at) for alert in candidates}
    touched: dict[int, Alert] = {}
    ours = []
    for alert in candidates:
        if not notified_by_alertmanager(alert):
            ours.append(alert)
        elif alert.state == Alert.State.RESOLVED:
            # Alertmanager paged it and resolved it (the database outage the portal recorded afterwards): in the
            # history only, nobody is told twice.
            alert.resolved_notified = True
            touched[alert.pk] = alert
    candidates = ours
    told, escalated = _told([alert.pk for alert in candidates])
    # (in_bulk of nothing asks the database nothing)
    escalation_channels = NotificationChannel.objects.filter(enabled=True).in_bulk(set().union(*escalated.values()))
    policies = list(EscalationPolicy.objects.filter(enabled=True).prefetch_related("steps__channels"))
    planned: list[tuple[Notification, list[Alert]]] = []
    events: list[AlertEvent] = []
    first: dict[tuple[int, str], list[Alert]] = defaultdict(list)
    repeat: dict[tuple[int, str], list[Alert]] = defaultdict(list)
    resolved: dict[tuple[int, str], list[Alert]] = defaultdict(list)
    route_by_id = {route.pk: route for route in routes}
    for alert in candidates:
        quiet = _quiet(alert, now, silences)
        if isinstance(quiet, Silence) and alert.silenced_by_id != quiet.pk:
            alert.silenced_by = quiet
            touched[alert.pk] = alert
            events.append(AlertEvent(alert=alert, kind=AlertEvent.Kind.SILENCED, at=now,
                                     message=f"silenced until {quiet.ends_at:%Y-%m-%d %H:%M %Z}: {quiet.reason}"[:500],
                                     detail={"silence": quiet.pk}))
        elif alert.silenced_by_id and alert.state != Alert.State.RESOLVED and \
                not any(silence.matches(alert.labels) for silence in silences):
            alert.silenced_by = None  # its silence ended or was expired: the alert page no longer names it
            touched[alert.pk] = alert
        if alert.state == Alert.State.RESOLVED:
            # Whoever was told it fires is told it is over, even if it was silenced or shelved since (an open
            # PagerDuty incident would stay open otherwise).
            alert.resolved_notified = True
            touched[alert.pk] = alert
            covered: set[int] = set()
            for route in _routes_for(alert, routes):
                if route.send_resolved and (alert.pk, route.pk) in told:
                    resolved[(route.pk, _group_key(route, alert))].append(alert)
                    covered.update(channel.pk for channel in route.channels.all() if channel.enabled)
            # The escalation levels' channels were told it fires: they are told it ended (a PagerDuty incident an
            # escalation opened would stay open, and later pages of the same rule fold into it). Whatever the
            # routes' send_resolved: a page is always closed. One message per channel, none twice.
            for channel_id in sorted(escalated.get(alert.pk, set()) & escalation_channels.keys() - covered):
                _queue(planned, channel=escalation_channels[channel_id], route=None,
                       kind=Notification.Kind.RESOLVED, alerts=[alert], group_key=f"escalation:{alert.fingerprint}",
                       now=now)
            continue
        if quiet is not None or alert.cleared_at is not None:
            continue  # (cleared: the condition no longer holds and the alert resolves after the rule's clear time)
        for route in _routes_for(alert, routes):
            key = (route.pk, _group_key(route, alert))
            last = told.get((alert.pk, route.pk))
            if last is None:
                first[key].append(alert)
            elif (now - last).total_seconds() >= route.repeat_interval_seconds:
                repeat[key].append(alert)
    sent: set[int] = set()
    for (route_id, group_key), members in first.items():
        route = route_by_id[route_id]
        oldest = min(alert.fired_at or alert.started_at for alert in members)
        if (now - oldest).total_seconds() < route.group_wait_seconds:
            continue
        _route_messages(planned, route, Notification.Kind.FIRING, members, group_key, now)
        sent.update(alert.pk for alert in members)
    for (route_id, group_key), members in repeat.items():
        _route_messages(planned, route_by_id[route_id], Notification.Kind.REPEAT, members, group_key, now)
        sent.update(alert.pk for alert in members)
    for (route_id, group_key), members in resolved.items():
        _route_messages(planned, route_by_id[route_id], Notification.Kind.RESOLVED, members, group_key, now)
    for alert in candidates:
        if alert.pk in sent:
            alert.notified_at = now
            touched[alert.pk] = alert
    _escalate(candidates, policies, silences, now, planned, events, touched)
    try:
        with transaction.atomic():
            for alert in touched.values():
                # Fenced: each alert is written only if it is as this plan read it. Two plans can overlap (the lease
                # changed hands during a slow pass); the one that writes second finds an alert the first notified,
                # and its whole plan is dropped, so no message is written twice.
                notified_at, resolved_notified, escalated_at = read[alert.pk]
                if not Alert.objects.filter(pk=alert.pk, notified_at=notified_at,
                                            resolved_notified=resolved_notified,
                                            escalated_at=escalated_at).update(
                        notified_at=alert.notified_at, resolved_notified=alert.resolved_notified,
                        escalation_level=alert.escalation_level, escalated_at=alert.escalated_at,
                        escalations=alert.escalations, silenced_by=alert.silenced_by_id):
                    raise _Overlapped(alert)
            due = database_now(connection) if planned else None  # the clock dispatch judges it by
            for notification, members in planned:
                notification.next_attempt_at = due
                notification.save()
                notification.alerts.set(members)
            AlertEvent.objects.bulk_create(events)
    except _Overlapped as overlap:
        logger.warning("notification plan dropped: alert %s was notified by another plan meanwhile (the evaluator's "
                       "lease changed hands during the pass); the next pass plans again", overlap.args[0].pk)
        return []
    return [notification for notification, _ in planned]


class _Overlapped(Exception):
    """Another plan wrote one of this plan's alerts after this plan read it."""


def _route_messages(planned, route, kind, members, group_key, now) -> None:
    for channel in route.channels.all():
        if channel.enabled:
            _queue(planned, channel=channel, route=route, kind=kind, alerts=members, group_key=group_key, now=now)


def _listed(value) -> list:
    return value if isinstance(value, list) else []


def _escalate(candidates, policies, silences, now, planned, events, touched) -> None:
    """Each policy escalates on its own (``Alert.escalations``): a level is due ``after_minutes`` after firing, and
    never sooner after that policy's previous level than the policy spaces them (so an alert that was silenced for
    two hours reaches level 1 when the silence ends, and level 2 only as long after that as level 2 comes after
    level 1). One level per policy per pass, each with its own message and timeline row."""
    for alert in candidates:
        if alert.state != Alert.State.FIRING or alert.fired_at is None or alert.cleared_at is not None or \
                _quiet(alert, now, silences) is not None:
            continue
        minutes = (now - alert.fired_at).total_seconds() / 60
        for policy in policies:
            if alert.severity not in _listed(policy.severities):
                continue
            steps = list(policy.steps.all())
            progress = (alert.escalations or {}).get(str(policy.pk)) or {}
            level = int(progress.get("level") or 0)
            last = datetime.fromisoformat(progress["at"]) if progress.get("at") else None
            reached = max((step.after_minutes for step in steps if step.level == level), default=0)
            since_last = (now - last).total_seconds() / 60 if last else minutes
            due = [step for step in steps if step.level > level and minutes >= step.after_minutes
                   and since_last >= step.after_minutes - reached]
            if not due:
                continue
            step = due[0]
            alert.escalations = {**(alert.escalations or {}), str(policy.pk): {"level": step.level,
                                                                               "at": now.isoformat()}}
            alert.escalation_level, alert.escalated_at = max(alert.escalation_level, step.level), now
            touched[alert.pk] = alert
            channels = [channel for channel in step.channels.all() if channel.enabled]
            if channels and alert.notified_at is None:
                alert.notified_at = now  # somebody was told it fires: it owes them its resolution
            title = (f"Escalated to level {step.level} ({step.title}) of {policy.name}: unacknowledged "
                     f"{int(minutes)} min after it fired")
            events.append(AlertEvent(alert=alert, kind=AlertEvent.Kind.ESCALATED, at=now,
                                     message=(title if channels else f"{title}; this level has no channel")[:500],
                                     detail={"policy": policy.pk, "level": step.level,
                                             "channels": [channel.pk for channel in channels]}))
            for channel in channels:
                _queue(planned, channel=channel, route=None, kind=Notification.Kind.ESCALATION, alerts=[alert],
                       group_key=f"escalation:{alert.fingerprint}:{policy.pk}:{step.level}", now=now, title=title)


def channel_test(*, channel: NotificationChannel, user, address: str | None = None) -> Notification:
    """Sends a test message to a channel now, in this process, and returns the notification with its outcome."""
    from queues.audit import audit
    from queues.models import UtcNow

    now = timezone.now()
    body = message_compose(kind=Notification.Kind.TEST, alerts=[], group_key=f"test:{channel.pk}",
                           title=f"Test notification from the RQ Ops Portal to '{channel.name}'")
    # Claimed on the database's clock, which judges a claim stale: an admin host behind it would have its test
    # taken back by the dispatcher (and sent twice) while the send is still running.
    notification = Notification.objects.create(channel=channel, kind=Notification.Kind.TEST, subject=body["subject"],
                                               body=body, next_attempt_at=now, created_by=user,
                                               status=Notification.Status.SENDING, claimed_at=UtcNow())
    audit(user=user, action="channel_test", target=f"channel {channel.pk}: {channel.name}", count=1, address=address)
    notification_deliver(notification_id=notification.pk, attempt=0, worker="admin", retry=False)
    notification.refresh_from_db()
    return notification


def channel_enable(*, channel: NotificationChannel, user, address: str | None = None) -> NotificationChannel:
    """Turns a channel back on after it was disabled for permanent failures (the counter starts again)."""
    from queues.audit import audit

    with transaction.atomic():
        NotificationChannel.objects.filter(pk=channel.pk).update(enabled=True, permanent_failures=0,
                                                                 disabled_reason="", disabled_at=None)
        audit(user=user, action="channel_enable", target=f"channel {channel.pk}: {channel.name}", count=1,
              detail={"was": channel.disabled_reason}, address=address)
    channel.refresh_from_db()
    return channel


def workers_take_notifications() -> bool:
    """Whether a live worker listens to ``urgent`` and may take jobs from it (not paused, processing not
    suspended): otherwise a notification job would wait in Redis and nobody would be told (the "no workers" alert
    itself must reach someone)."""
    from queues import broker
    from queues import control

    if control.processing_suspended() or "urgent" in control.paused_queues():
        return False
    workers = [worker for worker in broker.workers() if "urgent" in worker.queue_names()]
    alive = broker.alive_states([worker.name for worker in workers])
    return any(alive.get(worker.name) is not None for worker in workers)


def stale_claims():
    """Notifications claimed for sending that nobody acted on for SENDING_LEASE_SECONDS, on the database's clock
    (every claim is written with it): the dispatcher takes these back."""
    from queues.models import database_now_expression

    return Notification.objects.filter(status=Notification.Status.SENDING,
                                       claimed_at__lt=database_now_expression(-SENDING_LEASE_SECONDS))


def notifications_dispatch(*, now: datetime | None = None, inline_budget: int = INLINE_BUDGET,
                           keep_lease=None) -> dict:
    """Hands due notifications to the workers (an RQ job each) when a live worker takes them, or sends them here
    (Redis down, no worker listening, urgent paused). A claim nobody acted on for SENDING_LEASE_SECONDS (its job
    was lost, its worker died mid-send, the workers are all busy) is sent here too. ``keep_lease`` is called
    between sends here (each can take the transport's timeout), so the evaluator's lease outlives a long run of
    them. Due is judged on the database's clock, which wrote every ``next_attempt_at`` (``now``: a given time
    instead)."""
    from queues import broker
    from queues.models import UtcNow, database_now_expression

    stale = list(stale_claims().values_list("pk", "attempts", "claimed_at")[:inline_budget])
    due = list(Notification.objects.filter(status=Notification.Status.PENDING,
                                           next_attempt_at__lte=now or database_now_expression())
               .order_by("next_attempt_at").values_list("pk", "attempts")[:200])
    queued = inline = taken_back = 0
    to_workers = None
    here: list[tuple[int, int]] = []
    for pk, attempts, claimed_at in stale:
        if Notification.objects.filter(pk=pk, status=Notification.Status.SENDING, attempts=attempts,
                                       claimed_at=claimed_at).update(claimed_at=UtcNow()):
            here.append((pk, attempts))
            taken_back += 1
    for pk, attempts in due:
        if not Notification.objects.filter(pk=pk, status=Notification.Status.PENDING, attempts=attempts).update(
                status=Notification.Status.SENDING, claimed_at=UtcNow()):
            continue  # another dispatcher took it
        if to_workers is None:
            try:
                to_workers = workers_take_notifications()
            except (broker.BrokerUnavailable, *broker.REDIS_ERRORS):
                to_workers = False
        if to_workers:
            try:
                broker.enqueue_call("monitoring.jobs.notification_deliver", args=(pk, attempts),
                                    job_id=f"notify-{pk}-{attempts}", queue="urgent", timeout=NOTIFY_JOB_TIMEOUT,
                                    description="alert notification")
                queued += 1
                continue
            except broker.BrokerUnavailable:
                to_workers = False
        here.append((pk, attempts))
    for index, (pk, attempts) in enumerate(here):
        if index >= inline_budget:  # give the rest back for the next pass
            Notification.objects.filter(pk=pk, status=Notification.Status.SENDING, attempts=attempts).update(
                status=Notification.Status.PENDING)
            continue
        if keep_lease is not None and index and not keep_lease():
            Notification.objects.filter(pk=pk, status=Notification.Status.SENDING, attempts=attempts).update(
                status=Notification.Status.PENDING)
            continue  # another evaluator is active now: it sends the rest
        notification_deliver(notification_id=pk, attempt=attempts, worker="evaluator")
        inline += 1
    return {"queued": queued, "inline": inline, "taken_back": taken_back}


def notification_deliver(*, notification_id: int, attempt: int, worker: str = "", retry: bool = True) -> str:
    """Sends one notification through its channel's transport, if it is still this attempt's to send; records the
    attempt. Returns the notification's status afterwards (or "skipped")."""
    from monitoring.alerts.transports import Message, TransportError, transport_for
    from queues.models import UtcNow, database_now_expression

    # The claim is renewed as the send starts: the evaluator takes back only a claim nobody acted on for
    # SENDING_LEASE_SECONDS, never a send in progress.
    if not Notification.objects.filter(pk=notification_id, status=Notification.Status.SENDING,
                                       attempts=attempt).update(attempts=F("attempts") + 1, claimed_at=UtcNow()):
        return "skipped"  # delivered already, or taken back and handed out again
    notification = Notification.objects.select_related("channel").get(pk=notification_id)
    channel = notification.channel
    started = time.monotonic()
    http_status, error, outcome = None, "", DeliveryAttempt.Outcome.DELIVERED
    blames_channel = True
    if not channel.enabled:
        outcome, error = DeliveryAttempt.Outcome.PERMANENT, f"the channel is disabled: {channel.disabled_reason}"
    else:
        body = notification.body
        message = Message(kind=body["kind"], status=body["status"], subject=body["subject"], text=body["text"],
                          group_key=body["group_key"], portal_url=body["portal_url"], alerts=body["alerts"])
        try:
            delivery = transport_for(channel.kind, channel.config).send(message, timeout=SEND_TIMEOUT)
            http_status = delivery.http_status
        except TransportError as failure:
            http_status, error = failure.http_status, failure.message
            blames_channel = not failure.settings_fault
            outcome = DeliveryAttempt.Outcome.PERMANENT if failure.permanent else DeliveryAttempt.Outcome.TRANSIENT
        except Exception as failure:  # a transport bug must not leave the notification in "sending"
            # The exception's text is logged only: it can hold the channel's URL (a secret for Slack).
            logger.exception("notification %s: the %s transport failed", notification_id, channel.kind)
            outcome, error = DeliveryAttempt.Outcome.TRANSIENT, f"{type(failure).__name__} in the {channel.kind} " \
                                                                f"transport (see the evaluator's or worker's log)"
    duration_ms = int((time.monotonic() - started) * 1000)
    now = timezone.now()
    attempts = notification.attempts
    if outcome == DeliveryAttempt.Outcome.DELIVERED:
        status = Notification.Status.DELIVERED
    elif outcome == DeliveryAttempt.Outcome.PERMANENT:
        status = Notification.Status.FAILED
    elif retry and attempts < Notification.MAX_ATTEMPTS:
        status = Notification.Status.PENDING
    else:
        status = Notification.Status.GAVE_UP
    backoff = Notification.BACKOFF_SECONDS[min(attempts - 1, len(Notification.BACKOFF_SECONDS) - 1)]
    with transaction.atomic():
        DeliveryAttempt.objects.create(notification=notification, channel=channel, at=now, outcome=outcome,
                                       http_status=http_status, error=error[:500], duration_ms=duration_ms,
                                       worker=worker[:200])
        # Only this attempt's own claim is ended: a late first attempt never turns a later delivery back.
        Notification.objects.filter(pk=notification.pk, status=Notification.Status.SENDING,
                                    attempts=attempts).update(
            status=status, last_error=error[:500], delivered_at=now if status == Notification.Status.DELIVERED
            else None, next_attempt_at=database_now_expression(backoff), claimed_at=None)
        if outcome == DeliveryAttempt.Outcome.DELIVERED:
            NotificationChannel.objects.filter(pk=channel.pk).update(permanent_failures=0)
        elif outcome == DeliveryAttempt.Outcome.PERMANENT and channel.enabled and blames_channel:
            NotificationChannel.objects.filter(pk=channel.pk).update(permanent_failures=F("permanent_failures") + 1)
            NotificationChannel.objects.filter(
                pk=channel.pk, enabled=True, permanent_failures__gte=NotificationChannel.DISABLE_AFTER).update(
                enabled=False, disabled_at=now,
                disabled_reason=f"disabled after {NotificationChannel.DISABLE_AFTER} permanent failures in a row; "
                                f"last: {error}"[:500])
        if notification.kind != Notification.Kind.TEST:
            what = f"{notification.get_kind_display().lower()} message to {channel.name}"
            if status == Notification.Status.DELIVERED:
                kind, text = AlertEvent.Kind.NOTIFIED, f"{what} delivered"
            elif status == Notification.Status.PENDING:
                kind, text = AlertEvent.Kind.NOTIFICATION_FAILED, f"{what} failed ({error}); retry in {backoff} s"
            else:
                kind, text = AlertEvent.Kind.NOTIFICATION_FAILED, f"{what} failed for good: {error}"
            AlertEvent.objects.bulk_create([
                AlertEvent(alert_id=alert_id, kind=kind, at=now, message=text[:500],
                           detail={"notification": notification.pk, "channel": channel.pk, "http_status": http_status,
                                   "attempt": attempts})
                for alert_id in notification.alerts.values_list("pk", flat=True)])
    return status
