"""Template context for the admin's pages."""

from __future__ import annotations

# The firing alerts the banner names; one more is read to know whether there are more than these.
FIRING_BANNER_LIMIT = 5
VIEW_ALERTS = "monitoring.view_alert"


def _admin_staff(request) -> bool:
    return request.path.startswith("/admin/") and getattr(request.user, "is_staff", False)


def operations_banner(request) -> dict:
    """Problems every operator should see on every admin page: the captioner is misconfigured and work is held,
    submission is paused or the Redis fallback is on (queues.dispatch), and the alerts that fire (``alerts_banner``,
    included here so that settings list one processor)."""
    if not _admin_staff(request):
        return {}
    from queues import broker
    from queues.dispatch import get_policy

    from django.conf import settings

    context = alerts_banner(request)
    context["live_websocket_url"] = settings.LIVE_WEBSOCKET_URL  # pages that update live open their socket there
    try:
        context["captioner_problem"] = broker.captioner_problem()
    except (broker.BrokerUnavailable, *broker.REDIS_ERRORS):
        pass
    status = get_policy().status()  # one primary-key read
    if status.submission_paused or status.fallback_active:
        context["dispatch_status"] = status
    return context


def alerts_banner(request) -> dict:
    """The firing alerts, newest first, for staff who may view alerts: one query on the (state, -started_at) index
    (alert_state_started_idx), none for anyone else or off the admin. templates/admin/base_site.html shows them."""
    if not _admin_staff(request) or not request.user.has_perm(VIEW_ALERTS):
        return {}
    from monitoring.models import Alert

    rows = list(Alert.objects.filter(state=Alert.State.FIRING).order_by("-started_at")
                .values("pk", "severity", "summary", "acknowledged_at")[:FIRING_BANNER_LIMIT + 1])
    if not rows:
        return {}
    shown = rows[:FIRING_BANNER_LIMIT]
    return {"firing_alerts": {"alerts": shown, "count": len(shown), "more": len(rows) > FIRING_BANNER_LIMIT}}
