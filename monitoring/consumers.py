"""Live dashboard updates over WebSockets, for users who may view the queues overview (the same check as /metrics);
everyone else's connection is closed with code 4403 ("forbidden", in the 4000-4999 range for applications)."""

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from monitoring.access import may_view_metrics
from monitoring.live import watcher_join, watcher_leave
from monitoring.selectors import queue_snapshot

METRICS_GROUP = "metrics"
FORBIDDEN = 4403


class MetricsConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        if not await database_sync_to_async(may_view_metrics)(self.scope.get("user")):
            await self.close(code=FORBIDDEN)
            return
        await self.channel_layer.group_add(METRICS_GROUP, self.channel_name)
        await self.accept()
        await watcher_join(self)  # the sampler pushes only while someone watches
        await self.send_json({"type": "snapshot", "data": await database_sync_to_async(queue_snapshot)()})

    async def disconnect(self, code):
        await watcher_leave(self)
        await self.channel_layer.group_discard(METRICS_GROUP, self.channel_name)

    async def metrics_update(self, event):
        await self.send_json({"type": "snapshot", "data": event["data"]})
