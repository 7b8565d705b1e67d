from django.contrib import admin


class PortalAdminSite(admin.AdminSite):
    site_header = "RQ Ops Portal"
    site_title = "RQ Ops Portal"
    index_title = "Caption work on Redis Queue"

    def index(self, request, extra_context=None):
        from monitoring.selectors import queue_snapshot

        extra_context = {**(extra_context or {}), "queue_snapshot": queue_snapshot()}
        return super().index(request, extra_context)
