"""Reads that need thought: queue figures for pages and live dashboards. They never change Redis."""



from queues import broker
from queues.errors import BrokerUnavailable
from queues.models import CaptionTask, TaskStatus

# Tasks per status are counted up to this many, on the status index: the admin index and the live dashboards show
# "10000+" beyond it. A COUNT ... GROUP BY status over the whole table (what this did before) grows with the
# table and ran every 2 s for the dashboards; this costs at most one bounded index scan per status.
TASK_COUNT_CAP = 10_000


def task_counts_by_status() -> list[dict]:
    """Per status: its label, the count (at most TASK_COUNT_CAP) and whether there are more."""
    rows = []
    for status, label in TaskStatus.choices:
        count = CaptionTask.objects.filter(status=status).order_by()[:TASK_COUNT_CAP + 1].count()
        rows.append({"status": status, "label": label, "count": min(count, TASK_COUNT_CAP),
                     "more": count > TASK_COUNT_CAP})
    return rows


def queue_snapshot() -> dict:
    """Jobs waiting per queue (Redis, O(queues)) and tasks per status (bounded counts, see TASK_COUNT_CAP)."""
    try:
        lengths = broker.queue_lengths()
        redis_ok = True
    except (BrokerUnavailable, *broker.UNAVAILABLE_ERRORS):
        lengths, redis_ok = {}, False
    return {
        "queues": [{"name": name, "waiting": lengths.get(name)} for name in broker.QUEUE_NAMES],
        "tasks": task_counts_by_status(),
        "redis": redis_ok,
    }
