"""Error answers: machine endpoints (the JSON APIs, /metrics and the probes) answer in JSON; pages keep Django's."""

from django.http import JsonResponse
from django.views import defaults

MACHINE_PREFIXES = ("/api/", "/metrics", "/health", "/readyz", "/admin/rq/", "/admin/maintenance/")


def _is_machine(request) -> bool:
    return request.path.startswith(MACHINE_PREFIXES)


def not_found(request, exception=None):
    if _is_machine(request):
        return JsonResponse({"error": f"no such endpoint: {request.path}", "field": None}, status=404)
    return defaults.page_not_found(request, exception)


def server_error(request):
    if _is_machine(request):
        return JsonResponse({"error": "internal error; the portal's log has the details", "field": None}, status=500)
    return defaults.server_error(request)
