from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from queues import api as queues_api

# django-rq's own pages (its dashboard, queue and job views) are not mounted, and its admin link is off
# (RQ_SHOW_ADMIN_LINK in settings): they check only is_staff, so a read-only Support user could empty, delete,
# requeue or stop jobs with no audit row, and its statistics pages clean registries on GET. Our admin pages do all
# of that through role-checked, audited services. tests/portal/test_django_rq_urls.py requests every django-rq URL.
urlpatterns = [
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
    path("admin/", admin.site.urls),
    path("api/rq/workers/scale", queues_api.workers_scale, name="api-workers-scale"),
    path("api/rq/workers/restart", queues_api.workers_restart, name="api-workers-restart"),
    path("", include("monitoring.urls")),
]

handler404 = "portal.views.not_found"
handler500 = "portal.views.server_error"
