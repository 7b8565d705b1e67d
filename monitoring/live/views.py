"""The live dashboard's pages in the admin (PortalAdminSite.get_urls wraps these in admin_view): the page, and the
range of history it draws first (the last hour, or 6 h, 24 h, 7 days)."""

import json

from django.http import JsonResponse


def _require_dashboard(request) -> None:
    from django.core.exceptions import PermissionDenied

    from monitoring.metrics.access import may_view_metrics

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
    """The chosen range (``?range=1h``, ``6h``, ``24h`` or ``7d``; the last hour by default) of the metric history
    and the ticker's newest lines, for the dashboard's drawing (and its redrawing after it was away). JSON; the page
    asks for it with its session."""
    from monitoring.live.dashboard import RANGES, history

    _require_dashboard(request)
    if request.method not in ("GET", "HEAD"):
        return JsonResponse({"error": f"{request.method} is not allowed here; use GET"}, status=405)
    span = request.GET.get("range", "1h")
    if span not in RANGES:
        return JsonResponse({"error": f"range: must be one of {', '.join(RANGES)}; got {span!r}",
                             "field": "range"}, status=400)
    return JsonResponse(history(span=span))
