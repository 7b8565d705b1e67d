"""The alerts wing's endpoints: the current alerts (``/api/rq/alerts``, the old system's path) and Prometheus
Alertmanager's webhook."""

import hmac
import json
import logging

from django.conf import settings
from django.db import DatabaseError, IntegrityError
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from monitoring.metrics.access import get_only, metrics_access
from monitoring.metrics.views import unavailable
from portal.body_limits import too_large_error

logger = logging.getLogger(__name__)


@get_only
@metrics_access
def api_alerts(request):
    """The current alerts (pending and firing) from the alert rows; the old endpoint's fields plus ours."""
    from monitoring.alerts.selectors import alerts_current

    try:
        return JsonResponse(alerts_current())
    except DatabaseError:
        logger.exception("/api/rq/alerts: the database failed")
        return unavailable("the database does not answer; try again shortly")


WEBHOOK_MAX_BYTES = 1024 * 1024


@csrf_exempt
def alertmanager_webhook(request):
    """Prometheus Alertmanager's webhook receiver (payload version 4), with ``Authorization: Bearer
    <ALERTS_WEBHOOK_TOKEN>``. Every answer is JSON; a malformed body is refused whole (400), nothing written."""
    from monitoring.alerts.ingest import PayloadError, PayloadTooLarge, TooManyOpenAlerts, alertmanager_ingest

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
        return unavailable(str(error), retry_after=300)
    except IntegrityError:
        # Two Alertmanagers of a cluster delivered the same new alert at the same moment: the other one's is in.
        # Alertmanager retries on 5xx, and the retry finds the row.
        return JsonResponse({"error": "the same alert arrived twice at once; try again"}, status=503)
    except DatabaseError:
        logger.exception("Alertmanager webhook: the database failed")
        return unavailable("the database does not answer; try again shortly")  # Alertmanager retries a 5xx
    return JsonResponse({"status": "ok", **result})
