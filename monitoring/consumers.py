"""Live dashboard updates over WebSockets. Staff only; everyone else's connection is closed."""

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from monitoring.selectors import queue_snapshot

METRICS_GROUP = "metrics"


class MetricsConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if not (user and user.is_authenticated and user.is_staff):
            await self.close(code=4403)
            return
        await self.channel_layer.group_add(METRICS_GROUP, self.channel_name)
        await self.accept()
        await self.send_json({"type": "snapshot", "data": await database_sync_to_async(queue_snapshot)()})

    async def disconnect(self, code):
        await self.channel_layer.group_discard(METRICS_GROUP, self.channel_name)

    async def metrics_update(self, event):
        await self.send_json({"type": "snapshot", "data": event["data"]})
