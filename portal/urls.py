from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from api.site import api
from migration import api as migration_api
from monitoring.metrics import views as metrics_views
from queues import api as queues_api

# django-rq's own pages (its dashboard, queue and job views) are not mounted, and its admin link is off
# (RQ_SHOW_ADMIN_LINK in settings): they check only is_staff, so a read-only Support user could empty, delete,
# requeue or stop jobs with no audit row, and its statistics pages clean registries on GET. Our admin pages do all
# of that through role-checked, audited services. tests/portal/test_django_rq_urls.py requests every django-rq URL.
urlpatterns = [
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
    # The old system's paths its runbooks call (seeds 000 and 001), served by the portal's own views with the same
    # access as /api/rq/*; before the admin, whose catch-all would take them.
    path("health", metrics_views.api_health, name="health"),
    path("admin/rq/health", metrics_views.admin_rq_health, name="admin-rq-health"),
    path("admin/rq/stats", metrics_views.api_metrics, name="admin-rq-stats"),
    path("admin/rq/scale-workers", queues_api.workers_scale_for_queue, name="admin-rq-scale-workers"),
    path("admin/rq/restart-workers", queues_api.workers_restart_for_queue, name="admin-rq-restart-workers"),
    path("admin/maintenance/pause-task-submission", migration_api.pause_task_submission,
         name="maintenance-pause-submission"),
    path("admin/maintenance/resume-task-submission", migration_api.resume_task_submission,
         name="maintenance-resume-submission"),
    path("admin/", admin.site.urls),
    # The HTTP API (api/): /api/v1/..., its OpenAPI description at /api/schema/ and its page at /api/docs/.
    path("api/", api.urls),
    path("api/rq/workers/scale", queues_api.workers_scale, name="api-workers-scale"),
    path("api/rq/workers/restart", queues_api.workers_restart, name="api-workers-restart"),
    path("", include("monitoring.urls")),
]

handler404 = "portal.views.not_found"
handler500 = "portal.views.server_error"
