"""The fleet API for scripts (the runbook's scale and restart calls): POST /api/rq/workers/scale and
POST /api/rq/workers/restart.

Callers authenticate with ``Authorization: Bearer <token>``, an ``ApiToken`` an Admin created (``manage.py api_token
create NAME --user U``; the token is shown once, only its SHA-256 is stored). It is not the metrics token: a token
acts as its user and needs that user's ``queues.manage_fleet`` permission, as the admin's buttons do, and every call
is an audit entry of that user ``via`` the token's name. Errors are JSON ``{"error": ...}`` with 400 (naming the
field), 401, 403, 404 (unknown pool or worker), 405 or 503 (Redis or the database away).
"""

import json
import logging

from django.core.exceptions import ValidationError
from django.db import DatabaseError
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from queues import broker
from queues.audit import audit_via
from queues.errors import BrokerUnavailable
from portal.admin_pages import client_address
from queues.fleet.admin import MANAGE_FLEET
from queues.fleet.services import FleetError, pool_get, pool_restart, pool_scale, worker_restart
from queues.models import ApiToken

logger = logging.getLogger(__name__)


def _error(message: str, status: int, **headers) -> JsonResponse:
    response = JsonResponse({"error": message}, status=status)
    for name, value in headers.items():
        response[name] = value
    return response


def fleet_api(view):
    """POST only, a valid token whose user may manage the fleet, a JSON object body; outages answer 503."""

    @csrf_exempt  # no session: a bearer token is not sent by browsers on their own, so there is nothing to forge
    def wrapped(request):
        if request.method != "POST":
            return _error(f"{request.method} is not allowed on {request.path}; use POST", 405, Allow="POST")
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return _error("authentication required: 'Authorization: Bearer <API token>' "
                          "(manage.py api_token create)", 401, **{"WWW-Authenticate": 'Bearer realm="fleet"'})
        token = ApiToken.objects.authenticate(header[7:].strip())
        if token is None:
            return _error("the API token is not valid (unknown, revoked or expired)", 401)
        if not token.user.is_active or not token.user.is_staff or not token.user.has_perm(MANAGE_FLEET):
            # is_staff too: a user who may no longer sign in to the admin may not act through a token either.
            return _error(f"the token's user {token.user.username!r} is not an active staff member with the "
                          f"{MANAGE_FLEET} permission", 403)
        try:
            body = json.loads(request.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            return _error("the body must be a JSON object", 400)
        if not isinstance(body, dict):
            return _error("the body must be a JSON object", 400)
        try:
            with audit_via(f"API token {token.name}"):
                return view(request, body, token)
        except FleetError as error:
            return _error(str(error), 404)
        except ValidationError as error:
            fields = getattr(error, "message_dict", {"count": error.messages})
            return _error("; ".join(f"{'count' if name == 'desired' else name}: {' '.join(messages)}"
                                    for name, messages in fields.items()), 400)
        except (BrokerUnavailable, *broker.UNAVAILABLE_ERRORS):
            # The driver's text (hosts, ports, paths) goes to the log, not to the token's holder.
            logger.warning("fleet API: Redis is unreachable", exc_info=True)
            return _error("Redis is unreachable; try again shortly", 503, **{"Retry-After": "10"})
        except DatabaseError:
            logger.warning("fleet API: the database failed", exc_info=True)
            return _error("the database is unreachable; try again shortly", 503, **{"Retry-After": "10"})

    return wrapped


def _pool(body: dict):
    name = body.get("pool", "default")
    if not isinstance(name, str) or not name:
        raise ValidationError({"pool": ["must be a pool's name"]})
    return pool_get(name)


@fleet_api
def workers_scale(request, body, token):
    """{"pool": "default", "count": 6} -> the pool's new desired count."""
    count = body.get("count")
    if isinstance(count, bool) or not isinstance(count, int):
        raise ValidationError({"count": ["must be a whole number of workers"]})
    pool = _pool(body)
    previous = pool.desired
    pool = pool_scale(pool=pool, desired=count, user=token.user, reason=f"API token {token.name}",
                      address=client_address(request))
    return JsonResponse({"pool": pool.name, "desired": pool.desired, "previous": previous,
                         "minimum": pool.minimum, "maximum": pool.maximum})


@fleet_api
def workers_restart(request, body, token):
    """{"pool": "default"} restarts the pool's workers gracefully; {"worker": NAME} one worker."""
    worker = body.get("worker")
    if worker is not None:
        if not isinstance(worker, str) or not worker:
            raise ValidationError({"worker": ["must be a worker's name"]})
        worker_restart(worker_name=worker, user=token.user, address=client_address(request))
        return JsonResponse({"restarted": [worker]}, status=202)
    pool = _pool(body)
    count = pool_restart(pool=pool, user=token.user, address=client_address(request))
    return JsonResponse({"pool": pool.name, "restarting": count}, status=202)
