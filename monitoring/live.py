"""Who watches the live dashboards, so that the sampler computes and pushes live figures only while someone does.

The sampler used to compute ``queue_snapshot()`` and send it to the dashboards' channel group every 2 s whether
or not anyone was connected. Channels cannot say how many members a group has, and channels-redis keeps a member
for a day after its process dies, so the consumers keep their own presence: each connected ``MetricsConsumer``
is a member of a Redis sorted set scored by the time it last renewed its entry. ``watcher_join`` adds it and starts
a task that renews it every ``WATCHER_REFRESH`` seconds while the WebSocket is open; ``watcher_leave`` stops the
task and removes it. The sampler counts entries renewed within ``WATCHER_TTL``: a consumer whose process died
stops renewing and stops counting within a minute, without anyone cleaning up after it.

The consumer needs two lines: ``await watcher_join(self)`` in ``connect()`` once accepted, and
``await watcher_leave(self)`` in ``disconnect()``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer

from monitoring.selectors import queue_snapshot
from queues import broker
from queues.errors import BrokerUnavailable

logger = logging.getLogger(__name__)

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


def watchers_count(*, now: float | None = None) -> int:
    """Consumers connected now (their entry renewed within WATCHER_TTL), on any ASGI server."""
    now = time.time() if now is None else now
    return broker.get_connection().zcount(WATCHERS_KEY, now - WATCHER_TTL, "+inf")


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


def dashboards_push(*, group: str, layer=None) -> bool:
    """Sends the live figures to the dashboards' channel group if anyone watches; returns whether it sent.
    While nobody watches this costs one Redis command and no database query."""
    if not watchers_count():
        return False
    layer = layer or get_channel_layer()
    async_to_sync(layer.group_send)(group, {"type": "metrics.update", "data": queue_snapshot()})
    return True
