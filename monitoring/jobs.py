"""The monitoring app's callables for the RQ workers (listed in settings.RQ_ALLOWED_CALLABLES)."""

from rq import get_current_job


def notification_deliver(notification_id: int, attempt: int) -> dict:
    from monitoring.alerts.notify import notification_deliver as deliver

    job = get_current_job()
    status = deliver(notification_id=int(notification_id), attempt=int(attempt),
                     worker=(job.worker_name if job else None) or "inline")
    return {"status": status}
