"""The portal's URLs plus peers' pages, for benchmarks that time them in the same run: django-rq's pages (the
portal itself no longer serves them: they bypass its roles), a plain Django admin of the alert rows (default
ModelAdmin: full result count, no joins chosen, no indexes picked) as the peer of the alert history page, and a bare
view that enqueues a job with raw rq (no token, no row, no audit) as the peer of the API's submit (bench/api.py)."""

import json

from django.contrib import admin
from django.http import JsonResponse
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt

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


@csrf_exempt
def raw_enqueue(request):
    """``{"image_ref": ...}`` to one rq job on the ``bench-raw`` queue, as a bare Django view with raw rq would."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    from queues import broker

    body = json.loads(request.body)
    job = Queue("bench-raw", connection=broker.get_connection(), serializer=JSONSerializer).enqueue(
        "bench.trivial.noop", body["image_ref"])
    return JsonResponse({"id": job.id}, status=201)


urlpatterns = [path("django-rq/", include("django_rq.urls")), path("plain-admin/", plain_site.urls),
               path("peer/raw-enqueue", raw_enqueue), *portal_urlpatterns]
