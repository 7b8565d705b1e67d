from django.contrib import admin
from django.urls import path, reverse

# The queue figures on the index link to the task list; only users who may see it get them computed.
QUEUE_SNAPSHOT_PERMISSION = "queues.view_captiontask"


class PortalAdminSite(admin.AdminSite):
    site_header = "RQ Ops Portal"
    site_title = "RQ Ops Portal"
    index_title = "Caption work on Redis Queue"

    def get_urls(self):
        from monitoring.live import views

        return [
            path("dashboard/", self.admin_view(lambda request: views.dashboard(request, self)), name="dashboard"),
            path("dashboard/history/", self.admin_view(views.dashboard_history), name="dashboard_history"),
            *super().get_urls(),
        ]

    def get_app_list(self, request, app_label=None):
        """The apps, with the live dashboard first for users who may watch it (index and navigation sidebar)."""
        from monitoring.metrics.access import may_view_metrics

        apps = super().get_app_list(request, app_label)
        if app_label is None and may_view_metrics(request.user):
            url = reverse("admin:dashboard", current_app=self.name)
            apps.insert(0, {"name": "Live", "app_label": "live", "app_url": url, "has_module_perms": True,
                            "models": [{"name": "Dashboard", "object_name": "Dashboard", "admin_url": url,
                                        "add_url": None, "view_only": True,
                                        "perms": {"view": True, "add": False, "change": False, "delete": False}}]})
        return apps

    def index(self, request, extra_context=None):
        """The admin's index plus the queue figures. ``admin_view`` has let the user in by the time this runs; the
        figures (Redis and database reads) are computed only for users with the view permission."""
        extra_context = dict(extra_context or {})
        if request.user.has_perm(QUEUE_SNAPSHOT_PERMISSION):
            from monitoring.metrics.selectors import queue_snapshot

            extra_context["queue_snapshot"] = queue_snapshot()
        return super().index(request, extra_context)
