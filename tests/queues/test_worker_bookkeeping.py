"""What the worker keeps in Redis around a caption job: while it runs, what django-rq's views and rq's cleanup read
(the started-job registry, the worker's state and current job); once it has succeeded, nothing but the worker's
counts (the task row holds the outcome); when it fails, rq's failed-job registry with the error."""

import threading
import time

import pytest
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from queues import broker
from queues.models import CaptionTask, TaskStatus
from queues.services import task_submit
from tests.conftest import run_worker
from tests.processes import slow_ollama

pytestmark = pytest.mark.django_db(transaction=True)


def watch_while_running(redis, queue: str) -> dict:
    """From another thread: the started registry and the worker's hash, as seen once a job has started."""
    seen = {}

    def watch():
        registry = StartedJobRegistry(queue, connection=redis)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            job_ids = registry.get_job_ids(cleanup=False)
            if job_ids:
                worker_key = next(key for key in redis.smembers("rq:workers"))
                # Entries are "<job id>:<execution id>": the execution's own key is rq:execution:<entry>.
                entries = [entry.decode() for entry in redis.zrange(registry.key, 0, -1)]
                seen.update(job_ids=job_ids, worker=redis.hgetall(worker_key), executions=entries)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch)
    thread.start()
    seen["thread"] = thread
    return seen


def test_a_running_caption_job_is_visible_and_a_finished_one_leaves_only_counts(redis, settings, http_server,
                                                                                  png_bytes):
    settings.CAPTION_BACKEND, settings.OLLAMA_URL = "ollama", http_server.url
    task = task_submit(image_ref=slow_ollama(http_server, png_bytes, delay=1.0))
    seen = watch_while_running(redis, task.priority)
    worker = run_worker()
    seen["thread"].join()
    job_id = f"caption-{task.pk}"
    assert seen["job_ids"] == [job_id]
    assert seen["worker"][b"state"] == b"busy" and seen["worker"][b"current_job"] == job_id.encode()
    assert CaptionTask.objects.get(pk=task.pk).status == TaskStatus.COMPLETED
    # Done: no job hash, no result stream, no execution, no registry entry anywhere.
    assert not redis.exists(f"rq:job:{job_id}", f"rq:results:{job_id}", f"rq:executions:{job_id}")
    assert seen["executions"] and not redis.exists(*[f"rq:execution:{entry}" for entry in seen["executions"]])
    for registry in (StartedJobRegistry, FinishedJobRegistry, FailedJobRegistry):
        assert registry(task.priority, connection=redis).get_job_count(cleanup=False) == 0
    counts = redis.hmget(worker.key, "successful_job_count", "failed_job_count", "total_working_time")
    assert int(counts[0]) == 1 and counts[1] in (None, b"0") and float(counts[2]) >= 0.9


def test_a_failed_caption_job_goes_to_rqs_failed_registry(redis, settings, http_server):
    settings.CAPTION_BACKEND, settings.OLLAMA_URL = "ollama", http_server.url
    http_server.route("/gone.png", lambda request, body: (request.send_response(404),
                                                          request.send_header("Content-Length", "0"),
                                                          request.end_headers()))
    task = task_submit(image_ref=http_server.url + "/gone.png")
    worker = run_worker()
    assert CaptionTask.objects.get(pk=task.pk).status == TaskStatus.FAILED
    failed = FailedJobRegistry(task.priority, connection=redis)
    assert failed.get_job_ids(cleanup=False) == [f"caption-{task.pk}"]
    job = broker.fetch_job(task.pk)
    assert job.get_status() == "failed" and "TaskFailed" in job.latest_result().exc_string
    assert StartedJobRegistry(task.priority, connection=redis).get_job_count(cleanup=False) == 0
    assert int(redis.hget(worker.key, "failed_job_count")) == 1
    assert redis.hget(worker.key, "current_job") is None


def test_rqs_own_requeue_of_a_caption_dead_letter_leaves_it_a_dead_letter(redis, settings, http_server):
    """``rq requeue`` moves a failed job back to its queue. Its task is FAILED, so the claim refuses it: the job used
    to vanish (rq info, rq_dead_letter_size and the dead-letter alert said 0 while the task was still dead). It goes
    back to the failed-job registry (and the worker's log names the portal's requeue)."""
    import subprocess
    import sys
    from pathlib import Path

    settings.CAPTION_BACKEND, settings.OLLAMA_URL = "ollama", http_server.url
    http_server.route("/gone.png", lambda request, body: (request.send_response(404),
                                                          request.send_header("Content-Length", "0"),
                                                          request.end_headers()))
    task = task_submit(image_ref=http_server.url + "/gone.png")
    run_worker()
    failed = FailedJobRegistry(task.priority, connection=redis)
    assert failed.get_job_ids(cleanup=False) == [f"caption-{task.pk}"]
    requeue = subprocess.run([str(Path(sys.executable).parent / "rq"), "requeue", "--all", "--queue", task.priority,
                              "-u", settings.REDIS_URL, "-S", "json"], capture_output=True, text=True, timeout=60)
    assert requeue.returncode == 0, requeue.stderr
    assert failed.get_job_ids(cleanup=False) == [] and redis.llen(f"rq:queue:{task.priority}") == 1
    run_worker()
    assert CaptionTask.objects.get(pk=task.pk).status == TaskStatus.FAILED
    assert failed.get_job_ids(cleanup=False) == [f"caption-{task.pk}"]
    assert broker.fetch_job(task.pk).get_status() == "failed"


def test_a_claim_on_a_connection_the_driver_closed_puts_the_job_back_and_runs_it(redis, media_image):
    """The database connection died under the worker (MySQL's wait_timeout, a proxy, a closed driver connection):
    the job goes back to its queue and runs on a fresh connection, never escapes to rq's loop (which quits and drops
    the popped job). Here the driver reports an OperationalError; the worker also takes Django's InterfaceError, which
    is not a DatabaseError, the same way."""
    from django.db import connection

    from queues import control

    task = task_submit(image_ref=media_image())
    control.processing_suspended_cached()  # read now: the worker's first database statement is its claim
    connection.connection.close()  # the driver's connection, under Django's feet
    run_worker()
    task.refresh_from_db()
    assert (task.status, task.attempts) == (TaskStatus.COMPLETED, 1)
