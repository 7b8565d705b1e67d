"""The portal's URLs plus django-rq's pages, for benchmarks that time django-rq as the peer (the portal itself no
longer serves django-rq's pages: they bypass its roles)."""

from django.urls import include, path

from portal.urls import handler404, handler500, urlpatterns as portal_urlpatterns  # noqa: F401

urlpatterns = [path("django-rq/", include("django_rq.urls")), *portal_urlpatterns]
