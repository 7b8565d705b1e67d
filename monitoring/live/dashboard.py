"""The live dashboard's figures: one sample a second while anyone watches, and the last hour from metric history.

How it fits together:

- **One live sampler per deployment.** Every ``run_sampler`` process runs ``LiveSampler.step()`` once a second, but
  only the one holding ``LIVE_LOCK_KEY`` (a Redis key with its token, renewed every pass, taken over by another
  sampler within ``LIVE_LOCK_SECONDS`` if its holder dies) computes and sends samples; the others stand by.
- **Nothing while nobody watches.** The holder first counts the connected dashboards (``live.watchers_count``, one
  Redis command). With none it does nothing more: no snapshot, no query, no send.
- **A sample costs what a Prometheus scrape costs.** It is built from ``take_snapshot()`` (two pipelined Redis round
  trips and four small database reads), one query for the firing alerts (their index, at most
  ``ALERTS_SHOWN + 1`` rows) and, every ``SLOW_FIGURES_SECONDS``, the task counts per status
  (bounded, on the status index). It never counts or scans the task table per sample.
- **Rates and percentiles over the last minute** come from the counters and histograms every worker adds to Redis
  (monitoring.metrics.recorder): the sampler keeps the last ``RING_SECONDS`` of them in memory and subtracts. When it
  starts
  (or someone connects after nobody watched) the ring is seeded with the per-minute sampler's baseline
  (``sampler.LAST_KEY``), so the first figures cover the time since the last minute sample rather than one second.
- **Sending.** The sample is encoded to JSON once and sent to the ``metrics`` channel group; every consumer passes
  the same text on (``MetricsConsumer.metrics_update``). The last one is also kept in Redis for ``LAST_SAMPLE_TTL``
  seconds, so a dashboard that connects gets a figure at once. Fleet events and alert changes do not wait for a
  sample: ``live.events_announce`` pushes them when their rows are committed.
- **History.** ``history()`` reads the chosen range of ``MetricSample`` rows (the fleet's and each queue's, on
  the (queue, at) index): the per-minute rows for the last hour (at most 300 rows, the default), 6 h or 24 h, and
  for 7 days the hourly rows with the last day's minutes folded into hours as the sampler folds them (at most 840
  points); and the newest fleet events and alert changes (primary-key order), for the page to draw before the first
  push arrives. A range is one request when it is chosen; the push is not touched.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections import deque
from datetime import datetime, timedelta

from asgiref.sync import async_to_sync
from django.db import DatabaseError
from django.utils import timezone

from monitoring.live.events import LAST_SAMPLE_KEY, LAST_SAMPLE_TTL, METRICS_GROUP, event_payloads, watchers_count
from monitoring.metrics.health import health_report
from monitoring.metrics.recorder import PROCESSING_BUCKETS, WAIT_BUCKETS, queue_counter
from monitoring.metrics.sampler import LAST_KEY, _delta, quantile
from monitoring.metrics.snapshot import Snapshot, take_snapshot
from queues import broker

LIVE_LOCK_KEY = "portal:metrics:live:sampler"
LIVE_LOCK_SECONDS = 5.0  # a standby sampler takes over this long after the holder stopped renewing
RING_SECONDS = 300  # the overview's "last 5 minutes" figures; rates and percentiles use the last 60
RATE_SECONDS = 60
SLOW_FIGURES_SECONDS = 10.0  # task counts per status change slowly and cost more to read
ALERTS_SHOWN = 5
TICKER_ROWS = 30

# Renews the lock only for its holder: a sampler that lost it (paused longer than the lock lasts) must not take it
# back from the one that took over.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""


class LiveSampler:
    """Holds the lock, the ring of recent counters and the slowly changing figures of one ``run_sampler``."""

    def __init__(self, *, group: str = METRICS_GROUP, layer=None, clock=time.time):
        self.group = group
        self.layer = layer
        self.clock = clock
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ring: deque[tuple[float, dict, dict]] = deque()  # (time, counters, histograms), oldest first
        self.slow: dict = {}
        self.slow_at = 0.0
        self.holding = False

    # --- the lock ---------------------------------------------------------------------------------------------
    def hold(self) -> bool:
        """Renews or takes the live lock; True while this sampler is the one that samples."""
        connection = broker.get_connection()
        milliseconds = int(LIVE_LOCK_SECONDS * 1000)
        if self.holding and connection.eval(_RENEW, 1, LIVE_LOCK_KEY, self.token, milliseconds):
            return True
        self.holding = bool(connection.set(LIVE_LOCK_KEY, self.token, nx=True, px=milliseconds))
        if not self.holding:
            self.ring.clear()
        return self.holding

    def release(self) -> None:
        """On a clean stop: lets a standby take over at its next pass instead of after the lock expires."""
        if self.holding:
            connection = broker.get_connection()
            connection.eval("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) "
                            "end return 0", 1, LIVE_LOCK_KEY, self.token)
            self.holding = False

    # --- one pass ---------------------------------------------------------------------------------------------
    def step(self) -> dict | None:
        """Once a second from run_sampler: returns the sample it sent, or None (not the holder, or nobody watches)."""
        if not self.hold():
            return None
        if not watchers_count():
            self.ring.clear()  # rates restart from the minute baseline when someone comes back
            return None
        sample = self.sample()
        text = json.dumps({"type": "sample", "data": sample}, separators=(",", ":"))
        broker.get_connection().set(LAST_SAMPLE_KEY, text, ex=LAST_SAMPLE_TTL)
        layer = self.layer
        if layer is None:
            from channels.layers import get_channel_layer

            layer = self.layer = get_channel_layer()
        async_to_sync(layer.group_send)(self.group, {"type": "metrics.update", "text": text})
        return sample

    def sample(self, snapshot: Snapshot | None = None) -> dict:
        """The figures of now (``at``, in epoch milliseconds, is when reading them began)."""
        at = self.clock()
        snapshot = snapshot or take_snapshot()
        if snapshot.redis_ok:
            self._ring_add(at, snapshot)
        if at - self.slow_at >= SLOW_FIGURES_SECONDS or not self.slow:
            self.slow = _slow_figures()
            self.slow_at = at
        return build_sample(snapshot, at=at, ring=self.ring, slow=self.slow, alerts=_firing_alerts())

    def _ring_add(self, at: float, snapshot: Snapshot) -> None:
        histograms = {f"{kind}:{queue}": values for (kind, queue), values in snapshot.histograms.items()}
        if not self.ring:
            self.ring.append(_baseline(at))
        self.ring.append((at, dict(snapshot.counters), histograms))
        while len(self.ring) > 2 and self.ring[1][0] <= at - RING_SECONDS:
            self.ring.popleft()


def _baseline(at: float) -> tuple[float, dict, dict]:
    """The per-minute sampler's last state (its minute's counters and histograms) as the ring's first entry."""
    raw = broker.get_connection().get(LAST_KEY)
    if not raw:
        return (at, {}, {})
    state = json.loads(raw)
    started = datetime.fromisoformat(state["minute"]).timestamp()
    return (min(started, at - 1), state.get("counters", {}), state.get("histograms", {}))


def _entry_at_or_before(ring, moment: float):
    """The newest ring entry at or before ``moment`` (the oldest if none is that old)."""
    chosen = ring[0]
    for entry in ring:
        if entry[0] <= moment:
            chosen = entry
        else:
            break
    return chosen


def _slow_figures() -> dict:
    from monitoring.metrics.selectors import task_counts_by_status

    try:
        return {"tasks": task_counts_by_status()}
    except DatabaseError:
        return {"tasks": []}


def _firing_alerts() -> dict:
    from monitoring.models import Alert

    try:
        rows = list(Alert.objects.filter(state=Alert.State.FIRING).order_by("-started_at")
                    .values("pk", "name", "severity", "summary", "acknowledged_at", "started_at")[:ALERTS_SHOWN + 1])
    except DatabaseError:
        return {"count": None, "more": False, "alerts": []}
    shown = [{"id": row["pk"], "name": row["name"], "severity": row["severity"], "summary": row["summary"][:200],
              "acknowledged": row["acknowledged_at"] is not None, "since": row["started_at"].isoformat()}
             for row in rows[:ALERTS_SHOWN]]
    return {"count": len(shown), "more": len(rows) > ALERTS_SHOWN, "alerts": shown}


def build_sample(snapshot: Snapshot, *, at: float, ring, slow: dict, alerts: dict) -> dict:
    """One sample from a snapshot and the ring of earlier counters (a pure function: the tests call it)."""
    queues = {}
    ring = ring if snapshot.redis_ok else ()  # no counters now: no rates, rather than old ones
    minute_ago = _entry_at_or_before(ring, at - RATE_SECONDS) if ring else None
    five_ago = ring[0] if ring else None
    newest = ring[-1] if ring else None

    def per_minute(field_name: str):
        if not newest or newest is minute_ago or newest[0] <= minute_ago[0]:
            return None
        span = newest[0] - minute_ago[0]
        return round(max(0.0, newest[1].get(field_name, 0.0) - minute_ago[1].get(field_name, 0.0)) * 60 / span, 2)

    def last_five(field_name: str):
        if not newest or not five_ago:
            return None
        return int(max(0.0, newest[1].get(field_name, 0.0) - five_ago[1].get(field_name, 0.0)))

    fleet_histograms = {"processing": {}, "wait": {}}
    for queue in broker.QUEUE_NAMES:
        entry = {"depth": snapshot.queue_lengths.get(queue) if snapshot.redis_ok else None,
                 "running": snapshot.running.get(queue) if snapshot.redis_ok else None,
                 "dead": snapshot.dead_letters.get(queue) if snapshot.redis_ok else None,
                 "completed_5m": last_five(queue_counter(queue, "completed")),
                 "failed_5m": last_five(queue_counter(queue, "failed")),
                 "completed_per_minute": per_minute(queue_counter(queue, "completed"))}
        queues[queue] = entry
        if newest and minute_ago and newest is not minute_ago:
            for kind in ("processing", "wait"):
                part = _delta(newest[2].get(f"{kind}:{queue}", {}), minute_ago[2].get(f"{kind}:{queue}", {}))
                for key, value in part.items():
                    fleet_histograms[kind][key] = fleet_histograms[kind].get(key, 0.0) + value

    def percentile(kind: str, buckets, q: float):
        value = quantile(buckets, fleet_histograms[kind], q)
        return None if value is None else round(value, 4)

    pools: dict[str, dict] = {pool["name"]: {"busy": 0, "idle": 0, "desired": pool["desired"]}
                              for pool in snapshot.pools}  # the scrape's read of the pool rows
    workers = []
    for worker in snapshot.workers:
        if worker["alive"]:
            pool = pools.setdefault(worker["pool"] or "(none)", {"busy": 0, "idle": 0, "desired": None})
            # Caption slots, the unit of "desired" (a one-slot worker is one slot).
            pool["busy"] += worker["busy_slots"]
            pool["idle"] += worker["slots"] - worker["busy_slots"]
        workers.append({key: worker[key] for key in ("name", "state", "alive", "successful", "failed", "rss",
                                                     "pool", "host")})
    info = snapshot.redis_info
    health = health_report(snapshot)
    return {
        "at": round(at * 1000, 1),
        "queues": queues,
        "throughput": {status: per_minute(f"tasks:{status}") for status in ("completed", "failed")}
        | {"retried": per_minute("retries")},
        "processing": {"p50": percentile("processing", PROCESSING_BUCKETS, 0.5),
                       "p95": percentile("processing", PROCESSING_BUCKETS, 0.95)},
        "wait": {"p50": percentile("wait", WAIT_BUCKETS, 0.5), "p95": percentile("wait", WAIT_BUCKETS, 0.95)},
        "rate_window_seconds": round(newest[0] - minute_ago[0], 1) if newest and minute_ago else None,
        "pools": pools, "workers": workers,
        "redis": {"ok": snapshot.redis_ok, "error": snapshot.redis_error, "used_memory": info.get("used_memory"),
                  "max_memory": info.get("maxmemory"), "clients": info.get("connected_clients"),
                  "max_clients": snapshot.maxclients},
        "health": {"status": health["status"],
                   "components": {name: component for name, component in health["components"].items()}},
        "fallback": snapshot.publishing_fallback, "dispatch": snapshot.dispatch.as_dict(),
        "alerts": alerts,
        "tasks": slow.get("tasks", []),
    }


# The ranges the dashboard offers from the stored history: the per-minute samples up to a day (they are kept a
# day), then the hourly ones (with the last day's minutes folded into hours on the fly).
RANGES = {"1h": timedelta(hours=1), "6h": timedelta(hours=6), "24h": timedelta(hours=24), "7d": timedelta(days=7)}
HOURLY_RANGES = {"7d"}
SAMPLE_FIELDS = ("at", "queue", "minutes", "depth", "completed", "failed", "retried", "processing_sum",
                 "processing_count", "processing_p50", "processing_p95", "wait_p50", "wait_p95", "workers",
                 "busy_ratio")


def _history_rows(now: datetime, span: str) -> list[dict]:
    """The samples of the range, oldest first: minute rows, or for the long ranges one row per hour and queue."""
    from types import SimpleNamespace

    from monitoring.metrics.sampler import _combined
    from monitoring.models import MetricSample

    since = now - RANGES[span]
    queues = ["", *broker.QUEUE_NAMES]
    if span not in HOURLY_RANGES:
        return list(MetricSample.objects.filter(resolution=MetricSample.Resolution.MINUTE, at__gte=since,
                                                queue__in=queues).order_by("at").values(*SAMPLE_FIELDS))
    parts: dict[tuple[datetime, str], list] = {}
    for row in MetricSample.objects.filter(at__gte=since.replace(minute=0, second=0, microsecond=0),
                                           queue__in=queues).order_by().values(*SAMPLE_FIELDS):
        hour = row["at"].replace(minute=0, second=0, microsecond=0)
        parts.setdefault((hour, row["queue"]), []).append(SimpleNamespace(**row))
    return [{"at": hour, "queue": queue, **_combined(rows)} for (hour, queue), rows in sorted(parts.items())]


def history(*, now: datetime | None = None, span: str = "1h") -> dict:
    """The ``span`` (a key of RANGES) of metric history as columns for the charts, and the ticker's newest rows."""
    now = now or timezone.now()
    times: list[float] = []
    by_minute: dict[datetime, dict[str, dict]] = {}
    for row in _history_rows(now, span):
        by_minute.setdefault(row["at"], {})[row["queue"]] = row
    series: dict[str, list] = {f"depth:{queue}": [] for queue in broker.QUEUE_NAMES}
    for name in ("completed", "failed", "retried", "processing_p50", "processing_p95", "wait_p50", "wait_p95",
                 "workers", "busy_ratio"):
        series[name] = []
    for moment in sorted(by_minute):
        period = by_minute[moment]
        fleet = period.get("")
        span_minutes = (fleet or next(iter(period.values())))["minutes"] or 1
        # A row describes the minutes that start at ``at``; drawn at their end, where the live points continue it.
        times.append((moment + timedelta(minutes=span_minutes)).timestamp())
        for queue in broker.QUEUE_NAMES:
            series[f"depth:{queue}"].append(period[queue]["depth"] if queue in period else None)
        for name in ("completed", "failed", "retried"):  # per minute, whatever the row covers
            series[name].append(round(fleet[name] / span_minutes, 2) if fleet else None)
        for name in ("processing_p50", "processing_p95", "wait_p50", "wait_p95", "workers", "busy_ratio"):
            series[name].append(fleet[name] if fleet else None)
    return {"now": now.timestamp(), "range": span, "seconds": RANGES[span].total_seconds(), "times": times,
            "series": series, "queues": list(broker.QUEUE_NAMES), "events": ticker_rows()}


def ticker_rows(limit: int = TICKER_ROWS) -> list[dict]:
    """The newest fleet events and alert changes, newest first (primary-key order: no index on time needed)."""
    from monitoring.models import AlertEvent
    from queues.models import FleetEvent

    fleet = list(FleetEvent.objects.select_related("pool").order_by("-id")[:limit])
    alerts = list(AlertEvent.objects.select_related("alert").order_by("-id")[:limit])
    rows = event_payloads(fleet) + event_payloads(alerts)
    rows.sort(key=lambda row: row["at"], reverse=True)
    return rows[:limit]
