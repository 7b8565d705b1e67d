"""Who watches the watchers: the portal's own monitors (the sampler and the alert evaluator) record each pass, and
one that has been silent for ``SILENT_INTERVALS`` of its intervals is reported.

- ``monitor_pass`` is called by the sampler once a minute (after a sample) and by the active evaluator as each pass
  begins: two UPDATEs of a two-row table, on the database's clock.
- The health report shows a component per monitor with the age of its last pass, and /metrics exports
  ``rq_monitor_last_pass_timestamp_seconds`` and ``rq_monitor_interval_seconds`` (snapshot.monitors).
- The ``monitoring-stale`` rule (signal ``monitoring_silent``) fires when either has been silent that long. One that
  never ran has no pass to age: it counts as silent from the start of the other's present run of passes (``since``),
  in the intervals it would have (``expected_interval``), so a deployment without a sampler pages three minutes after
  its evaluator starts, while a start of both does not page. The
  evaluator judges it for the sampler; the sampler judges it, and sends what is due, when the evaluator is the one
  that went silent (``monitoring.alerts.watch``). When both are silent nothing in the portal can page: Prometheus'
  ``RQPortalMonitoringDown`` (exported beside the rules, notified by Alertmanager) covers that case, and the
  always-firing ``RQWatchdog`` proves to an outside dead man's switch that Prometheus and Alertmanager work.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from monitoring.models import MonitorPass

logger = logging.getLogger(__name__)

SAMPLER, EVALUATOR = "sampler", "evaluator"
MONITORS = (SAMPLER, EVALUATOR)
SILENT_INTERVALS = 3
SAMPLER_INTERVAL = 60.0  # one sample a minute
COMMANDS = {SAMPLER: "manage.py run_sampler", EVALUATOR: "manage.py evaluate_alerts"}


def monitor_pass(name: str, *, holder: str, interval: float) -> None:
    """Records that ``name`` did its work now; a pass after ``SILENT_INTERVALS`` of silence begins a new run."""
    from queues.models import UtcNow, database_now_expression

    values = {"holder": holder[:200], "interval_seconds": interval}
    silent_before = database_now_expression(-math.ceil(SILENT_INTERVALS * interval))
    MonitorPass.objects.filter(Q(since__isnull=True) | Q(at__lt=silent_before), name=name).update(since=UtcNow())
    if MonitorPass.objects.filter(name=name).update(at=UtcNow(), **values):
        return
    try:
        with transaction.atomic():
            MonitorPass.objects.create(name=name, at=UtcNow(), since=UtcNow(), **values)
    except IntegrityError:  # another process created it meanwhile
        MonitorPass.objects.filter(name=name).update(at=UtcNow(), **values)


@dataclass(frozen=True)
class MonitorState:
    """A monitor's last pass. Its age is measured on the database's clock, which wrote ``at``, when it is read
    (``age_at_read``), and grows with the reader's own clock from then (``read_at``): a host whose clock runs ahead
    of the database's or behind it judges the same age."""
    name: str
    at: datetime
    interval: float
    holder: str
    age_at_read: float
    read_at: datetime
    run_age_at_read: float  # since the present run of passes began

    def age(self, now: datetime) -> float:
        return max(0.0, self.age_at_read + (now - self.read_at).total_seconds())

    def passing_for(self, now: datetime) -> float:
        """How long its present run of passes has lasted."""
        return max(0.0, self.run_age_at_read + (now - self.read_at).total_seconds())

    def silent_intervals(self, now: datetime) -> float:
        return self.age(now) / self.interval if self.interval > 0 else 0.0

    def silent(self, now: datetime) -> bool:
        return self.silent_intervals(now) >= SILENT_INTERVALS


def monitors_read() -> dict[str, MonitorState]:
    """The monitors that ever passed, with the database's clock (one small query); raises DatabaseError like any
    read."""
    from queues.models import database_now_expression

    read_at = timezone.now()
    return {row.name: MonitorState(row.name, row.at, row.interval_seconds, row.holder,
                                   max(0.0, (row.database_now - row.at).total_seconds()), read_at,
                                   max(0.0, (row.database_now - (row.since or row.at)).total_seconds()))
            for row in MonitorPass.objects.order_by().annotate(database_now=database_now_expression())}


def expected_interval(name: str) -> float:
    """The interval of a monitor that never ran, so has none recorded: its default."""
    return SAMPLER_INTERVAL if name == SAMPLER else settings.ALERTS_EVALUATION_INTERVAL


def monitor_silent_intervals(monitors: dict[str, MonitorState], name: str, now: datetime) -> float | None:
    """How many of its intervals ``name`` has been silent: since its last pass; for one that never ran, since the
    other one began its present run of passes (it could have passed all that time). None when neither ever ran."""
    state = monitors.get(name)
    if state is not None:
        return state.silent_intervals(now)
    other = next((monitors[other] for other in MONITORS if other != name and other in monitors), None)
    return None if other is None else other.passing_for(now) / expected_interval(name)


def monitor_components(monitors: dict[str, MonitorState] | None, now: datetime) -> dict[str, dict]:
    """The health report's components: one per monitor, with the age of its last pass. A monitor that never ran or
    went silent is a warning: the queue system works, but its monitoring does not (the monitoring-stale rule
    pages)."""
    components = {}
    for name in MONITORS:
        state = (monitors or {}).get(name)
        if monitors is None:
            components[name] = {"status": "warning", "reason": "unknown: the database does not answer",
                                "last_pass_age_seconds": None}
        elif state is None:
            components[name] = {"status": "warning", "reason": f"has never run ({COMMANDS[name]})",
                                "last_pass_age_seconds": None}
        else:
            age = round(state.age(now), 1)
            if state.silent(now):
                components[name] = {"status": "warning", "last_pass_age_seconds": age,
                                    "reason": f"silent for {age:g} s ({state.silent_intervals(now):.1f} of its "
                                              f"{state.interval:g} s intervals; {COMMANDS[name]})"}
            else:
                components[name] = {"status": "healthy", "reason": f"last pass {age:g} s ago",
                                    "last_pass_age_seconds": age}
    return components
