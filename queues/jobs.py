"""The callables workers may run (settings.RQ_ALLOWED_CALLABLES). Each only translates the job into a service call."""

from rq import get_current_job

from queues.execution import task_execute


def caption_task(task_id: int) -> dict:
    job = get_current_job()
    worker_name = (job.worker_name if job else None) or "inline"
    return task_execute(task_id=int(task_id), worker_name=worker_name).as_result()
