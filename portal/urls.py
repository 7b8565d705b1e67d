from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from api.site import api
from monitoring.metrics import views as metrics_views

# django-rq's own pages (its dashboard, queue and job views) are not mounted, and its admin link is off
# (RQ_SHOW_ADMIN_LINK in settings): they check only is_staff, so a read-only Support user could empty, delete,
# requeue or stop jobs with no audit row, and its statistics pages clean registries on GET. Our admin pages do all
# of that through role-checked, audited services. tests/portal/test_django_rq_urls.py requests every django-rq URL.
urlpatterns = [
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
    # The old system's read paths its runbooks call (seeds 000 and 001), served by the portal's own views with the
    # same access as /api/rq/*; before the admin, whose catch-all would take them.
    path("health", metrics_views.api_health, name="health"),
    path("admin/rq/health", metrics_views.admin_rq_health, name="admin-rq-health"),
    path("admin/rq/stats", metrics_views.api_metrics, name="admin-rq-stats"),
    # The HTTP API (api/): /api/v1/..., the older calls at their own paths (/api/rq/workers/*, seed 000's
    # /admin/rq/scale-workers and /restart-workers, seed 001's /admin/maintenance/*), its OpenAPI description at
    # /api/schema/ and its page at /api/docs/. Mounted at the root, before the admin's catch-all.
    path("", api.urls),
    path("admin/", admin.site.urls),
    path("", include("monitoring.urls")),
]

handler404 = "portal.views.not_found"
handler500 = "portal.views.server_error"
