"""Health and metric reports for the JSON APIs, from one scrape snapshot, and the readiness probe's reasons."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone

from monitoring.metrics.monitors import monitor_components
from monitoring.metrics.snapshot import Snapshot
from queues import broker
from queues.dispatch import PollersState, get_policy
from queues.models import TaskStatus

logger = logging.getLogger(__name__)

ORDER = {"healthy": 0, "warning": 1, "unhealthy": 2}


def _component(status: str, reason: str) -> dict:
    return {"status": status, "reason": reason}


def health_report(snapshot: Snapshot) -> dict:
    info = snapshot.redis_info
    outages = snapshot.outages
    if "redis" in outages:
        redis = _component("unhealthy", outages["redis"])
    elif info.get("maxmemory") and info.get("used_memory", 0) > 0.8 * info["maxmemory"]:
        redis = _component("warning", f"Redis uses {info['used_memory'] / info['maxmemory']:.0%} of maxmemory")
    elif snapshot.maxclients and info.get("connected_clients", 0) > 0.9 * snapshot.maxclients:
        redis = _component("warning", f"{info['connected_clients']} of {snapshot.maxclients} Redis clients in use")
    else:
        redis = _component("healthy", "answers")
    database = _component("unhealthy", outages["database"]) if "database" in outages else \
        _component("healthy", "answers")
    alive = len(snapshot.alive_workers)
    state = snapshot.dispatch
    # The database pollers matter only where tasks go to them (legacy, hybrid, the fallback); in mode rq a straggler
    # of theirs is swept to RQ by the relay. Three small indexed reads then; none in mode rq (every scrape is this).
    needs_look = state.mode != "rq" or state.fallback_active
    pollers = get_policy().pollers_state() if needs_look else PollersState()
    if not snapshot.redis_ok:
        workers = _component("unhealthy", "unknown: Redis is unreachable")
    elif state.mode == "legacy" and not state.fallback_active:
        # The old system runs the tasks: RQ workers are optional (the dispatch component judges the pollers).
        workers = _component("healthy", f"mode legacy: {alive} RQ worker(s) alive, none needed")
    elif alive == 0:
        workers = _component("unhealthy", "no worker is alive")
    elif alive < 2:
        workers = _component("warning", f"only {alive} worker alive")
    else:
        workers = _component("healthy", f"{alive} workers alive")
    problem = snapshot.captioner_problem  # read with the snapshot's first pipeline
    captioner = _component("unhealthy", f"work is held: {problem['message']}") if problem else \
        _component("healthy", "no configuration error reported")
    if state.submission_paused:
        submission = _component("warning", f"submission is paused: {state.paused_reason}"
                                + (f" (until {state.paused_until})" if state.paused_until else ""))
    else:
        submission = _component("healthy", "tasks are accepted and dispatched")
    waiting = pollers.waiting
    if pollers.blocked_by and waiting:
        dispatching = _component("warning" if pollers.blocked_for_now else "unhealthy",
                                 f"{waiting} task(s) wait for the database poller, which may not claim now: "
                                 f"{pollers.blocked_by}")
    elif state.mode in ("legacy", "hybrid") and not settings.DATABASE_POLLING_ENABLED and not state.fallback_active:
        dispatching = _component("unhealthy", f"mode {state.mode} sends tasks to the database poller, but "
                                              "DATABASE_POLLING_ENABLED is false here: no poller may run for them")
    elif pollers.needed and not pollers.alive and (waiting or state.mode != "rq"):
        during = " during the Redis fallback" if state.fallback_active else ""
        dispatching = _component("unhealthy", f"mode {state.mode}{during}: {waiting} task(s) wait for the database "
                                              "poller and no poller is alive (manage.py run_legacy_worker)")
    elif state.fallback_active:
        dispatching = _component("warning", f"Redis fallback: new tasks go to the database poller ({pollers.alive} "
                                            "alive)")
    else:
        alive_pollers = f"; {pollers.alive} database poller(s) alive" if pollers.needed else ""
        dispatching = _component("healthy", f"mode {state.mode}{alive_pollers}")
    components = {"redis": redis, "database": database, "workers": workers, "captioner": captioner,
                  "submission": submission, "dispatch": dispatching,
                  **monitor_components(snapshot.monitors if snapshot.database_ok else None, timezone.now())}
    overall = max((component["status"] for component in components.values()), key=ORDER.__getitem__)
    return {"status": overall, "components": components, "worker_count": alive,
            "fallback_active": snapshot.publishing_fallback, "dispatch": state.as_dict()}


def health_answer(report: dict, *, at) -> dict:
    """``/api/rq/health``: the old system's keys where its documents (seed 000, ``get_rq_health``) put them, with
    their types (``overall_status``; ``components`` as name -> status strings; ``issues`` as strings;
    ``worker_count``; ``timestamp``), and the portal's own beside them: ``status``, ``component_details`` (each
    component's status with the reason and, for the monitors, the age of the last pass), ``fallback_active``,
    ``dispatch`` and ``checked_at``."""
    components = report["components"]
    when = at.isoformat()
    return {
        "timestamp": when,
        "overall_status": report["status"],
        "components": {name: component["status"] for name, component in components.items()},
        "issues": [f"{name}: {component['reason']}" for name, component in components.items()
                   if component["status"] != "healthy"],
        "worker_count": report["worker_count"],
        "status": report["status"],
        "component_details": components,
        "fallback_active": report["fallback_active"],
        "dispatch": report["dispatch"],
        "checked_at": when,
    }


def workers_report(snapshot: Snapshot) -> dict:
    """The workers as /api/rq/metrics and /admin/rq/health give them: the documents' ``active_count`` and
    ``worker_ids``, and the portal's busy ratio and registrations."""
    alive = snapshot.alive_workers
    return {"active_count": len(alive), "worker_ids": sorted(worker["name"] for worker in alive),
            "active": len(alive), "busy_ratio": round(snapshot.busy_ratio, 3), "registered": len(snapshot.workers)}


def metrics_report(snapshot: Snapshot, *, stats: dict | None = None, at=None) -> dict:
    """``/api/rq/metrics``: the old system's keys where its documents (seed 000, ``get_rq_metrics``) put them, with
    their types (``queues.by_priority``/``total_queued``/``failed_jobs``, ``workers.active_count``/``worker_ids``,
    ``tasks`` by status, ``redis.connected_clients``/``used_memory_human``/``keyspace_hits``/``keyspace_misses``,
    ``system.fallback_active``/``health_status``, ``timestamp``), and the portal's own beside them:
    ``redis_reachable``, ``queue_details`` (length and dead letters per queue), ``totals``, ``counters``, the
    workers' busy ratio and registrations, the Redis memory and client limits, ``fallback_active``. ``stats`` is
    Redis' INFO stats section (the keyspace hits and misses), read by the view only: a scrape does not need it.
    ``failed_jobs`` counts the jobs in the queues' failed-job registries (rq 2 keeps no failed list)."""
    info, stats = snapshot.redis_info, stats or {}
    return {
        "timestamp": (at or timezone.now()).isoformat(),
        "queues": {"by_priority": {name: snapshot.queue_lengths.get(name) for name in broker.QUEUE_NAMES},
                   "total_queued": sum(snapshot.queue_lengths.values()),
                   "failed_jobs": sum(snapshot.dead_letters.values())},
        "workers": workers_report(snapshot),
        "tasks": {status.lower(): snapshot.tasks_by_status.get(status, 0) for status in TaskStatus.values},
        "redis": {"connected_clients": info.get("connected_clients", 0),
                  "used_memory_human": info.get("used_memory_human", "0B"),
                  "keyspace_hits": stats.get("keyspace_hits", 0), "keyspace_misses": stats.get("keyspace_misses", 0),
                  "used_memory": info.get("used_memory"), "maxmemory": info.get("maxmemory"),
                  "maxclients": snapshot.maxclients},
        "system": {"fallback_active": snapshot.publishing_fallback,
                   "health_status": health_report(snapshot)["status"]},
        "redis_reachable": snapshot.redis_ok,
        "queue_details": {name: {"length": snapshot.queue_lengths.get(name),
                                 "dead_letters": snapshot.dead_letters.get(name)} for name in broker.QUEUE_NAMES},
        "totals": {"queued_jobs": sum(snapshot.queue_lengths.values()),
                   "dead_letters": sum(snapshot.dead_letters.values())},
        "counters": {key.replace(":", "_"): value for key, value in snapshot.counters.items()},
        "fallback_active": snapshot.publishing_fallback,
    }


def readiness_reasons() -> list[str]:
    """Why this process cannot serve now, as reason codes (empty: ready). ``/readyz`` answers anyone, so the codes
    are all it says; the driver's message (which can name hosts, ports or paths) goes to the log."""
    reasons = []
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as error:
        logger.warning("readiness: the database does not answer: %s", error)
        reasons.append("database_unreachable")
    if not broker.ping():
        logger.warning("readiness: Redis does not answer PING")
        reasons.append("redis_unreachable")
    return reasons
