"""The metrics wing's endpoints: liveness and readiness probes, /metrics for Prometheus, and the JSON APIs of health,
metrics and performance (the old system's paths)."""

import logging

from django.core.cache import cache
from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from monitoring.metrics.access import get_only, metrics_access
from monitoring.metrics.collectors import QueueSystemCollector
from monitoring.metrics.health import health_answer, health_report, metrics_report, readiness_reasons, workers_report
from monitoring.metrics.sampler import performance
from monitoring.metrics.snapshot import take_snapshot
from queues import broker
from queues.errors import BrokerUnavailable

logger = logging.getLogger(__name__)

# Our collector lives in its own registry: django-prometheus's default registry holds per-process HTTP and database
# metrics; ours are read from Redis at scrape time and are the same from every portal process.
QUEUE_REGISTRY = CollectorRegistry(auto_describe=False)
QUEUE_REGISTRY.register(QueueSystemCollector())


@get_only
def healthz(request):
    """Liveness: the process answers. No database or Redis calls, so a Redis outage does not restart the portal."""
    return JsonResponse({"status": "ok"})


@get_only
def readyz(request):
    """Readiness: the database and Redis both answer. Unauthenticated, so a failure names reason codes only."""
    reasons = readiness_reasons()
    if reasons:
        return JsonResponse({"status": "unavailable", "reasons": reasons}, status=503)
    return JsonResponse({"status": "ready"})


@get_only
@metrics_access
def metrics(request):
    body = generate_latest(REGISTRY) + generate_latest(QUEUE_REGISTRY)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)


# Load balancers and monitors poll the health API often and all at once: each process computes it at most once a
# second and answers from that in between (the report says when it was taken). The cache is the process-local one.
HEALTH_CACHE_SECONDS = 1.0
HEALTH_CACHE_KEY = "monitoring:health-report"


def cached_health_report() -> dict:
    """The health API's answer (health_answer), computed at most once per HEALTH_CACHE_SECONDS in this process."""
    report = cache.get(HEALTH_CACHE_KEY)
    if report is None:
        report = health_answer(health_report(take_snapshot()), at=timezone.now())
        if HEALTH_CACHE_SECONDS > 0:
            cache.set(HEALTH_CACHE_KEY, report, timeout=HEALTH_CACHE_SECONDS)
    return report


@get_only
@metrics_access
def api_health(request):
    report = cached_health_report()
    return JsonResponse(report, status=503 if report["status"] == "unhealthy" else 200)


@get_only
@metrics_access
def admin_rq_health(request):
    """``GET /admin/rq/health``, the old system's second health path (seed 000's exporter reads ``status`` and
    ``fallback_active`` from it, seed 001's hybrid check ``workers``): the health API's answer, with the workers as
    /api/rq/metrics gives them (``active_count``, ``worker_ids``, ...)."""
    snapshot = take_snapshot()
    answer = health_answer(health_report(snapshot), at=timezone.now())
    answer["workers"] = workers_report(snapshot)
    return JsonResponse(answer, status=503 if answer["status"] == "unhealthy" else 200)


@get_only
@metrics_access
def api_metrics(request):
    snapshot = take_snapshot(task_counts=True)
    report = metrics_report(snapshot, stats=_redis_stats() if snapshot.redis_ok else None)
    if snapshot.outages:
        return JsonResponse({"error": "; ".join(snapshot.outages.values()), **report}, status=503)
    return JsonResponse(report)


@get_only
@metrics_access
def api_performance(request):
    try:
        return JsonResponse(performance(window=request.GET.get("window", "1h")))
    except ValueError as error:
        return JsonResponse({"error": str(error), "field": "window"}, status=400)


def _redis_stats() -> dict:
    """Redis' INFO stats section (keyspace hits and misses for /api/rq/metrics); empty if Redis stopped answering
    since the snapshot."""
    try:
        return broker.get_connection().info("stats")
    except (BrokerUnavailable, *broker.UNAVAILABLE_ERRORS):
        return {}


def unavailable(error: str, retry_after: int = 10) -> JsonResponse:
    """503 with Retry-After: JSON, never Django's HTML error page."""
    response = JsonResponse({"error": error}, status=503)
    response["Retry-After"] = str(retry_after)
    return response
