"""The live dashboard WebSocket through the application's real stack (origin check, session authentication, the
consumer) and the real Redis channel layer: who is let in, who is refused with which code, group fan-out, and a
user demoted while connected."""

import asyncio
import json

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Group
from django.test import Client

from monitoring.live.consumers import FORBIDDEN, NOT_AUTHENTICATED, MetricsConsumer
from monitoring.live.events import LAST_SAMPLE_KEY, METRICS_GROUP, WATCHERS_KEY
from portal.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = b"http://127.0.0.1:8000"


def log_in(user) -> tuple[Client, bytes]:
    """A client with a session of its own for ``user`` (logging another user in on one client ends the first's
    session), and the cookie a browser would send with the WebSocket handshake."""
    client = Client()
    client.force_login(user)
    return client, f"sessionid={client.cookies['sessionid'].value}".encode()


def session_cookie(user) -> bytes:
    return log_in(user)[1]


def communicator(cookie: bytes | None = None, origin: bytes = ORIGIN) -> WebsocketCommunicator:
    headers = [(b"origin", origin), (b"host", b"127.0.0.1:8000")]
    if cookie:
        headers.append((b"cookie", cookie))
    return WebsocketCommunicator(application, "/ws/metrics/", headers=headers)


def probe(text: str = "probe") -> dict:
    return {"type": "metrics.update", "text": json.dumps({"type": "sample", "data": {"probe": text}})}


async def next_text(socket: WebsocketCommunicator, timeout: float = 5) -> dict:
    return json.loads(await socket.receive_from(timeout=timeout))


def test_a_user_who_may_view_the_queues_gets_the_last_sample_then_every_group_message(redis, support_user):
    redis.set(LAST_SAMPLE_KEY, json.dumps({"type": "sample", "data": {"probe": "last"}}))
    cookie = session_cookie(support_user)  # Support is read-only, but may watch

    async def run():
        socket = communicator(cookie)
        connected, _ = await socket.connect()
        assert connected
        first = await next_text(socket)
        watching = await sync_to_async(redis.zcard)(WATCHERS_KEY)
        await get_channel_layer().group_send(METRICS_GROUP, probe("pushed"))
        second = await next_text(socket)
        await socket.disconnect()
        return first, watching, second

    first, watching, second = async_to_sync(run)()
    assert first == {"type": "sample", "data": {"probe": "last"}}
    assert watching == 1 and second["data"] == {"probe": "pushed"}
    assert redis.zcard(WATCHERS_KEY) == 0  # leaving removes the presence: the sampler stops when nobody watches


def test_one_group_message_reaches_every_connected_dashboard(redis, admin_user, support_user):
    cookies = [session_cookie(admin_user), session_cookie(support_user)]

    async def run():
        sockets = [communicator(cookie) for cookie in cookies]
        for socket in sockets:
            assert (await socket.connect())[0]
        await get_channel_layer().group_send(METRICS_GROUP, probe("fan-out"))
        received = [await next_text(socket) for socket in sockets]
        for socket in sockets:
            await socket.disconnect()
        return received

    received = async_to_sync(run)()
    assert [message["data"] for message in received] == [{"probe": "fan-out"}] * 2


def handshake(cookie: bytes | None, origin: bytes = ORIGIN):
    """(accepted, the close that followed or None): a refused user is accepted and closed at once, so that the
    browser sees the code (a close before the handshake completes reaches it as an HTTP 403, code 1006)."""
    async def run():
        socket = communicator(cookie, origin)
        connected, code = await socket.connect()
        if not connected:
            return False, code
        # receive_nothing leaves the consumer running when nothing comes (receive_output would cancel it).
        message = None if await socket.receive_nothing(timeout=0.5) else await socket.receive_output(timeout=1)
        await socket.disconnect()
        return True, message.get("code") if message and message["type"] == "websocket.close" else None

    return async_to_sync(run)()


def test_not_logged_in_is_refused_with_4401(redis):
    assert handshake(None) == (True, NOT_AUTHENTICATED)


def test_users_without_the_view_permission_are_refused_with_4403(redis, outsider_user, django_user_model):
    assert handshake(session_cookie(outsider_user)) == (True, FORBIDDEN)  # not staff
    staff_only = django_user_model.objects.create_user(username="stan-staff", password="pw", is_staff=True)
    assert handshake(session_cookie(staff_only)) == (True, FORBIDDEN)  # staff, no permission
    assert redis.zcard(WATCHERS_KEY) == 0  # a refused socket never counts as watching


def test_a_page_from_another_origin_is_refused_before_the_session_is_read(redis, admin_user):
    cookie = session_cookie(admin_user)
    assert handshake(cookie, origin=b"http://evil.example") == (False, 1000)  # AllowedHostsOriginValidator
    assert handshake(cookie) == (True, None)  # the same session from the portal's own origin stays open


@pytest.mark.parametrize("change, code", [("demoted", FORBIDDEN), ("permission_removed", FORBIDDEN),
                                          ("logged_out", NOT_AUTHENTICATED)])
def test_a_user_who_loses_access_while_watching_stops_receiving(redis, support_user, monkeypatch, change,
                                                                code):
    monkeypatch.setattr(MetricsConsumer, "recheck_seconds", 0.2)
    client, cookie = log_in(support_user)

    def take_access_away():
        if change == "demoted":
            support_user.is_staff = False
            support_user.save(update_fields=["is_staff"])
        elif change == "permission_removed":
            support_user.groups.remove(Group.objects.get(name="Support"))
        else:
            client.logout()  # the session row is deleted

    async def run():
        socket = communicator(cookie)
        assert (await socket.connect())[0]
        await get_channel_layer().group_send(METRICS_GROUP, probe("before"))
        before = await next_text(socket)
        await sync_to_async(take_access_away)()
        closed = await socket.receive_output(timeout=5)
        await get_channel_layer().group_send(METRICS_GROUP, probe("after"))
        await asyncio.sleep(0.3)
        after = await socket.receive_nothing(timeout=0.3)
        await socket.disconnect()
        return before, closed, after

    before, closed, after = async_to_sync(run)()
    assert before["data"] == {"probe": "before"}
    assert closed == {"type": "websocket.close", "code": code}
    assert after is True  # nothing arrives after the close


def test_two_hundred_dashboards_connecting_at_once_are_all_let_in(redis, support_user):
    """bench/live.py found 100 of 200 simultaneous connections refused (HTTP 500): the channel layer's Redis pool
    held 100 connections (redis-py's default) and raised MaxConnectionsError in group_add instead of waiting."""
    cookie = session_cookie(support_user)

    async def run():
        sockets = [communicator(cookie) for _ in range(200)]
        results = await asyncio.gather(*(socket.connect(timeout=30) for socket in sockets),
                                       return_exceptions=True)
        await get_channel_layer().group_send(METRICS_GROUP, probe("everyone"))
        received = await asyncio.gather(*(next_text(socket, timeout=30) for socket, result in zip(sockets, results)
                                          if result is True or result == (True, None)), return_exceptions=True)
        await asyncio.gather(*(socket.disconnect() for socket in sockets), return_exceptions=True)
        return results, received

    results, received = async_to_sync(run)()
    assert [result for result in results if not (isinstance(result, tuple) and result[0])] == []
    assert [message["data"] for message in received if isinstance(message, dict)] == [{"probe": "everyone"}] * 200
    assert redis.zcard(WATCHERS_KEY) == 0
    assert redis.zcard("portal:channels:group:metrics") == 0  # every consumer left the group as it closed
