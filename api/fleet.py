"""The worker fleet over HTTP: the pools, scaling one, restarting a pool's workers or one worker. The fleet
services the admin's buttons use, with the same permission (the older calls of api/runbook.py scale through
``pool_scaled`` too)."""

from django.core.exceptions import ValidationError as DjangoValidationError
from ninja import Field, Path, Router, Schema, Status

from api.access import needs
from api.errors import ApiError, documented
from portal.admin_pages import client_address
from queues.fleet.admin import MANAGE_FLEET
from queues.fleet.services import pool_get, pool_restart, pool_scale, worker_restart
from queues.models import WorkerPool

router = Router(tags=["fleet"])

POOL = Path(..., min_length=1, max_length=50, description="The pool's name.")
WORKER = Path(..., min_length=1, max_length=200, description="The worker's name, as the fleet page shows it.")


class PoolOut(Schema):
    name: str
    queues: list[str] = Field(description="The queues its workers drain, in order.")
    desired: int
    minimum: int
    maximum: int
    slots: int = Field(description="Caption slots per worker process.")
    autoscale: bool

    @staticmethod
    def resolve_queues(pool) -> list[str]:
        return pool.queue_names


class ScaleIn(Schema):
    count: int = Field(..., ge=0, le=10000, description="Workers the pool should run, within its bounds.")


class ScaledOut(PoolOut):
    previous: int


class RestartOut(Schema):
    restarting: int = Field(description="Live workers asked to finish their task and exit; their supervisors "
                                        "start fresh ones.")


@router.get("/pools", response={200: list[PoolOut], **documented()}, operation_id="pools_list",
            summary="Worker pools")
@needs("queues.view_workerpool")
def pools(request):
    return list(WorkerPool.objects.order_by("name"))


@router.post("/pools/{pool}/scale", response={200: ScaledOut, **documented(404)}, operation_id="pool_scale",
             summary="Scale a pool")
@needs(MANAGE_FLEET)
def scale(request, payload: ScaleIn, pool: str = POOL):
    """Sets how many workers the pool runs; supervisors follow within about a second. A count outside the pool's
    minimum and maximum is refused (400, ``count``)."""
    return pool_scaled(request, pool, payload.count)


def pool_scaled(request, name: str, count: int) -> WorkerPool:
    """The pool ``name`` scaled to ``count`` as the token's user, with ``previous`` (its count before) set; a count
    outside its bounds is a 400 on ``count``, an unknown pool a 404."""
    row = pool_get(name)
    previous = row.desired
    try:
        row = pool_scale(pool=row, desired=count, user=request.auth.user, reason=f"API token {request.auth.name}",
                         address=client_address(request))
    except DjangoValidationError as error:
        raise ApiError(400, f"count: {' '.join(error.messages)}", field="count") from None
    row.previous = previous
    return row


@router.post("/pools/{pool}/restart", response={202: RestartOut, **documented(404)}, operation_id="pool_restart",
             summary="Restart a pool's workers gracefully")
@needs(MANAGE_FLEET)
def restart_pool(request, pool: str = POOL):
    return Status(202, {"restarting": pool_restart(pool=pool_get(pool), user=request.auth.user,
                                                   address=client_address(request))})


@router.post("/workers/{worker}/restart", response={202: RestartOut, **documented(404)},
             operation_id="worker_restart", summary="Restart one worker gracefully")
@needs(MANAGE_FLEET)
def restart_worker(request, worker: str = WORKER):
    worker_restart(worker_name=worker, user=request.auth.user, address=client_address(request))
    return Status(202, {"restarting": 1})
