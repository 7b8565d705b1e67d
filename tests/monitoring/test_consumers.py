"""The live dashboard WebSocket: users who may view the queues get snapshots over the real Redis channel layer;
others are refused."""

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator

from monitoring.consumers import METRICS_GROUP, MetricsConsumer

pytestmark = pytest.mark.django_db(transaction=True)


def connect(user):
    async def run():
        communicator = WebsocketCommunicator(MetricsConsumer.as_asgi(), "/ws/metrics/")
        communicator.scope["user"] = user
        connected, code = await communicator.connect()
        received = []
        if connected:
            received.append(await communicator.receive_json_from(timeout=5))
            await get_channel_layer().group_send(METRICS_GROUP, {"type": "metrics.update", "data": {"probe": 1}})
            received.append(await communicator.receive_json_from(timeout=5))
        await communicator.disconnect()
        return connected, code, received

    return async_to_sync(run)()


def test_staff_receive_a_snapshot_and_group_updates(redis, admin_user):
    connected, _, received = connect(admin_user)
    assert connected
    snapshot = received[0]["data"]
    assert [queue["name"] for queue in snapshot["queues"]] == ["urgent", "high", "normal", "low"]
    assert snapshot["redis"] is True
    assert received[1] == {"type": "snapshot", "data": {"probe": 1}}


def test_non_staff_are_refused(redis, outsider_user):
    connected, code, received = connect(outsider_user)
    assert not connected and code == 4403 and received == []


def test_support_may_watch_the_live_dashboard(redis, support_user):
    connected, _, received = connect(support_user)
    assert connected and received[1] == {"type": "snapshot", "data": {"probe": 1}}


def test_staff_without_the_view_permission_are_refused(redis, django_user_model):
    staff_only = django_user_model.objects.create_user(username="stan-staff", password="pw", is_staff=True)
    connected, code, received = connect(staff_only)
    assert not connected and code == 4403 and received == []
