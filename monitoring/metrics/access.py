"""Who may read metrics, the JSON APIs and the live dashboard: a session of a user who may view the queues
overview, or Prometheus with ``Authorization: Bearer <token>``."""

import hmac
from functools import wraps

from django.conf import settings
from django.http import JsonResponse

# The permission that shows queue depths, workers and dead letters in the admin (every role has it: Support,
# Operators, Admins). Being staff only lets a user into the admin; it does not let them read the figures.
VIEW_PERMISSION = "queues.view_queueoverview"


def may_view_metrics(user) -> bool:
    """The check for sessions, shared by the HTTP endpoints and the WebSocket consumer."""
    return bool(user and user.is_authenticated and user.is_active and user.is_staff
                and user.has_perm(VIEW_PERMISSION))


def metrics_access(view):
    @wraps(view)
    def wrapped(request, *args, **kwargs):
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            token = settings.METRICS_TOKEN
            if token and hmac.compare_digest(header[7:].strip().encode(), token.encode()):
                return view(request, *args, **kwargs)
            return JsonResponse({"error": "the bearer token is not valid"}, status=403)
        if request.user.is_authenticated:
            if may_view_metrics(request.user):
                return view(request, *args, **kwargs)
            return JsonResponse({"error": f"reading metrics needs the {VIEW_PERMISSION} permission"}, status=403)
        response = JsonResponse({"error": "authentication required: a staff session, or "
                                          "'Authorization: Bearer <METRICS_TOKEN>'"}, status=401)
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response

    return wrapped


def get_only(view):
    """Like Django's require_GET, but the 405 answer is JSON naming the allowed methods, as every API error is."""

    @wraps(view)
    def wrapped(request, *args, **kwargs):
        if request.method not in ("GET", "HEAD"):
            response = JsonResponse({"error": f"{request.method} is not allowed on {request.path}; use GET"},
                                    status=405)
            response["Allow"] = "GET, HEAD"
            return response
        return view(request, *args, **kwargs)

    return wrapped
