"""The portal's URLs plus peers' pages, for benchmarks that time them in the same run: django-rq's pages (the
portal itself no longer serves them: they bypass its roles), and a plain Django admin of the alert rows (default
ModelAdmin: full result count, no joins chosen, no indexes picked) as the peer of the alert history page."""

from django.contrib import admin
from django.urls import include, path

from portal.urls import handler404, handler500, urlpatterns as portal_urlpatterns  # noqa: F401


class PlainAlertAdmin(admin.ModelAdmin):
    change_list_template = "admin/change_list.html"  # not the portal's, which links to its own pages
    list_display = ["summary", "state", "severity", "rule", "started_at", "acknowledged_by"]
    list_filter = ["state", "severity", "rule"]


plain_site = admin.AdminSite(name="plain")


def _register():
    from monitoring.models import Alert

    plain_site.register(Alert, PlainAlertAdmin)


_register()

urlpatterns = [path("django-rq/", include("django_rq.urls")), path("plain-admin/", plain_site.urls),
               *portal_urlpatterns]
