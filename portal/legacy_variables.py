"""Variables the old system's documents name that the portal does not read, and what replaces each.

The documents (``../shared/seeds/``, summarised in the README's *Configuration*) set these in operators' ``.env``
files. Each is reported when set, so that nobody believes it took effect: a system check at the start of every
``manage.py`` command (``portal.checks``) and a log line when a web process starts. The variables the portal does
read under the documents' names (``RQ_WORKER_COUNT``, ``RQ_CLEANUP_INTERVAL``, ``RQ_REDIS_HEALTH_CHECK_INTERVAL``,
``REDIS_HOST``/``REDIS_PORT``, ``WORKER_RETRY_COUNT``, ``QUEUE_MAX_RETRIES``, ...) are in ``portal/settings.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class NotRead:
    name: str
    document: str
    replacement: str
    # Values that already mean what the portal does (RQ_MONITORING_ENABLED=true): nothing to report.
    agrees: Callable[[str], bool] = lambda value: False


NOT_READ = (
    NotRead("RQ_HEALTH_CHECK_INTERVAL", "001",
            "health is computed on each request to /api/rq/health (cached for a second) and judged by the alert "
            "evaluator every ALERTS_EVALUATION_INTERVAL seconds (10); set that instead"),
    NotRead("RQ_MONITORING_ENABLED", "001",
            "monitoring cannot be turned off: /metrics, /api/rq/*, the sampler and the alert evaluator always run; "
            "to stop notifications, silence alerts or disable rules in the admin",
            agrees=lambda value: value.strip().lower() in {"1", "true", "yes", "on"}),
    NotRead("RQ_WORKER_MODE", "001",
            "workers never run inside the web process: the supervisor (manage.py runworkers; dev.py run starts one) "
            "runs them as processes of their own; RQ_WORKER_COUNT sets how many",
            agrees=lambda value: value.strip().lower() == "external"),
    NotRead("WORKER_POOL_SIZE", "003",
            "the number of worker processes is RQ_WORKER_COUNT (or the default pool's desired count in the admin), "
            "its ceiling RQ_MAX_WORKERS"),
    NotRead("WORKER_MAX_CONCURRENT_JOBS", "003",
            "the captions one worker process runs at once are its pool's slots: Worker pools in the admin"),
    NotRead("WORKER_HTTP_TIMEOUT", "003",
            "RQ_DEFAULT_TIMEOUT (90) bounds a whole caption attempt and the captioner's HTTP call gets what is left "
            "of it; IMAGE_FETCH_TIMEOUT bounds the image download"),
    NotRead("QUEUE_BATCH_SIZE", "003",
            "submissions and bulk operations write to Redis in pipelines of 1,000; migrate_to_rq start takes "
            "--batch-size"),
    NotRead("QUEUE_POLL_INTERVAL", "003",
            "RQ workers wait on Redis and never poll; the database poller's interval is LEGACY_POLL_INTERVAL and "
            "the relay's RELAY_INTERVAL"),
)


def not_read(environ: Mapping[str, str] = os.environ) -> list[tuple[NotRead, str]]:
    """The documented variables set in ``environ`` that the portal does not read, with their values."""
    found = []
    for variable in NOT_READ:
        value = environ.get(variable.name)
        if value is not None and value.strip() and not variable.agrees(value):
            found.append((variable, value.strip()))
    return found


def message(variable: NotRead, value: str) -> str:
    return (f"{variable.name}={value} (from the old system's document {variable.document}) is not read here: "
            f"{variable.replacement}.")


def log_not_read(logger) -> None:
    """One warning line per documented variable that is set but not read (a web process' start)."""
    for variable, value in not_read():
        logger.warning("%s", message(variable, value))
