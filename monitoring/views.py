import hmac
import json
import logging

from django.conf import settings
from django.core.cache import cache
from django.db import DatabaseError, IntegrityError
from django.views.decorators.csrf import csrf_exempt
from django.utils import timezone
from django.http import HttpResponse, JsonResponse
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from monitoring.access import get_only, metrics_access
from monitoring.collectors import QueueSystemCollector, take_snapshot
from monitoring.health import health_report, metrics_report, readiness_reasons
from monitoring.sampler import performance
from portal.body_limits import too_large_error

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
    report = cache.get(HEALTH_CACHE_KEY)
    if report is None:
        report = health_report(take_snapshot())
        report["checked_at"] = timezone.now().isoformat()
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
def api_metrics(request):
    snapshot = take_snapshot(task_counts=True)
    report = metrics_report(snapshot)
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


@get_only
@metrics_access
def api_alerts(request):
    """The current alerts (pending and firing) from the alert rows; the old endpoint's fields plus ours."""
    from monitoring.alerts import alerts_current

    try:
        return JsonResponse(alerts_current())
    except DatabaseError:
        logger.exception("/api/rq/alerts: the database failed")
        return _unavailable("the database does not answer; try again shortly")


def _unavailable(error: str, retry_after: int = 10) -> JsonResponse:
    """503 with Retry-After: JSON, never Django's HTML error page."""
    response = JsonResponse({"error": error}, status=503)
    response["Retry-After"] = str(retry_after)
    return response


WEBHOOK_MAX_BYTES = 1024 * 1024


@csrf_exempt
def alertmanager_webhook(request):
    """Prometheus Alertmanager's webhook receiver (payload version 4), with ``Authorization: Bearer
    <ALERTS_WEBHOOK_TOKEN>``. Every answer is JSON; a malformed body is refused whole (400), nothing written."""
    from monitoring.alerts import PayloadError, PayloadTooLarge, TooManyOpenAlerts, alertmanager_ingest

    if request.method != "POST":
        response = JsonResponse({"error": f"{request.method} is not allowed on {request.path}; use POST"}, status=405)
        response["Allow"] = "POST"
        return response
    token = settings.ALERTS_WEBHOOK_TOKEN
    if not token:
        return JsonResponse({"error": "the Alertmanager webhook is closed: ALERTS_WEBHOOK_TOKEN is not set"},
                            status=403)
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        response = JsonResponse({"error": "authentication required: 'Authorization: Bearer <ALERTS_WEBHOOK_TOKEN>'"},
                                status=401)
        response["WWW-Authenticate"] = 'Bearer realm="alerts"'
        return response
    if not hmac.compare_digest(header[7:].strip().encode(), token.encode()):
        return JsonResponse({"error": "the bearer token is not valid"}, status=403)
    length = request.headers.get("Content-Length") or "0"
    if not length.isdigit():
        return JsonResponse({"error": "Content-Length must be a number of bytes"}, status=400)
    too_large = JsonResponse({"error": too_large_error(WEBHOOK_MAX_BYTES)}, status=413)
    if int(length) > WEBHOOK_MAX_BYTES:
        return too_large
    # Read from the stream, at most one byte over the limit: a chunked body has no Content-Length to check, and
    # request.body would take it whole (up to Django's own limit, which answers with an HTML page).
    body = request.read(WEBHOOK_MAX_BYTES + 1)
    if len(body) > WEBHOOK_MAX_BYTES:
        return too_large
    try:
        payload = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError) as error:
        return JsonResponse({"error": f"the body is not JSON: {error}"}, status=400)
    except RecursionError:
        return JsonResponse({"error": "the body is not JSON the portal accepts: nested too deeply"}, status=400)
    try:
        result = alertmanager_ingest(payload)
    except PayloadTooLarge as error:
        return JsonResponse({"error": str(error), "field": "alerts"}, status=413)
    except PayloadError as error:
        return JsonResponse({"error": str(error)}, status=400)
    except TooManyOpenAlerts as error:
        return _unavailable(str(error), retry_after=300)
    except IntegrityError:
        # Two Alertmanagers of a cluster delivered the same new alert at the same moment: the other one's is in.
        # Alertmanager retries on 5xx, and the retry finds the row.
        return JsonResponse({"error": "the same alert arrived twice at once; try again"}, status=503)
    except DatabaseError:
        logger.exception("Alertmanager webhook: the database failed")
        return _unavailable("the database does not answer; try again shortly")  # Alertmanager retries a 5xx
    return JsonResponse({"status": "ok", **result})


# --- the live dashboard (admin pages: PortalAdminSite.get_urls wraps these in admin_view) ----------------------

def _require_dashboard(request) -> None:
    from django.core.exceptions import PermissionDenied

    from monitoring.access import may_view_metrics

    if not may_view_metrics(request.user):
        raise PermissionDenied


def dashboard(request, admin_site):
    from django.template.response import TemplateResponse

    _require_dashboard(request)
    from queues import broker

    context = {**admin_site.each_context(request), "title": "Live dashboard",
               "queue_names_json": json.dumps(list(broker.QUEUE_NAMES))}
    return TemplateResponse(request, "admin/monitoring/dashboard.html", context)


def dashboard_history(request):
    """The last hour from the metric history and the ticker's newest lines, for the dashboard's first drawing (and
    its redrawing after it was away). JSON; the page asks for it with its session."""
    from monitoring.dashboard import history

    _require_dashboard(request)
    if request.method not in ("GET", "HEAD"):
        return JsonResponse({"error": f"{request.method} is not allowed here; use GET"}, status=405)
    return JsonResponse(history())
