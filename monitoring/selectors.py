"""Reads that need thought: queue figures for pages and live dashboards, the alert summary. They never change
Redis."""

from datetime import datetime

from django.db.models import Avg, Count, F, Q, Sum
from django.db.models.functions import Coalesce

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


def alerts_summary(*, since: datetime, until: datetime) -> dict:
    """Alerts that started in [since, until): totals, per rule and per severity, with the mean times to acknowledge
    and to resolve (``mtta``, ``mttr``: timedeltas or None). Every figure is an aggregate in the database (a few
    GROUP BY queries, whatever the number of alerts). The times count from firing (``fired_at``), over the alerts
    that fired: an alert that cleared while pending was never anyone's to acknowledge."""
    from monitoring.models import Alert, Severity

    alerts = Alert.objects.filter(started_at__gte=since, started_at__lt=until).order_by()
    fired = Q(fired_at__isnull=False)
    start = Coalesce("fired_at", "started_at")
    figures = {
        "total": Count("id"), "fired": Count("id", filter=fired),
        "acknowledged": Count("id", filter=fired & Q(acknowledged_at__isnull=False)),
        "resolved": Count("id", filter=Q(resolved_at__isnull=False)), "flaps": Coalesce(Sum("flaps"), 0),
        "mtta": Avg(F("acknowledged_at") - start, filter=fired),
        "mttr": Avg(F("resolved_at") - start, filter=fired),
    }
    totals = alerts.aggregate(**figures)
    rules = list(alerts.values("name", "rule").annotate(**figures).order_by("-total", "name"))
    for row in (totals, *rules):
        row["noise"] = row["total"] + row["flaps"]
    by_severity = dict(alerts.values_list("severity").annotate(count=Count("id")))
    severities = [(value, by_severity.get(value, 0)) for value, _ in Severity.choices]
    noisiest = sorted(rules, key=lambda row: (-row["noise"], row["name"]))[:5]  # one row per rule, not per alert
    return {"totals": totals, "rules": rules, "severities": severities, "noisiest": noisiest}
