from django.http import JsonResponse
from django.views.decorators.http import require_GET


@require_GET
def healthz(request):
    """Liveness: the process answers. No database or Redis calls, so a Redis outage does not restart the portal."""
    return JsonResponse({"status": "ok"})
