"""Reads that need thought: queue figures for pages and live dashboards. They never change Redis."""

from django.db.models import Count

from queues import broker
from queues.errors import BrokerUnavailable
from queues.models import CaptionTask, TaskStatus


def queue_snapshot() -> dict:
    """Jobs waiting per queue (Redis, O(queues)) and tasks per status (one grouped query)."""
    by_status = dict(CaptionTask.objects.order_by().values_list("status").annotate(count=Count("id")))
    try:
        lengths = broker.queue_lengths()
        redis_ok = True
    except (BrokerUnavailable, *broker.UNAVAILABLE_ERRORS):
        lengths, redis_ok = {}, False
    return {
        "queues": [{"name": name, "waiting": lengths.get(name)} for name in broker.QUEUE_NAMES],
        "tasks": [{"status": status, "label": label, "count": by_status.get(status, 0)}
                  for status, label in TaskStatus.choices],
        "redis": redis_ok,
    }
