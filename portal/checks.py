"""System checks for dangerous combinations of settings (run by ``manage.py check`` and at start-up)."""

from django.conf import settings
from django.core.checks import Error, Warning, register

from portal import legacy_variables


@register()
def check_deployment_settings(app_configs, **kwargs):
    problems = []
    if settings.DEBUG and not settings.LOCAL_MODE:
        problems.append(Warning(
            "DEBUG is on in a deployment with its own SECRET_KEY.",
            hint="Set DEBUG=false in production; tracebacks leak settings and task data.",
            id="portal.W001",
        ))
    if settings.IMAGE_FETCH_ALLOW_PRIVATE and not (settings.DEBUG or settings.LOCAL_MODE):
        problems.append(Warning(
            "IMAGE_FETCH_ALLOW_PRIVATE lets task submitters make the workers fetch internal addresses.",
            hint="Leave it off in production unless images really live on a private network.",
            id="portal.W002",
        ))
    if settings.NOTIFY_ALLOW_PRIVATE and not (settings.DEBUG or settings.LOCAL_MODE):
        problems.append(Warning(
            "NOTIFY_ALLOW_PRIVATE lets notification channels send to internal addresses.",
            hint="Leave it off in production unless a receiver really lives on a private network.",
            id="portal.W005",
        ))
    if settings.SECURE_SSL_REDIRECT and settings.TRUSTED_PROXY_HEADER and not settings.SECURE_PROXY_SSL_HEADER:
        problems.append(Warning(
            "SECURE_SSL_REDIRECT is on behind a proxy (TRUSTED_PROXY_HEADER is set) but SECURE_PROXY_SSL_HEADER "
            "is not.",
            hint="If the proxy terminates TLS, every request reaches Django as plain HTTP and is redirected forever: "
                 "set SECURE_PROXY_SSL_HEADER=X-Forwarded-Proto (the proxy must set that header).",
            id="portal.W003",
        ))
    if not settings.SECURE_HSTS_SECONDS and (settings.SECURE_HSTS_INCLUDE_SUBDOMAINS or settings.SECURE_HSTS_PRELOAD):
        problems.append(Warning(
            "SECURE_HSTS_INCLUDE_SUBDOMAINS or SECURE_HSTS_PRELOAD is set but SECURE_HSTS_SECONDS is 0: no HSTS "
            "header is sent.",
            hint="Set SECURE_HSTS_SECONDS (preload lists want 31536000 or more), or leave the flags off.",
            id="portal.W004",
        ))
    if settings.CAPTION_BACKEND == "ollama" and not settings.OLLAMA_MODEL:
        problems.append(Error("CAPTION_BACKEND=ollama needs OLLAMA_MODEL.", id="portal.E001"))
    if settings.RQ_RETRY_BACKOFF_MAX < settings.RQ_RETRY_BACKOFF:
        problems.append(Error(
            "RQ_RETRY_BACKOFF_MAX is smaller than RQ_RETRY_BACKOFF.",
            hint="The first retry would already wait longer than the cap.",
            id="portal.E002",
        ))
    return problems


@register()
def check_old_system_variables(app_configs, **kwargs):
    """The old system's variables that are set but not read here: said at every start, never silently ignored."""
    return [Warning(legacy_variables.message(variable, value), hint=f"Unset {variable.name} to silence this.",
                    id="portal.W010")
            for variable, value in legacy_variables.not_read()]
