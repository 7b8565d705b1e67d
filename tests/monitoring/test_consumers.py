"""The live dashboard WebSocket: staff get snapshots over the real Redis channel layer; others are refused."""

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
