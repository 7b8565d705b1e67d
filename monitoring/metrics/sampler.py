"""Per-minute metric history, performance figures and the capacity report, all computed from recorded samples.

The sampler reads the shared counters and histograms (monitoring.metrics.recorder), subtracts what it saw at the last
sample (kept in Redis with the sample's minute) and writes one ``MetricSample`` per queue plus one for the fleet,
covering the minutes since that sample: one normally, more after the sampler was down. Exactly one
sampler writes each minute however many run: a ``SET NX`` on a key naming the minute. Old minutes are folded into
hourly rows and then deleted, in batches.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from monitoring.metrics.recorder import OUTCOME_STATUS, PROCESSING_BUCKETS, WAIT_BUCKETS, queue_counter
from monitoring.metrics.snapshot import Snapshot, take_snapshot
from monitoring.models import MetricSample
from queues import broker

LAST_KEY = "portal:metrics:sampler:last"
BATCH = 1000


def quantile(buckets: tuple[float, ...], counts: dict[str, float], q: float) -> float | None:
    """Prometheus' histogram_quantile on non-cumulative bucket counts (linear within the bucket)."""
    total = sum(counts.get(f"b{i}", 0.0) for i in range(len(buckets))) + counts.get("inf", 0.0)
    if total <= 0:
        return None
    rank, seen, lower = q * total, 0.0, 0.0
    for index, upper in enumerate(buckets):
        count = counts.get(f"b{index}", 0.0)
        if seen + count >= rank and count > 0:
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
        lower = upper
    return buckets[-1]  # in the +Inf bucket: the best bound we know


def _delta(now: dict, before: dict) -> dict:
    return {key: max(0.0, value - before.get(key, 0.0)) for key, value in now.items()}


def _timings(processing: dict, wait: dict) -> dict:
    """A sample's processing and wait percentiles from one period's bucket counts."""
    return {"processing_p50": quantile(PROCESSING_BUCKETS, processing, 0.5),
            "processing_p95": quantile(PROCESSING_BUCKETS, processing, 0.95),
            "processing_sum": processing.get("sum", 0), "processing_count": int(processing.get("count", 0)),
            "wait_p50": quantile(WAIT_BUCKETS, wait, 0.5), "wait_p95": quantile(WAIT_BUCKETS, wait, 0.95)}


def sample_take(*, now: datetime | None = None, snapshot: Snapshot | None = None) -> list[MetricSample] | None:
    """Writes the samples of the time since the last sample (normally the minute that just ended). Returns None if
    another sampler already sampled this minute."""
    now = now or timezone.now()
    minute = now.replace(second=0, microsecond=0)
    connection = broker.get_connection()
    if not connection.set(f"portal:metrics:sampler:minute:{minute.isoformat()}", "1", nx=True, ex=180):
        return None
    snapshot = snapshot or take_snapshot()
    state = {"minute": minute.isoformat(), "counters": snapshot.counters,
             "histograms": {f"{kind}:{queue}": values for (kind, queue), values in snapshot.histograms.items()}}
    raw_last = connection.getset(LAST_KEY, json.dumps(state))  # one step: no two samples share a baseline
    last = json.loads(raw_last) if raw_last else {}
    if not last:
        return []  # the first minute only sets the baseline
    counters = _delta(snapshot.counters, last.get("counters", {}))
    # The deltas cover everything since the last sample. After a gap (no sampler ran for a while) that is several
    # minutes: the row starts where the gap started and records how many minutes it covers, so rates divide by
    # the real time instead of booking the whole gap's work to one minute.
    covered = 1
    if "minute" in last:
        covered = max(1, int((minute - datetime.fromisoformat(last["minute"])).total_seconds() // 60))
    rows = []
    period = minute - timedelta(minutes=covered)
    alive = len(snapshot.alive_workers)
    fleet_processing, fleet_wait = {}, {}
    for queue in broker.QUEUE_NAMES:
        processing = _delta(snapshot.histograms.get(("processing", queue), {}),
                            last.get("histograms", {}).get(f"processing:{queue}", {}))
        wait = _delta(snapshot.histograms.get(("wait", queue), {}), last.get("histograms", {}).get(f"wait:{queue}", {}))
        for target, source in ((fleet_processing, processing), (fleet_wait, wait)):
            for key, value in source.items():
                target[key] = target.get(key, 0.0) + value
        ended = {status: int(counters.get(queue_counter(queue, status), 0))
                 for status in OUTCOME_STATUS.values()}
        rows.append(MetricSample(
            at=period, minutes=covered, queue=queue, depth=snapshot.queue_lengths.get(queue, 0), workers=alive,
            busy_ratio=snapshot.busy_ratio, completed=ended["completed"], failed=ended["failed"],
            retried=ended["retried"] + ended["worker_lost"], **_timings(processing, wait)))
    fleet = MetricSample(at=period, minutes=covered, queue="", depth=sum(snapshot.queue_lengths.values()),
                         workers=alive, busy_ratio=snapshot.busy_ratio,
                         completed=int(counters.get("tasks:completed", 0)), failed=int(counters.get("tasks:failed", 0)),
                         retried=int(counters.get("retries", 0)), **_timings(fleet_processing, fleet_wait))
    rows.append(fleet)
    MetricSample.objects.bulk_create(rows, ignore_conflicts=True)
    return rows


class _FoldedElsewhere(Exception):
    """Another sampler folded (deleted) some of the rows this fold read: this fold is rolled back."""


def samples_compact(*, now: datetime | None = None) -> dict:
    """Folds the minute rows of every whole hour that ended more than a day ago into one hourly row per queue;
    deletes rows older than METRICS_RETENTION_DAYS.

    The cutoff is on an hour boundary, so an hour is folded once, whole, and /api/rq/performance and the capacity
    report read the same totals before and after. A minute row can still land in an hour already folded (the
    sample a sampler writes after a long gap starts where the gap started), so a fold adds to an existing hourly row
    rather than replacing it. Each minute row is folded exactly once: the fold deletes the rows it read in its own
    transaction and is rolled back if it deleted fewer (another sampler folded them in the meantime).
    """
    now = now or timezone.now()
    folded = deleted = 0
    cutoff = (now - timedelta(days=1)).replace(minute=0, second=0, microsecond=0)
    minutes = MetricSample.objects.filter(resolution=MetricSample.Resolution.MINUTE, at__lt=cutoff)
    while True:
        first = minutes.order_by("at").values_list("at", flat=True).first()
        if first is None:
            break
        try:
            folded += _fold_hour(first.replace(minute=0, second=0, microsecond=0))
        except _FoldedElsewhere:
            continue  # those rows are gone; the next pass starts at whatever is left
    old = MetricSample.objects.filter(at__lt=now - timedelta(days=settings.METRICS_RETENTION_DAYS))
    while True:
        batch = list(old.values_list("pk", flat=True)[:BATCH])
        if not batch:
            break
        deleted += MetricSample.objects.filter(pk__in=batch).delete()[0]
    return {"folded": folded, "deleted": deleted}


def _fold_hour(hour: datetime) -> int:
    """Adds the hour's minute rows to its hourly rows (one per queue) and deletes them. Returns how many it folded."""
    with transaction.atomic():
        rows = list(MetricSample.objects.select_for_update().filter(
            resolution=MetricSample.Resolution.MINUTE, at__gte=hour, at__lt=hour + timedelta(hours=1)))
        if MetricSample.objects.filter(pk__in=[row.pk for row in rows]).delete()[0] != len(rows):
            raise _FoldedElsewhere
        by_queue: dict[str, list[MetricSample]] = {}
        for row in rows:
            by_queue.setdefault(row.queue, []).append(row)
        for queue, parts in by_queue.items():
            hourly = MetricSample.objects.select_for_update().filter(
                resolution=MetricSample.Resolution.HOUR, queue=queue, at=hour).first()
            if hourly is None:
                hourly = MetricSample(resolution=MetricSample.Resolution.HOUR, queue=queue, at=hour)
            else:
                parts.append(hourly)
            for name, value in _combined(parts).items():
                setattr(hourly, name, value)
            hourly.save()
    return len(rows)


def _combined(rows: list[MetricSample]) -> dict:
    """The figures of several samples as one: counts and minutes summed; p50s weighted by the attempts behind them
    (we keep no bucket counts per sample, so this is the best estimate); p95s, depth and workers the highest
    seen; busy ratio weighted by the minutes each sample covers."""
    minutes = sum(row.minutes for row in rows)
    return {
        "minutes": minutes, "depth": max(row.depth for row in rows),
        "completed": sum(row.completed for row in rows), "failed": sum(row.failed for row in rows),
        "retried": sum(row.retried for row in rows), "processing_sum": sum(row.processing_sum for row in rows),
        "processing_count": sum(row.processing_count for row in rows),
        "processing_p50": _weighted([(row.processing_p50, row.processing_count) for row in rows]),
        "processing_p95": max((row.processing_p95 for row in rows if row.processing_p95 is not None), default=None),
        "wait_p50": _weighted([(row.wait_p50, row.completed) for row in rows]),
        "wait_p95": max((row.wait_p95 for row in rows if row.wait_p95 is not None), default=None),
        "workers": max(row.workers for row in rows),
        "busy_ratio": _weighted([(row.busy_ratio, row.minutes) for row in rows]) or 0.0,
    }


def _weighted(pairs):
    pairs = [(value, weight) for value, weight in pairs if value is not None and weight]
    total = sum(weight for _, weight in pairs)
    return sum(value * weight for value, weight in pairs) / total if total else None


PERIODS = {"15m": "15 minutes", "1h": "1 hour", "6h": "6 hours", "24h": "24 hours", "7d": "7 days"}
WINDOWS = {"15m": timedelta(minutes=15), "1h": timedelta(hours=1), "6h": timedelta(hours=6),
           "24h": timedelta(hours=24), "7d": timedelta(days=7)}


def _trend(first: float | None, second: float | None) -> str:
    if first is None or second is None:
        return "stable"
    if first == 0:
        return "increasing" if second > 0 else "stable"
    change = (second - first) / first
    return "increasing" if change > 0.1 else "decreasing" if change < -0.1 else "stable"


def performance(*, window: str, now: datetime | None = None) -> dict:
    """Average and p95 processing time, throughput per minute, error rate, queue wait and trends over the window,
    from recorded fleet samples (never constants). Raises ValueError for an unknown window."""
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {', '.join(WINDOWS)}; got {window!r}")
    now = now or timezone.now()
    start = now - WINDOWS[window]
    rows = list(MetricSample.objects.filter(queue="", at__gte=start, at__lt=now).order_by("at"))
    minutes = sum(row.minutes for row in rows)
    completed = sum(row.completed for row in rows)
    failed = sum(row.failed for row in rows)
    timed = sum(row.processing_count for row in rows)
    half = start + WINDOWS[window] / 2

    def per_minute(selected):
        span = sum(row.minutes for row in selected)
        return sum(row.completed for row in selected) / span if span else None

    def error_percent(selected):
        ended = sum(row.completed + row.failed for row in selected)
        return 100 * sum(row.failed for row in selected) / ended if ended else None

    first, second = [row for row in rows if row.at < half], [row for row in rows if row.at >= half]
    p95s = [row.processing_p95 for row in rows if row.processing_p95 is not None]
    average = sum(row.processing_sum for row in rows) / timed if timed else None
    throughput = completed / minutes if minutes else None
    wait_p50 = _weighted([(row.wait_p50, row.completed) for row in rows])
    processing_trend = _trend(_mean([row.processing_p95 for row in first]),
                              _mean([row.processing_p95 for row in second]))
    throughput_trend = _trend(per_minute(first), per_minute(second))
    return {
        # The old system's keys (seed 000, get_performance_metrics): error_rate in percent there; queue_wait_time is
        # the median wait (the samples keep percentiles, not a mean). None where the window has no samples.
        "timestamp": now.isoformat(), "period": PERIODS[window],
        "metrics": {"avg_processing_time": average, "throughput": throughput, "error_rate": error_percent(rows),
                    "queue_wait_time": wait_p50},
        "window": window, "samples": len(rows), "from": start.isoformat(), "to": now.isoformat(),
        "totals": {"completed": completed, "failed": failed, "retried": sum(row.retried for row in rows),
                   "minutes": minutes},
        "processing_seconds": {"average": average, "p95": max(p95s) if p95s else None},
        "throughput_per_minute": throughput,
        "error_rate": failed / (completed + failed) if completed + failed else None,
        "queue_wait_seconds": {"p50": wait_p50,
                               "p95": max((row.wait_p95 for row in rows if row.wait_p95 is not None), default=None)},
        "trends": {
            "processing_time_trend": processing_trend, "throughput_trend": throughput_trend,
            "error_rate_trend": _trend(error_percent(first), error_percent(second)),
            "throughput": throughput_trend, "processing_p95": processing_trend,
            "queue_depth": _trend(_mean([row.depth for row in first]), _mean([row.depth for row in second])),
        },
    }


def _mean(values):
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


TARGETS = {"throughput_per_minute": 50, "backlog": 50, "utilisation": (0.70, 0.85), "pickup_seconds": 120}


def capacity_report(*, days: int, now: datetime | None = None) -> dict:
    """The old system's capacity targets against measured figures over ``days``, with what to scale."""
    now = now or timezone.now()
    rows = list(MetricSample.objects.filter(queue="", at__gte=now - timedelta(days=days), at__lt=now)
                .only("minutes", "completed", "depth", "busy_ratio", "wait_p95", "workers"))
    peak = max((row.completed / row.minutes for row in rows if row.minutes), default=None)
    waits = [row.wait_p95 for row in rows if row.wait_p95 is not None]
    # Averages weigh each sample by the minutes it covers: an hourly sample is sixty minutes of the fleet's life.
    measured = {
        "peak_throughput_per_minute": peak,
        "average_backlog": _weighted([(row.depth, row.minutes) for row in rows]),
        "peak_backlog": max((row.depth for row in rows), default=None),
        "average_utilisation": _weighted([(row.busy_ratio, row.minutes) for row in rows]),
        "pickup_p95_seconds": max(waits) if waits else None,
        "average_workers": _weighted([(row.workers, row.minutes) for row in rows]), "samples": len(rows),
    }
    checks, advice = [], []
    if measured["samples"] == 0:
        advice.append("No samples yet: run the sampler (manage.py run_sampler) for a while first.")
    else:
        checks.append(_check("throughput >= 50 tasks/min at peak", peak, peak is not None and peak >= 50))
        checks.append(_check("backlog < 50", measured["average_backlog"], (measured["average_backlog"] or 0) < 50))
        utilisation = measured["average_utilisation"] or 0
        checks.append(_check("utilisation 70-85 %", utilisation, 0.70 <= utilisation <= 0.85))
        pickup = measured["pickup_p95_seconds"]
        checks.append(_check("pickup < 2 min", pickup, pickup is None or pickup < 120))
        average_workers = measured["average_workers"] or 0
        if utilisation > 0.85 or (measured["average_backlog"] or 0) >= 50 or (pickup or 0) >= 120:
            target = max(math.ceil(average_workers) + 1, math.ceil(average_workers * utilisation / 0.775)) \
                if average_workers else 2
            advice.append(f"Scale up: about {target} workers would bring utilisation near 77 %.")
        elif utilisation < 0.70 and average_workers > 2:
            target = max(2, math.ceil(average_workers * utilisation / 0.775))
            advice.append(f"Scale down: about {target} workers would still meet the targets.")
        else:
            advice.append("The fleet is sized within the targets.")
    return {"days": days, "targets": {"throughput_per_minute": ">= 50", "backlog": "< 50", "utilisation": "70-85 %",
                                      "pickup": "< 2 min"},
            "measured": measured, "checks": checks, "advice": advice}


def _check(name: str, value, ok: bool) -> dict:
    return {"target": name, "measured": value, "ok": bool(ok)}
