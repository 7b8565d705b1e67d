"""HTTPS behind a TLS-terminating proxy: what the settings from the environment make the portal do for a browser."""

import pytest
from django.core.checks import Warning as CheckWarning
from django.urls import reverse

from portal.checks import check_deployment_settings

pytestmark = pytest.mark.django_db

PROXIED_HTTPS = {"HTTP_X_FORWARDED_PROTO": "https"}


@pytest.fixture
def behind_proxy(settings):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_HSTS_SECONDS = 31536000
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    settings.SECURE_HSTS_PRELOAD = True
    settings.ALLOWED_HOSTS = ["ops.example.com"]
    settings.CSRF_TRUSTED_ORIGINS = []


def test_requests_the_proxy_marks_https_get_hsts_and_plain_http_is_redirected(client, behind_proxy):
    page = client.get("/admin/login/", HTTP_HOST="ops.example.com", **PROXIED_HTTPS)
    assert page.status_code == 200
    assert page["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
    plain = client.get("/admin/login/", HTTP_HOST="ops.example.com")
    assert plain.status_code == 301 and plain["Location"] == "https://ops.example.com/admin/login/"
    assert "Strict-Transport-Security" not in plain


def test_load_balancer_probes_over_plain_http_are_not_redirected(client, behind_proxy, redis):
    assert client.get(reverse("healthz"), HTTP_HOST="ops.example.com").status_code == 200
    assert client.get(reverse("readyz"), HTTP_HOST="ops.example.com").status_code == 200


def test_login_form_posts_through_the_proxy_pass_the_csrf_origin_check(client, behind_proxy, admin_user):
    # A browser on https://ops.example.com sends that Origin; without the proxy header setting Django would see
    # http:// and refuse every POST as cross-origin.
    csrf_client = client.__class__(enforce_csrf_checks=True)
    form = csrf_client.get("/admin/login/", HTTP_HOST="ops.example.com", **PROXIED_HTTPS)
    token = form.cookies["csrftoken"].value
    login = csrf_client.post("/admin/login/", {"username": admin_user.username, "password": "pw-ada-admin",
                                               "csrfmiddlewaretoken": token, "next": "/admin/"},
                             HTTP_HOST="ops.example.com", HTTP_ORIGIN="https://ops.example.com",
                             HTTP_REFERER="https://ops.example.com/admin/login/", **PROXIED_HTTPS)
    assert login.status_code == 302 and login["Location"] == "/admin/"


def test_without_the_proxy_header_form_posts_need_a_trusted_origin_with_its_scheme(client, settings, admin_user):
    settings.ALLOWED_HOSTS = ["ops.example.com"]
    settings.SECURE_PROXY_SSL_HEADER = None

    def log_in():
        csrf_client = client.__class__(enforce_csrf_checks=True)
        token = csrf_client.get("/admin/login/", HTTP_HOST="ops.example.com").cookies["csrftoken"].value
        return csrf_client.post("/admin/login/", {"username": admin_user.username, "password": "pw-ada-admin",
                                                  "csrfmiddlewaretoken": token, "next": "/admin/"},
                                HTTP_HOST="ops.example.com", HTTP_ORIGIN="https://ops.example.com")

    settings.CSRF_TRUSTED_ORIGINS = []
    assert log_in().status_code == 403  # Django sees http://ops.example.com; the browser says https://
    settings.CSRF_TRUSTED_ORIGINS = ["https://ops.example.com"]
    assert log_in().status_code == 302


def test_ssl_redirect_behind_a_proxy_without_the_proxy_header_is_flagged(settings):
    settings.TRUSTED_PROXY_HEADER = "HTTP_X_FORWARDED_FOR"
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = None
    problems = {problem.id: problem for problem in check_deployment_settings(None)}
    assert isinstance(problems.get("portal.W003"), CheckWarning)
    assert "SECURE_PROXY_SSL_HEADER" in problems["portal.W003"].hint
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    assert "portal.W003" not in {problem.id for problem in check_deployment_settings(None)}


def test_hsts_flags_without_a_max_age_are_flagged(settings):
    settings.SECURE_HSTS_SECONDS = 0
    settings.SECURE_HSTS_PRELOAD = True
    assert "portal.W004" in {problem.id for problem in check_deployment_settings(None)}
    settings.SECURE_HSTS_SECONDS = 31536000
    assert "portal.W004" not in {problem.id for problem in check_deployment_settings(None)}
