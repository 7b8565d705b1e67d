"""The calls older scripts and the old system's runbooks make, as operations of this API: the first fleet calls
(``POST /api/rq/workers/scale`` and ``/restart``), seed 000's ``POST /admin/rq/scale-workers`` and
``/restart-workers`` (a queue stands for the pools that drain it) and seed 001's
``POST /admin/maintenance/pause-task-submission`` and ``/resume-task-submission``. Their paths and bodies are the
documents'; the token, roles, rate, audit, errors and description are the API's. Each router is mounted at its own
path (api/site.py)."""


from typing import Literal

from ninja import Field, Router, Schema, Status
from pydantic import StrictInt

from api.access import needs
from api.errors import ApiError, documented
from api.fleet import pool_scaled
from api.submission import PauseIn, ResumeIn, submission_paused
from migration import dispatch
from migration.admin import PAUSE_SUBMISSION
from portal.admin_pages import client_address
from queues.broker import QUEUE_NAMES
from queues.fleet.admin import MANAGE_FLEET
from queues.fleet.services import pool_get, pool_restart, pools_draining, worker_restart
from queues.models import WorkerPool

fleet = Router(tags=["fleet (older calls)"])
old_fleet = Router(tags=["old system: fleet"])
maintenance = Router(tags=["old system: maintenance"])

POOL = Field(None, min_length=1, max_length=50, description="A pool's name.")
QUEUE = Literal[QUEUE_NAMES]


class WorkersScaleIn(Schema):
    pool: str = Field("default", min_length=1, max_length=50, description="The pool's name.")
    count: StrictInt = Field(..., ge=0, le=10000, description="Workers the pool should run, within its bounds.")


class QueueScaleIn(Schema):
    queue: QUEUE | None = Field(None, description="The pool that drains this queue is scaled (refused when "
                                                  "several do: name the pool).")
    pool: str | None = POOL
    count: StrictInt = Field(..., ge=0, le=10000, description="Workers the pool should run, within its bounds.")


class WorkersScaledOut(Schema):
    pool: str
    desired: int
    previous: int
    minimum: int
    maximum: int


class WorkersRestartIn(Schema):
    pool: str | None = Field(None, min_length=1, max_length=50, description="The pool whose workers restart "
                                                                             "(default: default).")
    worker: str | None = Field(None, min_length=1, max_length=200, description="One worker, by its name.")


class WorkersRestartOut(Schema):
    pool: str | None = Field(None, description="The pool asked (absent when one worker was).")
    restarting: int | None = Field(None, description="Live workers asked to finish their task and exit.")
    restarted: list[str] | None = Field(None, description="The worker asked (absent when a pool was).")


class QueueRestartIn(WorkersRestartIn):
    queue: QUEUE | None = Field(None, description="The pools that drain this queue restart.")


class PoolsRestartOut(Schema):
    pools: dict[str, int] = Field(description="Each pool restarted, with its live workers asked to finish and exit.")
    restarting: int


class PausedOut(Schema):
    submission_paused: bool
    reason: str
    until: str | None = Field(description="When the pause ends by itself (ISO 8601); null: until resumed.")


class ResumedOut(Schema):
    submission_paused: bool
    released: int = Field(description="Tasks held while paused, sent on to the mode's systems.")


def _scale(request, *, pool: str, count: int) -> dict:
    row = pool_scaled(request, pool, count)
    return {"pool": row.name, "desired": row.desired, "previous": row.previous, "minimum": row.minimum,
            "maximum": row.maximum}


def _restart(request, payload: WorkersRestartIn) -> Status:
    if payload.worker is not None:
        worker_restart(worker_name=payload.worker, user=request.auth.user, address=client_address(request))
        return Status(202, {"restarted": [payload.worker]})
    pool = pool_get(payload.pool or "default")
    return Status(202, {"pool": pool.name, "restarting": pool_restart(pool=pool, user=request.auth.user,
                                                                       address=client_address(request))})


def _one_pool_draining(queue: str) -> str:
    pools = pools_draining(queue)
    if len(pools) > 1:
        raise ApiError(400, f"queue: is drained by the pools {', '.join(pool.name for pool in pools)}; name the one "
                            "to scale with \"pool\"", field="queue")
    return pools[0].name


@fleet.post("/scale", response={200: WorkersScaledOut, **documented(404)}, operation_id="workers_scale",
            summary="Scale a pool (the first fleet call)")
@needs(MANAGE_FLEET)
def workers_scale(request, payload: WorkersScaleIn):
    """``{"pool": "default", "count": 6}``: the pool's new desired count; supervisors follow within about a
    second. ``/api/v1/pools/{pool}/scale`` does the same."""
    return _scale(request, pool=payload.pool, count=payload.count)


@fleet.post("/restart", response={202: WorkersRestartOut, **documented(404)}, operation_id="workers_restart",
            summary="Restart a pool's workers, or one worker (the first fleet call)", exclude_none=True)
@needs(MANAGE_FLEET)
def workers_restart(request, payload: WorkersRestartIn | None = None):
    """``{"pool": NAME}`` (default: default) restarts the pool's workers gracefully; ``{"worker": NAME}`` one
    worker."""
    return _restart(request, payload or WorkersRestartIn())


@old_fleet.post("/scale-workers", response={200: WorkersScaledOut, **documented(404)}, operation_id="scale_workers",
                summary="Scale the workers of a queue (seed 000)")
@needs(MANAGE_FLEET)
def scale_workers(request, payload: QueueScaleIn):
    """``{"queue": "normal", "count": 4}``: the pool that drains the queue gets that desired count; ``pool`` names
    the pool instead (needed when several pools drain the queue). Neither: the default pool."""
    pool = payload.pool or (_one_pool_draining(payload.queue) if payload.queue else "default")
    return _scale(request, pool=pool, count=payload.count)


@old_fleet.post("/restart-workers", response={202: WorkersRestartOut | PoolsRestartOut, **documented(404)},
                operation_id="restart_workers", summary="Restart workers gracefully (seed 000)", exclude_none=True)
@needs(MANAGE_FLEET)
def restart_workers(request, payload: QueueRestartIn | None = None):
    """No body: every pool's workers (the old call restarted all workers); ``{"queue": NAME}`` the pools that drain
    it; ``{"pool": NAME}`` or ``{"worker": NAME}`` as ``/api/rq/workers/restart``."""
    payload = payload or QueueRestartIn()
    if payload.pool is not None or payload.worker is not None:
        return _restart(request, payload)
    pools = pools_draining(payload.queue) if payload.queue else list(WorkerPool.objects.order_by("name"))
    restarting = {pool.name: pool_restart(pool=pool, user=request.auth.user, address=client_address(request))
                  for pool in pools}
    return Status(202, {"pools": restarting, "restarting": sum(restarting.values())})


@maintenance.post("/pause-task-submission", response={200: PausedOut, **documented(409)},
                  operation_id="pause_task_submission", summary="Pause task submission (seed 001)")
@needs(PAUSE_SUBMISSION)
def pause_task_submission(request, payload: PauseIn):
    """New tasks are accepted and held until resumed, or until ``duration`` has passed. Refused (409) while a
    migration run holds the pause. ``/api/v1/submission/pause`` does the same."""
    row = submission_paused(request, payload.reason, payload.duration)
    return {"submission_paused": True, "reason": row.paused_reason,
            "until": row.paused_until.isoformat() if row.paused_until else None}


@maintenance.post("/resume-task-submission", response={200: ResumedOut, **documented(409)},
                  operation_id="resume_task_submission", summary="Resume task submission (seed 001)")
@needs(PAUSE_SUBMISSION)
def resume_task_submission(request, payload: ResumeIn | None = None):
    """Submission opens again; the tasks held meanwhile go to the mode's systems."""
    reason = (payload.reason if payload else "") or "resumed by API"
    released = dispatch.submission_resume(user=request.auth.user, reason=reason, address=client_address(request))
    return {"submission_paused": False, "released": released}
