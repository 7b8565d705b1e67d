"""The alert evaluator watched by the sampler: when the evaluator has been silent for SILENT_INTERVALS of its
intervals, the sampler judges the monitoring-stale rule itself and sends what is due (the evaluator judges the
sampler's silence in its own passes)."""

from __future__ import annotations

import logging
from datetime import datetime

from django.db import DatabaseError
from django.utils import timezone

from monitoring.alerts.evaluate import alerts_evaluate
from monitoring.alerts.notify import notifications_dispatch, notifications_plan
from monitoring.metrics.monitors import EVALUATOR, SILENT_INTERVALS, monitor_silent_intervals, monitors_read

logger = logging.getLogger(__name__)


def evaluator_watch(*, now: datetime | None = None) -> dict | None:
    """Run by the sampler after its minute: when the evaluator has been silent for SILENT_INTERVALS of its
    intervals (one that never ran: since this sampler's present run of passes began), the monitoring-stale rule is
    judged here and what is due is sent (the plan's fence keeps an evaluator that comes back meanwhile from writing it
    twice). Returns what it did, or None when the evaluator is fine."""
    now = now or timezone.now()
    try:
        silent = monitor_silent_intervals(monitors_read(), EVALUATOR, now)
    except DatabaseError:
        return None
    if silent is None or silent < SILENT_INTERVALS:
        return None
    logger.warning("the alert evaluator has been silent for %.1f of its intervals: the sampler judges "
                   "monitoring-stale", silent)
    result = alerts_evaluate(now=now, signals={"monitoring_silent"})
    return {"evaluation": result.as_dict(), "planned": len(notifications_plan(now=now)),
            "dispatch": notifications_dispatch()}

