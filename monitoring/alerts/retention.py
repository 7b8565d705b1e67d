"""How long the alert history is kept: ALERT_RETENTION_DAYS (180 by default)."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from monitoring.models import Alert, Notification


def alert_history_prune(*, now: datetime | None = None, batch: int = 1000) -> dict:
    """Deletes resolved alerts (their timelines go with them) and finished notifications (their delivery attempts
    go with them) older than ALERT_RETENTION_DAYS, in batches of ``batch`` rows so no transaction holds the
    database long. Open alerts, and notifications still pending or sending, are never deleted. Run by the sampler
    with its hourly compaction."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.ALERT_RETENTION_DAYS)
    counts = {"alerts": 0, "notifications": 0}
    old = {
        # Not a message of an alert still open: the planner reads them to know which routes were told.
        "notifications": Notification.objects.filter(created_at__lt=cutoff, status__in=[
            Notification.Status.DELIVERED, Notification.Status.FAILED, Notification.Status.GAVE_UP]).exclude(
            alerts__state__in=[Alert.State.PENDING, Alert.State.FIRING]),
        # Not one whose resolution is still owed.
        "alerts": Alert.objects.filter(state=Alert.State.RESOLVED, resolved_at__lt=cutoff, resolved_notified=True),
    }
    for what, queryset in old.items():
        model = queryset.model
        while True:
            pks = list(queryset.order_by().values_list("pk", flat=True)[:batch])
            if not pks:
                break
            model.objects.filter(pk__in=pks).delete()
            counts[what] += len(pks)
    return counts
