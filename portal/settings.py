"""Settings of the RQ Ops Portal. Everything comes from environment variables (see the README's table).

With nothing set the portal runs locally: a SQLite file and an embedded real Redis server under ``var/``, and a
generated secret key kept in ``var/secret_key``. With ``DEBUG=false`` (production) a ``SECRET_KEY`` is required.
"""

import logging
import os
import secrets
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from portal import logs
from portal.env import (
    check_redis_url,
    env_bool,
    env_choice,
    env_float,
    env_header,
    env_host_ports,
    env_http_url,
    env_int,
    env_list,
    env_origins,
    env_str,
    parse_database_url,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("PORTAL_VAR_DIR", str(BASE_DIR / "var")))
if not VAR_DIR.is_absolute():
    VAR_DIR = BASE_DIR / VAR_DIR

DEBUG = env_bool("DEBUG", False)
# Local mode: the embedded database and Redis (nothing else configured), as the README's run command uses them.
# A deployment that names its own database or Redis is production: it must bring its own SECRET_KEY.
LOCAL_MODE = env_bool("PORTAL_LOCAL", not any(env_str(name) for name in (
    "DATABASE_URL", "REDIS_URL", "RQ_REDIS_URL", "REDIS_HOST", "REDIS_SENTINELS")))


def _secret_key() -> str:
    explicit = env_str("SECRET_KEY")
    if explicit:
        if len(explicit) < 32:
            raise ImproperlyConfigured("SECRET_KEY must be at least 32 characters long")
        return explicit
    if not (DEBUG or LOCAL_MODE):
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DATABASE_URL, REDIS_URL or REDIS_SENTINELS is (a deployment); for local use with embedded "
            "defaults leave them unset, or set PORTAL_LOCAL=true")
    key_file = VAR_DIR / "secret_key"
    if not key_file.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
# Origins (scheme included) whose form posts Django accepts besides the request's own host; see the README's proxy
# section for when they are needed.
CSRF_TRUSTED_ORIGINS = env_origins("CSRF_TRUSTED_ORIGINS")

# HTTPS behind a proxy that terminates TLS. The proxy must set this header itself (overwriting what a client sent);
# then Django knows a request was HTTPS: secure redirects, HSTS and the CSRF origin check work.
_proxy_ssl_header = env_header("SECURE_PROXY_SSL_HEADER")
SECURE_PROXY_SSL_HEADER = (_proxy_ssl_header, "https") if _proxy_ssl_header else None
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
# Load balancers and orchestrators probe backends over plain HTTP; a redirect would mark the portal down.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
# The address audit entries record: REMOTE_ADDR, unless the portal is only reachable through proxies that append
# the client's address to this header (X-Forwarded-For); then the entry the outermost of the TRUSTED_PROXY_COUNT
# proxies added, counted from the right. Entries left of it were written by the client and are never trusted.
TRUSTED_PROXY_HEADER = env_header("TRUSTED_PROXY_HEADER")
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 1, minimum=1, maximum=10)

INSTALLED_APPS = [
    # Our apps come first so that queues' rqworker command (allow-listed jobs only) replaces django-rq's.
    "portal",
    "queues",
    "monitoring",
    "migration",
    "portal.apps.PortalAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_rq",
    "ninja",  # the API's documentation page, from the package's own static files (no CDN)
    "django_prometheus",
    "channels",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "portal.middleware.CorrelationIdMiddleware",  # early: everything after it (and its log lines) has the id
    "portal.middleware.MachineErrorsAsJsonMiddleware",  # after it, every error of /api/ and /metrics is JSON
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"
ASGI_APPLICATION = "portal.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "portal.context_processors.operations_banner",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'portal.sqlite3'}")
DATABASES = {"default": parse_database_url("DATABASE_URL", DATABASE_URL, base_dir=BASE_DIR)}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Redis: one server (REDIS_URL; RQ_REDIS_URL is the old system's name for it, REDIS_HOST and REDIS_PORT the
# implementation plan's), or the master that Redis Sentinel names (REDIS_SENTINELS), or none of them: the embedded
# server. portal/redis_pools.py opens every connection from these.
_redis_variables = [name for name in ("REDIS_URL", "RQ_REDIS_URL", "REDIS_HOST") if env_str(name)]
if len(_redis_variables) > 1:
    raise ImproperlyConfigured(f"{', '.join(_redis_variables[:-1])} and {_redis_variables[-1]} are set; set one of "
                               "them (REDIS_URL, or the old names RQ_REDIS_URL or REDIS_HOST with REDIS_PORT)")
_redis_variable = _redis_variables[0] if _redis_variables else "REDIS_URL"
REDIS_SENTINELS = env_host_ports("REDIS_SENTINELS")
REDIS_SENTINEL_MASTER = env_str("REDIS_SENTINEL_MASTER", "mymaster")
REDIS_SENTINEL_PASSWORD = env_str("REDIS_SENTINEL_PASSWORD")  # the sentinels' own (requirepass in sentinel.conf)
REDIS_PASSWORD = env_str("REDIS_PASSWORD")  # the data servers'; a password inside REDIS_URL wins
REDIS_DB = env_int("REDIS_DB", 0, minimum=0)  # with Sentinel or REDIS_HOST (REDIS_URL names its database itself)
if _redis_variable == "REDIS_HOST":
    _configured_redis = "redis://{}:{}/{}".format(env_str("REDIS_HOST"), env_int("REDIS_PORT", 6379, minimum=1,
                                                                                  maximum=65535), REDIS_DB)
else:
    _configured_redis = env_str(_redis_variable)
    if env_str("REDIS_PORT"):
        raise ImproperlyConfigured("REDIS_PORT is set without REDIS_HOST; set both, or name the server in REDIS_URL")
# Seconds a pooled Redis connection may sit idle before its next use checks it with PING first (redis-py's
# health_check_interval on each process' main pool): the old system's Redis health check interval.
REDIS_HEALTH_CHECK_INTERVAL = env_int("RQ_REDIS_HEALTH_CHECK_INTERVAL", 30, minimum=0)
# Each process' pool holds at most this many connections; a caller finding them all in use waits up to
# REDIS_POOL_TIMEOUT seconds, then gets an error that names the setting (redis_pools.PoolExhausted), never a hang.
REDIS_MAX_CONNECTIONS = env_int("REDIS_MAX_CONNECTIONS", 50, minimum=2)
REDIS_POOL_TIMEOUT = env_float("REDIS_POOL_TIMEOUT", 5.0, minimum=0.1)
if REDIS_SENTINELS and _configured_redis:
    raise ImproperlyConfigured(f"{_redis_variable} and REDIS_SENTINELS are both set; set one: REDIS_URL names one "
                               "server, REDIS_SENTINELS the sentinels that name the master")
EMBEDDED_REDIS = _configured_redis is None and not REDIS_SENTINELS
EMBEDDED_REDIS_PORT = env_int("EMBEDDED_REDIS_PORT", 6390, minimum=1, maximum=65535)
if EMBEDDED_REDIS:
    from portal.embedded_redis import embedded_server

    REDIS_URL = embedded_server(VAR_DIR, EMBEDDED_REDIS_PORT).url
elif REDIS_SENTINELS:
    # Not a URL any client opens: it names the Redis in messages and tells processes that the setting changed.
    REDIS_URL = "sentinel://{}/{}/{}".format(",".join(f"{host}:{port}" for host, port in REDIS_SENTINELS),
                                            REDIS_SENTINEL_MASTER, REDIS_DB)
else:
    REDIS_URL = check_redis_url(_redis_variable, _configured_redis)

# Task settings, with the old system's names and defaults.
RQ_DEFAULT_TIMEOUT = env_int("RQ_DEFAULT_TIMEOUT", 90, minimum=1)
# The old system's autoscaling variables seed the default pool's row when it is created (the first migrate); from
# then on the admin (Worker pools) is the place to change them.
DEFAULT_POOL_SEED = {
    "autoscale": env_bool("RQ_AUTO_SCALING_ENABLED", False),
    "minimum": env_int("RQ_MIN_WORKERS", 2, minimum=0),
    "maximum": env_int("RQ_MAX_WORKERS", 10, minimum=1),
    "scale_up_threshold": env_int("RQ_SCALE_UP_THRESHOLD", 100, minimum=1),
    "scale_down_threshold": env_int("RQ_SCALE_DOWN_THRESHOLD", 20, minimum=0),
    "scale_up_cooldown": env_int("RQ_SCALE_UP_COOLDOWN", 300, minimum=0),
    "scale_down_cooldown": env_int("RQ_SCALE_DOWN_COOLDOWN", 600, minimum=0),
}
if DEFAULT_POOL_SEED["minimum"] > DEFAULT_POOL_SEED["maximum"]:
    raise ImproperlyConfigured(f"RQ_MIN_WORKERS ({DEFAULT_POOL_SEED['minimum']}) must not be above RQ_MAX_WORKERS "
                               f"({DEFAULT_POOL_SEED['maximum']})")
if DEFAULT_POOL_SEED["scale_down_threshold"] >= DEFAULT_POOL_SEED["scale_up_threshold"]:
    raise ImproperlyConfigured("RQ_SCALE_DOWN_THRESHOLD must be below RQ_SCALE_UP_THRESHOLD, or the pool would flap")
# The old system's worker count: when set, every supervisor start (runworkers, dev.py run) sets the default pool's
# desired number of workers to it, widening the pool's bounds if needed (seed 000's emergency step: export
# RQ_WORKER_COUNT=8 and restart). Unset, the pool keeps what the admin or the autoscaler last set.
RQ_WORKER_COUNT = env_int("RQ_WORKER_COUNT", None, minimum=0, maximum=64)
RQ_RESULT_TTL = env_int("RQ_RESULT_TTL", 3600, minimum=0)
RQ_FAILURE_TTL = env_int("RQ_FAILURE_TTL", 30 * 24 * 3600, minimum=60)
# RQ_MAX_RETRIES; the implementation plan called it WORKER_RETRY_COUNT and QUEUE_MAX_RETRIES: any of them, as long
# as those set agree.
_retries = {name: env_int(name, 3, minimum=0, maximum=50)
            for name in ("RQ_MAX_RETRIES", "WORKER_RETRY_COUNT", "QUEUE_MAX_RETRIES") if env_str(name)}
if len(set(_retries.values())) > 1:
    raise ImproperlyConfigured("Retry counts disagree: " + ", ".join(f"{name}={value}" for name, value in
                                                                     _retries.items()) + "; set RQ_MAX_RETRIES alone")
RQ_MAX_RETRIES = next(iter(_retries.values()), 3)
RQ_RETRY_BACKOFF = env_float("RQ_RETRY_BACKOFF", 2.0, minimum=0.0)  # seconds before the 1st retry; doubles each time
RQ_RETRY_BACKOFF_MAX = env_float("RQ_RETRY_BACKOFF_MAX", 300.0, minimum=0.0)
CAPTION_BACKEND = env_choice("CAPTION_BACKEND", "local", ("local", "ollama"))
OLLAMA_URL = env_http_url("OLLAMA_URL", "http://127.0.0.1:11434")
OLLAMA_MODEL = env_str("OLLAMA_MODEL", "llava")
IMAGE_MAX_BYTES = env_int("IMAGE_MAX_BYTES", 20 * 1024 * 1024, minimum=1)
IMAGE_MAX_PIXELS = env_int("IMAGE_MAX_PIXELS", 50_000_000, minimum=1)
IMAGE_FETCH_TIMEOUT = env_float("IMAGE_FETCH_TIMEOUT", 15.0, minimum=0.1)
IMAGE_FETCH_ALLOW_PRIVATE = env_bool("IMAGE_FETCH_ALLOW_PRIVATE", False)
# Notification channels (webhook, Slack, PagerDuty URLs) may not point at loopback, private, link-local or other
# internal addresses unless this is set: an Admin's channel (or a stolen Admin session) must not make the portal probe
# the internal network.
NOTIFY_ALLOW_PRIVATE = env_bool("NOTIFY_ALLOW_PRIVATE", False)
# Seconds a freshly submitted task is left to its submitter to publish before the relay publishes it instead.
RELAY_GRACE_SECONDS = env_float("RELAY_GRACE_SECONDS", 5.0, minimum=0.0)
RELAY_INTERVAL = env_float("RELAY_INTERVAL", 1.0, minimum=0.05)
# Completed, cancelled and discarded tasks older than this are removed by the fleet's periodic cleanup and
# ``manage.py tasks cleanup`` (failed ones, the dead letters, stay).
TASK_RETENTION_DAYS = env_int("TASK_RETENTION_DAYS", 30, minimum=1)
# Seconds between the fleet's automatic cleanups (what ``tasks cleanup`` does, with TASK_RETENTION_DAYS): one
# supervisor of the fleet runs it. 0 turns it off.
RQ_CLEANUP_INTERVAL = env_int("RQ_CLEANUP_INTERVAL", 3600, minimum=0)

# The migration from the database-polling worker (the migration app). These seed the dispatch mode row the first
# time it is read; from then on the admin (Admins) and ``manage.py migrate_to_rq mode`` change it.
RQ_ENABLED = env_bool("RQ_ENABLED", True)
RQ_HYBRID_MODE = env_bool("RQ_HYBRID_MODE", False)
# Whether the database poller may run here for normal dispatch (the legacy and hybrid modes, a rollback, pollers
# started by hand). The Redis fallback's pollers are governed by RQ_FALLBACK_ENABLED alone.
DATABASE_POLLING_ENABLED = env_bool("DATABASE_POLLING_ENABLED", True)
if not RQ_ENABLED and not DATABASE_POLLING_ENABLED:
    raise ImproperlyConfigured("RQ_ENABLED and DATABASE_POLLING_ENABLED are both false: nothing would run tasks")
if RQ_HYBRID_MODE and not (RQ_ENABLED and DATABASE_POLLING_ENABLED):
    raise ImproperlyConfigured("RQ_HYBRID_MODE needs both RQ_ENABLED and DATABASE_POLLING_ENABLED")
RQ_HYBRID_RQ_PERCENT = env_int("RQ_HYBRID_RQ_PERCENT", 50, minimum=0, maximum=100)
RQ_FALLBACK_ENABLED = env_bool("RQ_FALLBACK_ENABLED", True)
RQ_FALLBACK_TIMEOUT = env_int("RQ_FALLBACK_TIMEOUT", 30, minimum=1)
# Seconds between the database poller's looks for work when it found none.
LEGACY_POLL_INTERVAL = env_float("LEGACY_POLL_INTERVAL", 1.0, minimum=0.01)
TASK_DISPATCH_POLICY = "migration.dispatch.ModePolicy"
MIGRATION_BACKUP_DIR = Path(env_str("MIGRATION_BACKUP_DIR", str(VAR_DIR / "backups")))
# Backups a new one leaves in MIGRATION_BACKUP_DIR (the newest; older ones of ours are deleted after it is written).
MIGRATION_BACKUP_KEEP = env_int("MIGRATION_BACKUP_KEEP", 5, minimum=1)
# Seconds without a heartbeat after which a migration run's executor is taken as dead and the run may be resumed.
MIGRATION_RUN_LEASE_SECONDS = env_int("MIGRATION_RUN_LEASE_SECONDS", 30, minimum=2)

# /metrics and /api/rq/*: a session with queues.view_queueoverview, or "Authorization: Bearer <METRICS_TOKEN>"
# (for Prometheus).
METRICS_TOKEN = env_str("METRICS_TOKEN")
# Where the dashboard pages open their WebSocket. Empty: the page's own host at /ws/metrics/ (the local runner, or
# a load balancer routing /ws/ to the ASGI server). Set it when the ASGI server has an address of its own, for
# example ws://ops.example.org:8001/ws/metrics/ (its host must be in ALLOWED_HOSTS and receive the session cookie).
LIVE_WEBSOCKET_URL = env_str("LIVE_WEBSOCKET_URL", "")
if LIVE_WEBSOCKET_URL and not LIVE_WEBSOCKET_URL.startswith(("ws://", "wss://")):
    raise ImproperlyConfigured("LIVE_WEBSOCKET_URL must start with ws:// or wss://")
if METRICS_TOKEN is not None and len(METRICS_TOKEN) < 16:
    raise ImproperlyConfigured("METRICS_TOKEN must be at least 16 characters long")

# The HTTP API (/api/v1/, described at /api/schema/): requests a second an API token may make when the token has no
# rate of its own (manage.py api_token create --rate), with bursts of twice that; beyond, 429 with Retry-After.
API_RATE_LIMIT = env_int("API_RATE_LIMIT", 20, minimum=1, maximum=10000)
# Django Ninja's own throttling is not used (api.access keeps the per-token buckets); its pagination cap:
NINJA_PAGINATION_MAX_LIMIT = 200

# Alerts. POST /api/alerts/alertmanager (Prometheus Alertmanager's webhook) needs
# "Authorization: Bearer <ALERTS_WEBHOOK_TOKEN>"; without the token set, the webhook is closed.
ALERTS_WEBHOOK_TOKEN = env_str("ALERTS_WEBHOOK_TOKEN")
if ALERTS_WEBHOOK_TOKEN is not None and len(ALERTS_WEBHOOK_TOKEN) < 16:
    raise ImproperlyConfigured("ALERTS_WEBHOOK_TOKEN must be at least 16 characters long")
# The portal's own address, for links in notifications ("open the alert") and the exported Alertmanager receiver.
PORTAL_URL = env_http_url("PORTAL_URL", "http://127.0.0.1:8000").rstrip("/")
# Seconds between alert evaluations (evaluate_alerts, or the supervisor hosting it).
ALERTS_EVALUATION_INTERVAL = env_float("ALERTS_EVALUATION_INTERVAL", 10.0, minimum=0.5)
# A start, deploy or restart must not page: for this many seconds after a supervisor or the evaluator starts, the
# rules about workers (no workers, few workers, saturation, health) wait while fewer caption slots are alive than the
# pools desire. Once the workers are up, or the time is over, they are judged as always.
FLEET_START_GRACE = env_float("FLEET_START_GRACE", 60.0, minimum=0)

# Email notifications: Django's SMTP backend, configured from the environment (the console backend locally).
EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend" if not env_str("EMAIL_HOST")
                        else "django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1, maximum=65535)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
if EMAIL_USE_TLS and EMAIL_USE_SSL:
    raise ImproperlyConfigured("EMAIL_USE_TLS and EMAIL_USE_SSL cannot both be true")
EMAIL_TIMEOUT = env_float("EMAIL_TIMEOUT", 10.0, minimum=1.0)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "rq-ops-portal@localhost")

# Per-minute metric samples are folded into hourly ones after a day and deleted after this many days.
METRICS_RETENTION_DAYS = env_int("METRICS_RETENTION_DAYS", 30, minimum=1)
# Resolved alerts (with their timelines) and finished notifications (with their delivery attempts) older than this are
# deleted by the sampler's hourly pass; open alerts and notifications still to be sent are never.
ALERT_RETENTION_DAYS = env_int("ALERT_RETENTION_DAYS", 180, minimum=1)

CAPTION_QUEUES = ("urgent", "high", "normal", "low")
# Per-process cache (the health report's one-second cache); django-prometheus' backend counts hits and misses.
CACHES = {"default": {"BACKEND": "django_prometheus.cache.backends.locmem.LocMemCache", "LOCATION": "portal"}}

# django-rq's own configuration (its views and classes); our workers and the broker connect through
# portal/redis_pools.py, which reads the same settings.
_RQ_CONNECTION = {"URL": REDIS_URL} if not REDIS_SENTINELS else {
    "SENTINELS": REDIS_SENTINELS, "MASTER_NAME": REDIS_SENTINEL_MASTER, "DB": REDIS_DB, "PASSWORD": REDIS_PASSWORD,
    "SENTINEL_KWARGS": {"password": REDIS_SENTINEL_PASSWORD, "socket_timeout": 2}, "SOCKET_TIMEOUT": 10,
}
RQ_QUEUES = {
    name: {
        **_RQ_CONNECTION,
        "DEFAULT_TIMEOUT": RQ_DEFAULT_TIMEOUT,
        "DEFAULT_RESULT_TTL": RQ_RESULT_TTL,
        "SERIALIZER": "rq.serializers.JSONSerializer",
    }
    for name in CAPTION_QUEUES
}
RQ = {
    "JOB_CLASS": "queues.broker.CaptionJob",
    "WORKER_CLASS": "queues.fleet.worker.CaptionWorker",
    "QUEUE_CLASS": "queues.broker.CaptionQueue",
    "DEFAULT_RESULT_TTL": RQ_RESULT_TTL,
}
# django-rq registers its dashboard in the admin unless told not to; its views check only is_staff and change queue
# state (see portal/urls.py). django_rq stays installed for its queue classes and the rqworker command we extend.
RQ_SHOW_ADMIN_LINK = False
# The only callables a worker will run. A job in Redis naming anything else fails without running.
RQ_ALLOWED_CALLABLES = frozenset({"queues.jobs.caption_task", "queues.jobs.bulk_operation",
                                  "monitoring.jobs.notification_deliver"})

CHANNEL_LAYERS = {
    "default": {
        # channels-redis with its connection pool from portal/redis_pools.py: Sentinel when configured, and at most
        # REDIS_MAX_CONNECTIONS connections that a burst waits for (channels-redis' own pool raises at once when
        # all are in use: 200 dashboards connecting together had half of their group_add calls fail).
        "BACKEND": "portal.redis_pools.ChannelLayer",
        "CONFIG": {"hosts": [{"address": REDIS_URL}], "prefix": "portal:channels"},
    }
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# WhiteNoise also serves the apps' static files without collectstatic (the dashboards' scripts and the vendored
# charting library): the test servers and a fresh checkout have no collected files.
WHITENOISE_USE_FINDERS = True
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(VAR_DIR / "static")))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns about a missing directory before collectstatic
MEDIA_URL = "media/"
MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(VAR_DIR / "media"))).resolve()

if not DEBUG and not LOCAL_MODE:
    SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", True)
    CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", True)

# LOG_FORMAT=json: one JSON object per line (python-json-logger) with the correlation id, task, worker and queue
# where known; plain text otherwise. Web (gunicorn with portal.gunicorn_config, uvicorn), workers, supervisor and
# commands all log through portal.logs.
LOG_FORMAT, LOG_LEVEL = logs.log_settings()
if LOG_FORMAT == "json":
    logging.captureWarnings(True)  # a warning is a log record too, not a text line among the JSON
LOGGING = logs.logging_config(LOG_FORMAT, LOG_LEVEL, loggers={"django.db.backends": {"level": "INFO"}})
