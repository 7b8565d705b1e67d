"""Who may call the HTTP API, and how often.

A caller sends ``Authorization: Bearer <token>``: an ``ApiToken`` an Admin issued (``manage.py api_token create``).
The token acts as its user, who must be active staff, with that user's permissions (Support reads, Operators act,
Admins configure); every change is audited as that user ``via`` the token's name.

Each token has a rate: ``rate_limit`` requests a second (the token's own, or ``API_RATE_LIMIT``), with bursts of
twice that (portal.rate_limits: buckets in Redis, shared by every web process, and in the process while Redis does
not answer). The older calls of api/runbook.py count against the same bucket.
"""

from __future__ import annotations

import functools
import time

from django.conf import settings
from ninja.errors import Throttled
from ninja.security import HttpBearer

from api.errors import ApiError
from portal.rate_limits import limiter
from queues.audit import audit_via
from queues.models import ApiToken


class TokenAuth(HttpBearer):
    """The bearer token: live, its user active staff, within the token's rate; ``request.auth`` is then the token.
    Checked before the request's input is read. The operation's permission is ``needs``'s to check."""

    def authenticate(self, request, token: str):
        row = ApiToken.objects.authenticate(token.strip())
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
        return row


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


def needs(permission: str):
    """The view runs only for a token whose user has ``permission`` ("app.codename"); what it changes is audited
    as that user via the token's name."""

    def decorate(view):
        @functools.wraps(view)
        def wrapped(request, *args, **kwargs):
            token = request.auth
            if not permitted(token.user, permission):
                raise ApiError(403, f"the token's user {token.user.username!r} lacks the {permission} permission")
            with audit_via(f"API token {token.name}"):
                return view(request, *args, **kwargs)

        wrapped.permission = permission
        return wrapped

    return decorate
