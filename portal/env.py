"""Strict helpers that read settings from environment variables.

Every helper raises ``ImproperlyConfigured`` naming the variable when its value cannot be used, so a typo in a
deployment fails at start-up with a message that says what to fix instead of surfacing later as odd behaviour.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


def env_str(name: str, default: str | None = None, *, environ=os.environ) -> str | None:
    value = environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip()


def env_bool(name: str, default: bool, *, environ=os.environ) -> bool:
    value = env_str(name, environ=environ)
    if value is None:
        return default
    if value.lower() in TRUE_WORDS:
        return True
    if value.lower() in FALSE_WORDS:
        return False
    raise ImproperlyConfigured(f"{name} must be one of true/false, yes/no, on/off, 1/0; got {value!r}")


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None,
            environ=os.environ) -> int:
    value = env_str(name, environ=environ)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number; got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}; got {number}")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name} must be at most {maximum}; got {number}")
    return number


def env_float(name: str, default: float, *, minimum: float | None = None, environ=os.environ) -> float:
    value = env_str(name, environ=environ)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number; got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}; got {number}")
    return number


def env_choice(name: str, default: str, choices: tuple[str, ...], *, environ=os.environ) -> str:
    value = env_str(name, environ=environ)
    if value is None:
        return default
    if value not in choices:
        raise ImproperlyConfigured(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def env_list(name: str, default: list[str], *, environ=os.environ) -> list[str]:
    value = env_str(name, environ=environ)
    if value is None:
        return default
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise ImproperlyConfigured(f"{name} must be a comma-separated list with at least one entry; got {value!r}")
    return items


def env_host_ports(name: str, *, environ=os.environ) -> list[tuple[str, int]]:
    """A comma-separated ``host:port`` list (``REDIS_SENTINELS=10.0.0.1:26379,10.0.0.2:26379``); empty when unset."""
    value = env_str(name, environ=environ)
    if value is None:
        return []
    result = []
    for item in env_list(name, [], environ=environ):
        host, colon, port = item.rpartition(":")
        host = host.strip("[]")  # [::1]:26379
        if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ImproperlyConfigured(f"{name} must be a comma-separated list of host:port pairs, e.g. "
                                       f"10.0.0.1:26379,10.0.0.2:26379; {item!r} is not one")
        result.append((host, int(port)))
    return result


HEADER_NAME = re.compile(r"[A-Za-z0-9]+(-[A-Za-z0-9]+)*")


def env_header(name: str, *, environ=os.environ) -> str | None:
    """An HTTP header name (``X-Forwarded-Proto``) as Django's ``request.META`` key (``HTTP_X_FORWARDED_PROTO``).

    Underscores are refused: WSGI servers and proxies drop or merge headers spelt with them."""
    value = env_str(name, environ=environ)
    if value is None:
        return None
    if not HEADER_NAME.fullmatch(value):
        raise ImproperlyConfigured(f"{name} must be an HTTP header name such as X-Forwarded-Proto; got {value!r}")
    return "HTTP_" + value.upper().replace("-", "_")


def env_origins(name: str, *, environ=os.environ) -> list[str]:
    """Comma-separated origins, each ``scheme://host[:port]`` (Django 4+ compares the scheme too; a subdomain
    wildcard ``https://*.example.com`` is allowed). Empty or unset: none."""
    if env_str(name, environ=environ) is None:
        return []
    origins = env_list(name, [], environ=environ)
    for origin in origins:
        parsed = urlparse(origin)
        try:
            parsed.port
        except ValueError:
            parsed = None
        if (parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc
                or parsed.path or parsed.query or parsed.fragment or parsed.username):
            raise ImproperlyConfigured(f"{name} must list origins with their scheme, e.g. https://ops.example.com; "
                                       f"got {origin!r}")
    return origins


def env_http_url(name: str, default: str, *, environ=os.environ) -> str:
    value = env_str(name, default, environ=environ)
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ImproperlyConfigured(f"{name} must be an http:// or https:// URL with a host; got {value!r}")
    return value.rstrip("/")


def parse_database_url(name: str, value: str, *, base_dir: Path) -> dict:
    """Turns ``sqlite:///path`` or ``mysql://user:pass@host:port/db`` into a Django DATABASES entry."""
    parsed = urlparse(value)
    if parsed.scheme == "sqlite":
        # sqlite:///relative/path and sqlite:////absolute/path, as in dj-database-url.
        path = unquote(parsed.path[1:] if parsed.path.startswith("/") else parsed.path)
        if not path:
            raise ImproperlyConfigured(f"{name} must name a database file, e.g. sqlite:///var/portal.sqlite3")
        path = Path(path) if Path(path).is_absolute() else base_dir / path
        return {
            "ENGINE": "portal.sqlite3",  # Django's with query counts and timings; writers take turns (portal/sqlite3)
            "NAME": str(path),
            # WAL lets the portal read while workers write; IMMEDIATE makes writers queue instead of failing
            # with "database is locked" when a transaction upgrades from read to write.
            "OPTIONS": {
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            # Keep the file open between jobs: closing the last connection checkpoints the WAL, about 1 ms each
            # time, which would otherwise be paid by every job a worker runs.
            "CONN_MAX_AGE": 600,
            "TEST": {"NAME": str(path.with_name(path.stem + "_test" + path.suffix))},
        }
    if parsed.scheme in ("mysql", "mariadb"):
        database = parsed.path.lstrip("/")
        if not database or not parsed.hostname:
            raise ImproperlyConfigured(f"{name} must look like mysql://user:password@host:3306/database; got {value!r}")
        try:
            port = parsed.port
        except ValueError:
            raise ImproperlyConfigured(f"{name} has an invalid port; got {value!r}") from None
        options = {"charset": "utf8mb4"}
        query = parse_qs(parsed.query)
        if "unix_socket" in query:
            options["unix_socket"] = query["unix_socket"][0]
        return {
            "ENGINE": "django_prometheus.db.backends.mysql",  # Django's, plus query counts and timings
            "NAME": unquote(database),
            "USER": unquote(parsed.username or ""),
            "PASSWORD": unquote(parsed.password or ""),
            "HOST": parsed.hostname,
            "PORT": str(port or ""),
            "OPTIONS": options,
            # Workers are long-running: reuse connections for a minute, and check them before use so a
            # connection the server closed is replaced instead of failing the next task.
            "CONN_MAX_AGE": 60,
            "CONN_HEALTH_CHECKS": True,
            # The test database as the README has the portal's created: a server's own default may be latin1
            # (mariadbd --no-defaults), which refuses most of Unicode.
            "TEST": {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_unicode_ci"},
        }
    raise ImproperlyConfigured(f"{name} must start with sqlite:// or mysql://; got {value!r}")


def check_redis_url(name: str, value: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise ImproperlyConfigured(f"{name} must start with redis://, rediss:// or unix://; got {value!r}")
    if parsed.scheme == "unix" and not parsed.path:
        raise ImproperlyConfigured(f"{name} must name a socket path, e.g. unix:///run/redis.sock; got {value!r}")
    if parsed.scheme != "unix" and not parsed.hostname:
        raise ImproperlyConfigured(f"{name} must name a host, e.g. redis://localhost:6379/0; got {value!r}")
    try:
        parsed.port
    except ValueError:
        raise ImproperlyConfigured(f"{name} has an invalid port; got {value!r}") from None
    return value
