"""Who may call the HTTP API, and how often.

A caller sends ``Authorization: Bearer <token>``: an ``ApiToken`` an Admin issued (``manage.py api_token create``).
The token acts as its user, who must be active staff, with that user's permissions (Support reads, Operators act,
Admins configure); every change is audited as that user ``via`` the token's name.

Each token has a rate: ``rate_limit`` requests a second (the token's own, or ``API_RATE_LIMIT``), with bursts of
twice that. The buckets live in Redis (one GCRA timestamp per token, so every web process shares them); while Redis
does not answer, each process keeps its own buckets at the same rate, so a runaway script is still held back.
"""

from __future__ import annotations

import functools
import os
import threading
import time

from django.conf import settings
from ninja.errors import Throttled
from ninja.security import HttpBearer

from api.errors import ApiError
from portal import redis_pools
from queues.audit import audit_via
from queues.models import ApiToken

# One request costs 1/rate seconds of a token's budget; the budget holds BURST_FACTOR seconds' worth.
BURST_FACTOR = 2
# KEYS[1]: the token's theoretical arrival time (GCRA). ARGV: the interval (1/rate, s) and the burst (s). Redis'
# own clock, so that web hosts with skewed clocks share one bucket. Returns 0 (allowed) or the wait, in ms.
RATE_SCRIPT = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local next_tat = tat + interval
if next_tat - now > burst then
  return math.ceil((next_tat - now - burst) * 1000)
end
redis.call('SET', KEYS[1], tostring(next_tat), 'PX', math.ceil((next_tat - now) * 1000) + 1000)
return 0
"""
REDIS_PAUSE = 5.0  # after a failed call, the local buckets serve this long before Redis is asked again


class RateLimiter:
    """GCRA buckets, in Redis when it answers within a quarter second, else in this process."""

    def __init__(self):
        self._script, self._where = None, None
        self._redis_down_until = 0.0
        self._local: dict[str, float] = {}
        self._lock = threading.Lock()

    def _redis(self):
        where = (os.getpid(), settings.REDIS_URL)  # a forked web worker, or settings changed (tests), starts afresh
        if self._script is None or self._where != where:
            client = redis_pools.client(socket_timeout=0.25, socket_connect_timeout=0.25, max_connections=64)
            self._script, self._where = client.register_script(RATE_SCRIPT), where
        return self._script

    def wait(self, key: str, rate: float) -> float:
        """0 when a request under ``key`` may go now; otherwise the seconds until it may."""
        interval, burst = 1.0 / rate, BURST_FACTOR
        if time.monotonic() >= self._redis_down_until:
            try:
                return int(self._redis()(keys=[f"portal:api:rate:{key}"], args=[interval, burst])) / 1000
            except Exception:  # noqa: BLE001 (any failure of Redis hands the bucket to this process for a while)
                self._redis_down_until = time.monotonic() + REDIS_PAUSE
        with self._lock:
            now = time.monotonic()
            tat = max(self._local.get(key, now), now)
            if tat + interval - now > burst:
                return tat + interval - now - burst
            self._local[key] = tat + interval
            return 0.0


limiter = RateLimiter()


class TokenAuth(HttpBearer):
    """The bearer token's presence; ``needs`` checks the token itself with the operation's permission (one query
    for both). Without ``Authorization: Bearer ...`` Django Ninja answers 401 before the view."""

    def authenticate(self, request, token: str):
        return token.strip() or None


# A user's permissions, as Django's ModelBackend lists them (their own and their groups'), are read once per
# PERMISSIONS_FOR seconds per process: a role changed in the admin applies to that user's tokens within that time
# (revoking a token, or making its user inactive or not staff, applies at once: the token's row is read every time).
PERMISSIONS_FOR = 2.0
_permissions: dict[tuple, tuple[float, frozenset]] = {}


def permitted(user, permission: str) -> bool:
    if user.is_superuser:
        return True
    now = time.monotonic()
    key = (user.pk, user.date_joined)  # an id SQLite gave again after a user was deleted is another user
    known = _permissions.get(key)
    if known is None or known[0] <= now:
        known = _permissions[key] = (now + PERMISSIONS_FOR, frozenset(user.get_all_permissions()))
    return permission in known[1]


def _token(request, permission: str) -> ApiToken:
    """The live token the request carries, its user active staff with ``permission``, within its rate."""
    row = ApiToken.objects.authenticate(request.auth)
    if row is None:
        raise ApiError(401, "the API token is not valid (unknown, revoked or expired)",
                       headers={"WWW-Authenticate": 'Bearer realm="api", error="invalid_token"'})
    user = row.user
    if not user.is_active or not user.is_staff:
        # A user who may no longer sign in to the admin may not act through a token either.
        raise ApiError(403, f"the token's user {user.username!r} is not an active staff member")
    wait = limiter.wait(str(row.pk), row.rate_limit or settings.API_RATE_LIMIT)
    if wait:
        raise Throttled(wait)
    if not permitted(user, permission):
        raise ApiError(403, f"the token's user {user.username!r} lacks the {permission} permission")
    return row


def needs(permission: str):
    """The view runs only for a live token, within its rate, whose user is active staff with ``permission``
    ("app.codename"); ``request.auth`` is then the token, and what the view changes is audited as its user via the
    token's name."""

    def decorate(view):
        @functools.wraps(view)
        def wrapped(request, *args, **kwargs):
            token = request.auth = _token(request, permission)
            with audit_via(f"API token {token.name}"):
                return view(request, *args, **kwargs)

        wrapped.permission = permission
        return wrapped

    return decorate
