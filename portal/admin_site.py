from django.contrib import admin

# The queue figures on the index link to the task list; only users who may see it get them computed.
QUEUE_SNAPSHOT_PERMISSION = "queues.view_captiontask"


class PortalAdminSite(admin.AdminSite):
    site_header = "RQ Ops Portal"
    site_title = "RQ Ops Portal"
    index_title = "Caption work on Redis Queue"

    def index(self, request, extra_context=None):
        """The admin's index plus the queue figures. ``admin_view`` has let the user in by the time this runs; the
        figures (Redis and database reads) are computed only for users with the view permission."""
        extra_context = dict(extra_context or {})
        if request.user.has_perm(QUEUE_SNAPSHOT_PERMISSION):
            from monitoring.selectors import queue_snapshot

            extra_context["queue_snapshot"] = queue_snapshot()
        return super().index(request, extra_context)
