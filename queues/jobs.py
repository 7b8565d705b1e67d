"""The callables workers may run (settings.RQ_ALLOWED_CALLABLES). Each only translates the job into a service call."""

from rq import get_current_job

from queues.broker import QUEUE_NAMES
from queues.execution import task_execute


def caption_task(task_id: int) -> dict:
    job = get_current_job()
    worker_name = (job.worker_name if job else None) or "inline"
    # The queue the worker popped this entry from (queues.fleet.worker sets it); the job's origin is only its latest
    # publication, which a priority change overwrites.
    queue = getattr(job, "popped_from", None) or (job.origin if job else None)
    queue = queue if queue in QUEUE_NAMES else None
    claimed = getattr(job, "claimed_task", None)  # queues.fleet.worker claims before rq's bookkeeping
    return task_execute(task_id=int(task_id), worker_name=worker_name, queue=queue, claimed=claimed).as_result()


def bulk_operation(operation_id: int) -> dict:
    from queues.operations.services import bulk_operation_run

    job = get_current_job()
    operation = bulk_operation_run(operation_id=int(operation_id),
                                   worker_name=(job.worker_name if job else None) or "inline")
    return {"state": operation.state, "changed": operation.changed, "refused": operation.refused}
