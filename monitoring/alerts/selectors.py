"""Reads of the alert history for pages and APIs: the current alerts (``/api/rq/alerts``), the summary of a
period (mean times to acknowledge and resolve) and the history's label filter."""

from datetime import datetime

from django.db.models import Avg, Count, F, Q, QuerySet, Sum
from django.db.models.fields.json import KeyTransform
from django.db.models.functions import Coalesce
from django.utils import timezone

from monitoring.matchers import LABEL_NAME
from monitoring.models import Alert, Severity, queue_label

LEVELS = {Severity.CRITICAL: "critical", Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "info"}

# The old endpoint's metric names for the four conditions it checked (seed 000, get_rq_alerts), by the seeded rule
# that is each condition here. Only those rules answer with them: a rule on the same signal is another condition
# (few-workers is not "no active RQ workers") and answers with its own name, as does every other alert. Its figures
# were counts: the stuck tasks' is the number of tasks PROCESSING for longer than the rule's threshold (the signal
# itself is the oldest one's age, kept in ``signal_value``).
DOCUMENTED_METRICS = {"backlog-high": "queue_backlog", "dead-letters-high": "failed_jobs",
                      "processing-stuck": "stuck_tasks", "no-active-workers": "active_workers"}


def _documented(rule: str | None, value, threshold, now) -> tuple[str | None, object, object]:
    """(metric, value, threshold) as the old endpoint gave them, for a condition it had; (None, ...) for the
    others."""
    metric = DOCUMENTED_METRICS.get(rule)
    if metric is None:
        return None, value, threshold
    if metric == "stuck_tasks":
        from datetime import timedelta

        from queues.models import CaptionTask, TaskStatus

        stuck = CaptionTask.objects.filter(status=TaskStatus.PROCESSING,
                                           started_at__lt=now - timedelta(seconds=threshold or 0)).count()
        return metric, stuck, 0
    return metric, None if value is None else round(value), None if threshold is None else round(threshold)


def alerts_current() -> dict:
    """The open alerts (pending and firing), newest first, in the old endpoint's shape plus ours: the 500 newest
    (``shown``); ``alert_count`` counts them all. ``metric``, ``value`` and ``threshold`` are the old endpoint's for
    the conditions it had (DOCUMENTED_METRICS), every other alert's ``metric`` is its rule's (or Alertmanager's
    alert's) name; the portal's own ``signal`` figures are beside them."""
    from django.conf import settings
    from django.urls import reverse

    # The open alerts are few (Alertmanager's are capped): their keys are sorted here, so the query stays on the
    # state index (ORDER BY started_at would walk the whole history's started_at index), and only the 500 newest
    # rows are loaded.
    keys = sorted(Alert.objects.open().order_by().values_list("started_at", "pk"), reverse=True)[:500]
    by_pk = Alert.objects.select_related("rule", "acknowledged_by").in_bulk([pk for _, pk in keys])
    rows = [by_pk[pk] for _, pk in keys if pk in by_pk]
    alerts = []
    now = timezone.now()
    for alert in rows:
        rule = alert.rule
        signal = rule.signal if rule else None
        metric, value, threshold = _documented(rule.name if rule else None, alert.value, alert.threshold, now)
        alerts.append({
            "id": alert.pk, "level": LEVELS.get(alert.severity, alert.severity), "message": alert.summary,
            "metric": metric or alert.name,
            "value": value, "threshold": threshold,
            "signal": signal, "signal_value": alert.value, "signal_threshold": alert.threshold,
            "timestamp": (alert.fired_at or alert.started_at).isoformat(),
            "state": alert.state, "since": alert.started_at.isoformat(), "rule": alert.name,
            "source": alert.source, "component": alert.component, "labels": alert.labels,
            "acknowledged_by": alert.acknowledged_by.get_username() if alert.acknowledged_by else None,
            "acknowledged_at": alert.acknowledged_at.isoformat() if alert.acknowledged_at else None,
            "inhibited_by": alert.inhibited_by_id, "flaps": alert.flaps,
            "runbook_url": alert.runbook_url or (settings.PORTAL_URL + reverse("admin:monitoring_alertrule_change",
                                                                               args=[rule.pk]) if rule else ""),
            "url": settings.PORTAL_URL + reverse("admin:monitoring_alert_change", args=[alert.pk]),
        })
    total = len(rows) if len(rows) < 500 else Alert.objects.open().count()
    firing = Alert.objects.firing().count() if len(rows) >= 500 else \
        sum(1 for alert in rows if alert.state == Alert.State.FIRING)
    return {"alerts": alerts, "alert_count": total, "firing_count": firing, "shown": len(alerts),
            "timestamp": timezone.now().isoformat()}


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


def label_pairs(text: str) -> list[tuple[str, str]]:
    """``queue=normal`` or ``queue=normal,instance=web-1`` into pairs; ValueError for anything else."""
    pairs = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        key, equals, value = part.partition("=")
        if not equals or not LABEL_NAME.fullmatch(key.strip()):
            raise ValueError(f"label filter {part!r}: write label=value")
        pairs.append((key.strip(), value.strip()))
    return pairs


def alerts_labelled(queryset: QuerySet, pairs: list[tuple[str, str]]) -> QuerySet:
    """The alerts whose labels have every (label, value) of ``pairs``. ``queue`` reads the indexed column the alert
    copies it to; any other label a JSON key (``labels__team="db"`` as an expression, so that no label name is read
    as a lookup), which SQLite and MySQL/MariaDB both support; ``labels__contains`` does not work on SQLite."""
    for index, (key, value) in enumerate(pairs):
        if key == "queue" and value and queue_label({"queue": value}) == value:
            queryset = queryset.filter(queue=value)
            continue
        alias = f"label_{index}"
        queryset = queryset.alias(**{alias: KeyTransform(key, "labels")}).filter(**{alias: value})
    return queryset
