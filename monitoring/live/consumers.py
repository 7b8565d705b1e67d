"""The live dashboards' WebSocket, ``/ws/metrics/``, for users who may view the queues overview (the check /metrics
makes for sessions).

portal/asgi.py wraps it in ``AllowedHostsOriginValidator(AuthMiddlewareStack(...))``: a page from another origin
is refused before the handshake, and the session cookie gives the user. Close codes (4000-4999 are the
application's own; the page shows the reason and does not reconnect):

- ``4401``: not logged in, or the session ended (logged out, password changed, user deactivated).
- ``4403``: logged in, but not staff with the ``queues.view_queueoverview`` permission.

A refused socket is accepted and then closed with its code, so the browser sees the code (a refusal before the
handshake reaches it as code 1006, like a network cut).

The user is looked up again from the session every ``RECHECK_SECONDS``: a user removed from staff, or whose
permission was taken away, stops receiving within that time. Every message is sent as text the sampler encoded
once for all consumers.
"""

import asyncio
import logging

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from monitoring.live.events import METRICS_GROUP, UNAVAILABLE, last_sample, watcher_join, watcher_leave
from monitoring.metrics.access import may_view_metrics

logger = logging.getLogger(__name__)

NOT_AUTHENTICATED = 4401
FORBIDDEN = 4403
RECHECK_SECONDS = 30.0

__all__ = ["METRICS_GROUP", "MetricsConsumer", "NOT_AUTHENTICATED", "FORBIDDEN"]


def user_now(scope):
    """The scope's user as the database has it now, from a fresh read of its session: AnonymousUser once the session
    is gone (logout), its password changed or the user was deactivated (django.contrib.auth.get_user's checks).
    Channels' own get_user() would read the session loaded at connect, which never learns of a logout."""
    from importlib import import_module
    from types import SimpleNamespace

    from django.conf import settings
    from django.contrib import auth
    from django.contrib.auth.models import AnonymousUser

    session = scope.get("session")
    if session is None or not session.session_key:
        return AnonymousUser()
    store = import_module(settings.SESSION_ENGINE).SessionStore(session.session_key)
    return auth.get_user(SimpleNamespace(session=store))


def refusal(user) -> int | None:
    """The close code for this user, or None if they may watch."""
    if user is None or not user.is_authenticated:
        return NOT_AUTHENTICATED
    return None if may_view_metrics(user) else FORBIDDEN


class MetricsConsumer(AsyncWebsocketConsumer):
    recheck_seconds = RECHECK_SECONDS  # the tests shorten it

    async def connect(self):
        code = await database_sync_to_async(refusal)(self.scope.get("user"))
        if code is not None:
            # Accepted first: a close before the handshake completes reaches the browser as an HTTP 403 and close
            # code 1006 (uvicorn, daphne), and the page could not tell a refusal from a network cut.
            await self.accept()
            await self.close(code=code)
            return
        await self.channel_layer.group_add(METRICS_GROUP, self.channel_name)
        await self.accept()
        await watcher_join(self)  # the sampler samples only while someone watches
        self.recheck = asyncio.ensure_future(self._recheck_forever())
        try:  # Redis only: not on the thread every database call shares (a frozen Redis would hold them all)
            text = await sync_to_async(last_sample, thread_sensitive=False)()
        except UNAVAILABLE:
            text = None
        if text:
            await self.send(text_data=text)

    async def disconnect(self, code):
        recheck = getattr(self, "recheck", None)
        if recheck is not None:
            recheck.cancel()
        await watcher_leave(self)
        await self.channel_layer.group_discard(METRICS_GROUP, self.channel_name)

    async def dispatch(self, message):
        """Samples go straight to the socket: Channels' dispatch first hands every message to the single thread of
        database work to close stale connections, which with 200 pages meant 200 hops in a row per sample
        (bench/live.py: staleness p95 220 -> 77 ms without it). Passing the text on touches no database."""
        if message["type"] == "metrics.update":
            await self.metrics_update(message)
            return
        await super().dispatch(message)

    async def receive(self, text_data=None, bytes_data=None):
        """The page sends nothing; anything it does send is ignored."""

    async def metrics_update(self, event):
        if not getattr(self, "refused", False):
            await self.send(text_data=event["text"])

    async def _recheck_forever(self):
        while True:
            await asyncio.sleep(self.recheck_seconds)
            try:
                code = await database_sync_to_async(lambda: refusal(user_now(self.scope)))()
            except Exception:  # the database is away: keep the connection, try again next time
                logger.debug("could not re-check a dashboard user", exc_info=True)
                continue
            if code is not None:
                self.refused = True  # nothing more is sent, even what the group delivers before the close completes
                try:
                    await self.channel_layer.group_discard(METRICS_GROUP, self.channel_name)
                except Exception:  # Redis away: the membership expires; the close must happen all the same
                    logger.debug("could not leave the dashboards' group", exc_info=True)
                finally:
                    await self.close(code=code)
                return
