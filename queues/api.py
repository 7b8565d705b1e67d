"""The fleet API for scripts (the runbook's scale and restart calls): POST /api/rq/workers/scale and
POST /api/rq/workers/restart.

Callers authenticate with ``Authorization: Bearer <token>``, an ``ApiToken`` an Admin created (``manage.py api_token
create NAME --user U``; the token is shown once, only its SHA-256 is stored). It is not the metrics token: a token
acts as its user and needs that user's ``queues.manage_fleet`` permission, as the admin's buttons do, and every call
is an audit entry of that user ``via`` the token's name. Errors are JSON ``{"error": ...}`` with 400 (naming the
field), 401, 403, 404 (unknown pool or worker), 405, 429 (the token's rate, shared with /api/v1/) or 503 (Redis or
the database away).
"""

import json
import logging
import math

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import DatabaseError
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from queues import broker
from queues.audit import audit_via
from queues.errors import BrokerUnavailable
from portal.admin_pages import client_address
from portal.rate_limits import limiter
from queues.fleet.admin import MANAGE_FLEET
from queues.fleet.services import FleetError, pool_get, pool_restart, pool_scale, worker_restart
from queues.models import ApiToken

logger = logging.getLogger(__name__)


def _error(message: str, status: int, **headers) -> JsonResponse:
    response = JsonResponse({"error": message}, status=status)
    for name, value in headers.items():
        response[name] = value
    return response


def token_api(permission: str, *, realm: str = "fleet"):
    """POST only, a valid token whose user is active staff with ``permission``, a JSON object body; outages answer
    503. The view gets ``(request, body, token)``; its audit rows say ``via`` the token's name."""

    def decorate(view):
        @csrf_exempt  # no session: a bearer token is not sent by browsers on their own, so there is nothing to forge
        def wrapped(request):
            if request.method != "POST":
                return _error(f"{request.method} is not allowed on {request.path}; use POST", 405, Allow="POST")
            header = request.headers.get("Authorization", "")
            if not header.startswith("Bearer "):
                return _error("authentication required: 'Authorization: Bearer <API token>' "
                              "(manage.py api_token create)", 401, **{"WWW-Authenticate": f'Bearer realm="{realm}"'})
            token = ApiToken.objects.authenticate(header[7:].strip())
            if token is None:
                return _error("the API token is not valid (unknown, revoked or expired)", 401)
            wait = limiter.wait(str(token.pk), token.rate_limit or settings.API_RATE_LIMIT)
            if wait:  # the token's one bucket, shared with /api/v1/
                return _error(f"too many requests for this token; try again in {math.ceil(wait)} s", 429,
                              **{"Retry-After": str(max(1, math.ceil(wait)))})
            if not token.user.is_active or not token.user.is_staff or not token.user.has_perm(permission):
                # is_staff too: a user who may no longer sign in to the admin may not act through a token either.
                return _error(f"the token's user {token.user.username!r} is not an active staff member with the "
                              f"{permission} permission", 403)
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
                logger.warning("%s: Redis is unreachable", request.path, exc_info=True)
                return _error("Redis is unreachable; try again shortly", 503, **{"Retry-After": "10"})
            except DatabaseError:
                logger.warning("%s: the database failed", request.path, exc_info=True)
                return _error("the database is unreachable; try again shortly", 503, **{"Retry-After": "10"})

        return wrapped

    return decorate


fleet_api = token_api(MANAGE_FLEET)


def _pool(body: dict):
    name = body.get("pool", "default")
    if not isinstance(name, str) or not name:
        raise ValidationError({"pool": ["must be a pool's name"]})
    return pool_get(name)


def _scale(request, body, token):
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


def _restart(request, body, token):
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


workers_scale = fleet_api(_scale)
workers_restart = fleet_api(_restart)


# --- the old system's paths (seed 000's runbook): POST /admin/rq/scale-workers and /admin/rq/restart-workers -----

def _pools_serving(queue) -> list:
    """The pools whose workers drain ``queue``: the old system scaled workers per queue, the portal scales pools."""
    from queues.models import WorkerPool

    if not isinstance(queue, str) or queue not in broker.QUEUE_NAMES:
        raise ValidationError({"queue": [f"must be one of {', '.join(broker.QUEUE_NAMES)}"]})
    pools = [pool for pool in WorkerPool.objects.order_by("name") if queue in pool.queue_names]
    if not pools:
        raise FleetError(f"no worker pool drains the {queue} queue")
    return pools


@fleet_api
def workers_scale_for_queue(request, body, token):
    """{"queue": "normal", "count": 4}: the pool that drains the queue gets that desired count ({"pool": NAME}
    instead names it). A queue drained by several pools is refused: name the pool."""
    if "pool" in body or "queue" not in body:
        return _scale(request, body, token)
    pools = _pools_serving(body["queue"])
    if len(pools) > 1:
        raise ValidationError({"queue": [f"is drained by the pools {', '.join(pool.name for pool in pools)}; "
                                         "name the one to scale with \"pool\""]})
    return _scale(request, {**body, "pool": pools[0].name}, token)


@fleet_api
def workers_restart_for_queue(request, body, token):
    """No body: every pool's workers restart gracefully (the old call restarted all workers); {"queue": NAME} the
    pools that drain it; {"pool"} or {"worker"} as /api/rq/workers/restart."""
    from queues.models import WorkerPool

    if "pool" in body or "worker" in body:
        return _restart(request, body, token)
    pools = _pools_serving(body["queue"]) if "queue" in body else list(WorkerPool.objects.order_by("name"))
    restarting = {pool.name: pool_restart(pool=pool, user=token.user, address=client_address(request))
                  for pool in pools}
    return JsonResponse({"pools": restarting, "restarting": sum(restarting.values())}, status=202)

