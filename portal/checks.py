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


# The old system's variables that seed a row once (the default pool at the first migrate, the dispatch mode row the
# first time it is read); from then on the admin and the commands change the row, and the variable no longer does.
POOL_SEED_VARIABLES = {"RQ_AUTO_SCALING_ENABLED": "autoscale", "RQ_MIN_WORKERS": "minimum",
                       "RQ_MAX_WORKERS": "maximum", "RQ_SCALE_UP_THRESHOLD": "scale_up_threshold",
                       "RQ_SCALE_DOWN_THRESHOLD": "scale_down_threshold", "RQ_SCALE_UP_COOLDOWN": "scale_up_cooldown",
                       "RQ_SCALE_DOWN_COOLDOWN": "scale_down_cooldown"}
MODE_SEED_VARIABLES = {"RQ_HYBRID_RQ_PERCENT": "hybrid_rq_percent", "RQ_FALLBACK_ENABLED": "fallback_enabled",
                       "RQ_FALLBACK_TIMEOUT": "fallback_timeout"}  # each read into the setting of its own name


@register()
def check_seeded_rows(app_configs, **kwargs):
    """A seeding variable set to what its row no longer holds would look like it took effect after a restart (seed
    001's steps 2.1 and 4.1 edit the environment and restart): say it does not, and what changes the row. Reads two
    rows, and only when such a variable is set; says nothing when the database cannot answer (before migrate)."""
    import os

    from django.db import DatabaseError

    def is_set(name: str) -> bool:
        return bool(os.environ.get(name, "").strip())

    names = [name for name in (*POOL_SEED_VARIABLES, *MODE_SEED_VARIABLES, "RQ_ENABLED", "RQ_HYBRID_MODE")
             if is_set(name)]
    if not names:
        return []
    from migration.models import SystemMode
    from migration.state import seeded_mode
    from queues.models import WorkerPool

    problems = []
    try:
        pool = WorkerPool.objects.filter(name="default").first()
        row = SystemMode.objects.filter(pk=1).first()
    except DatabaseError:
        return []
    if pool is not None:
        for name, field in POOL_SEED_VARIABLES.items():
            wanted = settings.DEFAULT_POOL_SEED[field]
            if is_set(name) and getattr(pool, field) != wanted:
                problems.append(Warning(
                    f"{name}={os.environ[name].strip()} is not what the default pool has ({field} = "
                    f"{getattr(pool, field)}): the variable set the pool's row when the first migrate created it, "
                    "and changes nothing since.",
                    hint="Change the pool in the admin (Worker pools), or unset the variable.", id="portal.W011"))
    if row is not None:
        wanted_mode = seeded_mode()
        for name in ("RQ_ENABLED", "RQ_HYBRID_MODE"):
            if is_set(name) and row.mode != wanted_mode:
                problems.append(Warning(
                    f"{name}={os.environ[name].strip()} asks for mode {wanted_mode}, but the dispatch mode is "
                    f"{row.mode}: the variable set the mode only when its row was first written.",
                    hint=f"Change it with `manage.py migrate_to_rq mode {wanted_mode}` (or the migration console), "
                         "or unset the variable.", id="portal.W011"))
        for name, field in MODE_SEED_VARIABLES.items():
            if is_set(name) and getattr(row, field) != getattr(settings, name):
                problems.append(Warning(
                    f"{name}={os.environ[name].strip()} is not what the dispatch mode row has ({field} = "
                    f"{getattr(row, field)}): the variable set it only when the row was first written.",
                    hint="Change it in the admin (Migration: Dispatch mode; the RQ share also with `manage.py "
                         "migrate_to_rq mode hybrid --rq-percent N`), or unset the variable.", id="portal.W011"))
    return problems
