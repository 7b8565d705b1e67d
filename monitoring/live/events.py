"""Who watches the live dashboards, and the pushes that are not samples: fleet events and alert changes.

Presence: the live sampler (monitoring.live.dashboard) computes and sends samples only while someone watches. Channels
cannot say how many members a group has, and channels-redis keeps a member for a day after its process dies, so
the consumers keep their own presence: each connected ``MetricsConsumer`` is a member of a Redis sorted set scored
by the time it last renewed its entry. ``watcher_join`` adds it and starts a task that renews it every
``WATCHER_REFRESH`` seconds while the WebSocket is open; ``watcher_leave`` stops the task and removes it. The
sampler counts entries renewed within ``WATCHER_TTL``: a consumer whose process died stops renewing and stops
counting within a minute, without anyone cleaning up after it.

Events: a FleetEvent or AlertEvent row announces itself when its transaction commits (``events_announce``, from a
post_save receiver and the signal AlertEvent's bulk_create sends), whichever process wrote it: supervisor,
evaluator, admin.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.urls import reverse

from queues import broker
from queues.errors import BrokerUnavailable

logger = logging.getLogger(__name__)

METRICS_GROUP = "metrics"  # the channel group of every connected dashboard
LAST_SAMPLE_KEY = "portal:metrics:live:last"
LAST_SAMPLE_TTL = 10  # seconds: a dashboard connecting later than this after the last sample waits for the next
WATCHERS_KEY = "portal:metrics:watchers"
WATCHER_REFRESH = 20.0  # seconds between renewals of a connected consumer's entry
WATCHER_TTL = 60.0  # an entry not renewed for this long belongs to a consumer that is gone

UNAVAILABLE = (BrokerUnavailable, *broker.UNAVAILABLE_ERRORS)


def watcher_add(channel_name: str, *, now: float | None = None) -> None:
    """Records (or renews) a watching consumer; entries nobody renews for an hour are removed on the way."""
    now = time.time() if now is None else now
    pipe = broker.get_connection().pipeline(transaction=False)
    pipe.zadd(WATCHERS_KEY, {channel_name: now})
    pipe.zremrangebyscore(WATCHERS_KEY, "-inf", now - 3600)
    pipe.execute()


def watcher_remove(channel_name: str) -> None:
    broker.get_connection().zrem(WATCHERS_KEY, channel_name)


def watchers_count(*, now: float | None = None, connection=None) -> int:
    """Consumers connected now (their entry renewed within WATCHER_TTL), on any ASGI server."""
    now = time.time() if now is None else now
    return (connection or broker.get_connection()).zcount(WATCHERS_KEY, now - WATCHER_TTL, "+inf")


async def watcher_join(consumer) -> None:
    """For the consumer's ``connect()``: counts it as watching until ``watcher_leave`` (or until its process dies)."""
    try:
        await sync_to_async(watcher_add, thread_sensitive=False)(consumer.channel_name)
    except UNAVAILABLE:
        logger.warning("could not record a dashboard watcher; the renewal tries again", exc_info=True)
    consumer.watcher_renewal = asyncio.ensure_future(_renew(consumer.channel_name))


async def watcher_leave(consumer) -> None:
    """For the consumer's ``disconnect()`` (also called when ``connect()`` refused the user: then it does nothing)."""
    renewal = getattr(consumer, "watcher_renewal", None)
    if renewal is None:
        return
    renewal.cancel()
    try:
        await sync_to_async(watcher_remove, thread_sensitive=False)(consumer.channel_name)
    except UNAVAILABLE:
        logger.warning("could not remove a dashboard watcher; it expires on its own", exc_info=True)


async def _renew(channel_name: str) -> None:
    while True:
        await asyncio.sleep(WATCHER_REFRESH)
        try:
            await sync_to_async(watcher_add, thread_sensitive=False)(channel_name)
        except UNAVAILABLE:
            logger.debug("could not renew a dashboard watcher", exc_info=True)


def last_sample() -> str | None:
    """The live sampler's newest sample as the JSON text it sent, if it sent one in the last LAST_SAMPLE_TTL s."""
    raw = broker.get_connection().get(LAST_SAMPLE_KEY)
    return raw.decode() if raw else None


# --- fleet events and alert changes, pushed when they happen ---------------------------------------------------

def _fleet_payload(event) -> dict:
    subject = event.worker_name or (event.pool.name if event.pool_id and event.pool else "") or event.host
    level = "error" if event.kind == "worker_crashed" else "info"
    text = event.get_kind_display() + (f": {subject}" if subject else "") + (f" ({event.reason})" if event.reason
                                                                             else "")
    return {"source": "fleet", "id": event.pk, "at": event.at.isoformat(), "kind": event.kind, "level": level,
            "text": text[:300], "url": reverse("admin:queues_fleetevent_change", args=[event.pk])}


ALERT_LEVELS = {"firing": "error", "returned": "error", "escalated": "error", "notification_failed": "warning",
                "pending": "warning", "resolved": "ok", "cleared": "ok"}


def _alert_payload(event) -> dict:
    alert = event.alert
    text = f"{event.get_kind_display()}: [{alert.severity}] {alert.summary or alert.name}"
    return {"source": "alert", "id": event.pk, "at": event.at.isoformat(), "kind": event.kind,
            "level": ALERT_LEVELS.get(event.kind, "info"), "text": text[:300],
            "url": reverse("admin:monitoring_alert_change", args=[event.alert_id])}


def event_payloads(rows) -> list[dict]:
    """Ticker lines of FleetEvent and AlertEvent rows (alert events need their alert: select_related it, or it
    is read here in one query)."""
    from monitoring.models import Alert, AlertEvent

    rows = [row for row in rows if row.pk is not None]
    missing = {row.alert_id for row in rows if isinstance(row, AlertEvent) and "alert" not in row._state.fields_cache}
    if missing:
        alerts = Alert.objects.in_bulk(list(missing))
        for row in rows:
            if isinstance(row, AlertEvent) and row.alert_id in alerts:
                row.alert = alerts[row.alert_id]
    return [(_alert_payload if isinstance(row, AlertEvent) else _fleet_payload)(row) for row in rows]


class _Announcer:
    """Sends event pushes from a daemon thread of this process, so that writing a fleet event or an alert change
    never waits for Redis (a frozen Redis would hold a supervisor for a socket timeout per event otherwise)."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue(maxsize=1000)
        self._pid: int | None = None
        self._lock = threading.Lock()

    def put(self, payloads: list[dict], group: str) -> None:
        with self._lock:
            if self._pid != os.getpid():  # one sender per process, started again in a forked child
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="dashboard-events", daemon=True).start()
        try:
            self._queue.put_nowait((payloads, group))
        except queue.Full:  # Redis has been away for a while: these lines stay in the history only
            logger.debug("dashboard event pushes dropped: the queue is full")

    def _run(self) -> None:
        connection = url = None
        while True:
            payloads, group = self._queue.get()
            try:
                # Its own connection with a short timeout: a frozen Redis holds the pushes behind it 2 s at most.
                if connection is None or url != settings.REDIS_URL:
                    connection, url = broker.dedicated_connection(socket_timeout=2), settings.REDIS_URL
                if watchers_count(connection=connection):
                    text = json.dumps({"type": "events", "data": payloads}, separators=(",", ":"))
                    async_to_sync(get_channel_layer().group_send)(group, {"type": "metrics.update", "text": text})
            except Exception:  # Redis down, the channel layer full: the rows stay, the push is skipped
                logger.debug("could not push dashboard events", exc_info=True)
                connection = None  # connect afresh next time


ANNOUNCER = _Announcer()


def events_announce(rows, *, group: str = METRICS_GROUP) -> None:
    """Pushes new FleetEvent/AlertEvent rows to the dashboards once their transaction commits, if anyone watches.
    The caller never waits for Redis and never fails because of the push: the rows are the record, the push a
    courtesy (a dashboard that missed one reads it from the history on its next load)."""
    rows = list(rows)
    if not rows:
        return

    def send():
        try:
            payloads = event_payloads(rows)
        except Exception:
            logger.debug("could not describe dashboard events", exc_info=True)
            return
        if payloads:
            ANNOUNCER.put(payloads, group)

    transaction.on_commit(send)


def _saved(sender, instance, created, **kwargs) -> None:
    if created and not kwargs.get("raw"):
        events_announce([instance])


def _bulk_created(sender, rows, **kwargs) -> None:
    events_announce(rows)


def connect_signals() -> None:
    """From monitoring's AppConfig.ready(): fleet events (written by queues) and alert events announce themselves,
    saved one by one (post_save) or in bulk (AlertEvent's manager sends ``alert_events_created``)."""
    from django.db.models.signals import post_save

    from monitoring.models import AlertEvent, alert_events_created
    from queues.models import FleetEvent

    post_save.connect(_saved, sender=FleetEvent, dispatch_uid="monitoring.live.events.fleet_event")
    post_save.connect(_saved, sender=AlertEvent, dispatch_uid="monitoring.live.events.alert_event")
    alert_events_created.connect(_bulk_created, sender=AlertEvent, dispatch_uid="monitoring.live.events.alert_events")
