"""Correlation ids from the HTTP request into the task, its job, the worker's log lines (JSON logs), the attempt
rows and audit entries; the admin shows and finds them."""

import json
import subprocess
import sys
import time

import pytest
from django.conf import settings
from django.urls import reverse

from queues import broker
from queues.models import AuditEntry, CaptionTask, TaskEvent, TaskStatus
from tests.conftest import subprocess_env

CALLER_ID = "req-7f3a9c.edge-1"


@pytest.mark.django_db
@pytest.mark.parametrize("sent, kept", [(CALLER_ID, True), ("has spaces in it", False), ("x" * 65, False),
                                        ("<script>", False), (None, False)])
def test_every_request_gets_a_correlation_id_and_sees_it_echoed(client, sent, kept):
    headers = {"HTTP_X_CORRELATION_ID": sent} if sent is not None else {}
    response = client.get("/healthz", **headers)
    echoed = response["X-Correlation-ID"]
    if kept:
        assert echoed == sent
    else:
        assert echoed != sent and len(echoed) == 32 and int(echoed, 16) >= 0  # a fresh uuid4 hex


@pytest.mark.django_db(transaction=True)
def test_the_id_travels_from_the_submitting_request_to_the_job_the_attempt_and_the_worker_log(
        client, redis, admin_user, media_image):
    client.force_login(admin_user)
    image = media_image()
    response = client.post(reverse("admin:queues_captiontask_add"), {"image_ref": image, "priority": "high"},
                           HTTP_X_CORRELATION_ID=CALLER_ID)
    assert response.status_code == 302 and response["X-Correlation-ID"] == CALLER_ID
    task = CaptionTask.objects.get()
    assert task.correlation_id == CALLER_ID
    job = broker.fetch_job(task.pk)
    assert job.meta["correlation_id"] == CALLER_ID

    # A real worker process with JSON logs: its lines about this task carry the id, the task, worker and queue.
    result = subprocess.run([sys.executable, "manage.py", "rqworker", "--burst", "urgent", "high", "normal", "low",
                             "--name", "json-logger"], cwd=settings.BASE_DIR, capture_output=True, text=True,
                            timeout=120, env=subprocess_env(LOG_FORMAT="json"))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert lines and all({"timestamp", "level", "logger", "message"} <= set(line) for line in lines)
    about_task = [line for line in lines if line.get("task_id") in (task.pk, str(task.pk))]
    assert about_task, result.stderr
    assert {line["correlation_id"] for line in about_task} == {CALLER_ID}
    assert {line["worker"] for line in about_task} == {"json-logger"} and {line["queue"] for line in about_task} == {
        "high"}
    naming_the_job = [line for line in lines if f"caption-{task.pk}" in line["message"]]
    assert any("high: caption-" in line["message"] for line in naming_the_job)  # the dequeue line, too
    assert all(line["task_id"] in (task.pk, str(task.pk)) and line["correlation_id"] == CALLER_ID
               for line in naming_the_job), naming_the_job
    assert CaptionTask.objects.get(pk=task.pk).status == TaskStatus.COMPLETED
    attempt = TaskEvent.objects.get(task=task, kind=TaskEvent.Kind.COMPLETED)
    assert attempt.correlation_id == CALLER_ID


def test_plain_logs_stay_the_default_and_name_the_id_when_there_is_one():
    result = subprocess.run([sys.executable, "-c", (
        "import django, logging; django.setup(); from queues import correlation\n"
        "log = logging.getLogger('probe')\n"
        "log.warning('outside')\n"
        "with correlation.bound('abc-123', task_id=5): log.warning('inside')\n")],
        cwd=settings.BASE_DIR, capture_output=True, text=True, timeout=60,
        env={**subprocess_env(), "DJANGO_SETTINGS_MODULE": "portal.settings", "LOG_FORMAT": ""})
    lines = result.stderr.strip().splitlines()
    assert lines[-2].endswith("WARNING probe outside") and lines[-1].endswith("WARNING probe inside [abc-123]")


@pytest.mark.django_db
def test_audit_entries_carry_the_id_and_the_admin_finds_tasks_and_entries_by_it(client, redis, admin_user,
                                                                                media_image):
    from queues.models import WorkerPool

    pool, _ = WorkerPool.objects.update_or_create(name="default", defaults={
        "queues": "urgent high normal low", "desired": 1, "minimum": 1, "maximum": 4})
    client.force_login(admin_user)
    response = client.post(reverse("admin:queues_workerpool_scale", args=[pool.pk]), {"desired": "3"},
                           HTTP_X_CORRELATION_ID=CALLER_ID)
    assert response.status_code == 302, response.content[:500]
    assert AuditEntry.objects.get(action="pool_scale").correlation_id == CALLER_ID

    CaptionTask.objects.create(image_ref="other.png", correlation_id="someone-else")
    mine = CaptionTask.objects.create(image_ref="mine.png", correlation_id=CALLER_ID)
    page = client.get(reverse("admin:queues_captiontask_changelist"), {"q": CALLER_ID})
    assert [row.pk for row in page.context["cl"].result_list] == [mine.pk]
    detail = client.get(reverse("admin:queues_captiontask_change", args=[mine.pk])).content.decode()
    assert CALLER_ID in detail
    entries = client.get(reverse("admin:queues_auditentry_changelist"), {"q": CALLER_ID})
    assert [entry.action for entry in entries.context["cl"].result_list] == ["pool_scale"]
    # A caller's id that is all digits finds its task, as a task id does.
    digits = CaptionTask.objects.create(image_ref="digits.png", correlation_id="20261202051500123456")
    page = client.get(reverse("admin:queues_captiontask_changelist"), {"q": digits.correlation_id})
    assert [row.pk for row in page.context["cl"].result_list] == [digits.pk]
    page = client.get(reverse("admin:queues_captiontask_changelist"), {"q": str(mine.pk)})
    assert [row.pk for row in page.context["cl"].result_list] == [mine.pk]


@pytest.mark.django_db(transaction=True)
def test_jobs_published_again_and_reconciler_rows_keep_the_submitters_id(redis, media_image):
    """The relay (after Redis was down), the reconciler's lost-job check and its re-drive of a dead worker's task
    act in a supervisor, which has no request: the job and the rows they write carry the task's own id."""
    from datetime import timedelta

    from django.utils import timezone

    from queues import correlation
    from queues.execution import task_claim
    from queues.fleet.reconcile import CONFIRM_AFTER, tasks_reconcile
    from queues.services import TaskSpec, task_submit, tasks_relay_once, tasks_submit_many
    from tests.queues.test_reconcile import age_jobs

    reference = media_image()
    with correlation.bound("req-relay"):
        relayed = tasks_submit_many(specs=[TaskSpec(reference) for _ in range(3)]).created
    with correlation.bound("req-lost"):
        lost = task_submit(image_ref=reference)
    with correlation.bound("req-dead-worker"):
        running = task_submit(image_ref=reference)
    assert correlation.current() == ""  # from here on, like a supervisor

    # Redis lost the first three jobs before anyone ran them; the tasks are due again (e.g. after a retry).
    redis.delete(*[f"rq:job:caption-{pk}" for pk in relayed])
    for pk in relayed:
        redis.lrem("rq:queue:normal", 0, f"caption-{pk}")
    CaptionTask.objects.filter(pk__in=relayed).update(published_at=None, publish_after=timezone.now())
    assert tasks_relay_once() == 3
    assert {broker.fetch_job(pk).meta.get("correlation_id") for pk in relayed} == {"req-relay"}

    # A job popped by a worker that died before claiming it: found missing and published again.
    age_jobs(redis, [lost.pk], minutes_ago_first=40)
    CaptionTask.objects.filter(pk=lost.pk).update(published_at=timezone.now() - timedelta(minutes=5))
    redis.lrem("rq:queue:normal", 0, f"caption-{lost.pk}")
    redis.delete(f"rq:job:caption-{lost.pk}")
    tasks_reconcile()
    time.sleep(CONFIRM_AFTER)
    assert lost.pk in tasks_reconcile().republished
    assert broker.fetch_job(lost.pk).meta["correlation_id"] == "req-lost"
    assert TaskEvent.objects.get(task=lost, kind=TaskEvent.Kind.REPUBLISHED).correlation_id == "req-lost"

    # A worker that took a task and died: the reconciler's WORKER_LOST row.
    task_claim(task_id=running.pk, worker_name="worker-gone")
    long_ago = timezone.now() - timedelta(minutes=5)
    CaptionTask.objects.filter(pk=running.pk).update(started_at=long_ago, heartbeat_at=long_ago)
    assert running.pk in tasks_reconcile().redriven
    assert TaskEvent.objects.get(task=running, kind=TaskEvent.Kind.WORKER_LOST).correlation_id == "req-dead-worker"


@pytest.mark.django_db
def test_an_error_answer_is_logged_once_under_the_requests_id(client):
    import logging

    from queues import correlation

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    handler = Keep()
    handler.addFilter(correlation.LogContextFilter())  # as the console handler has it
    logger = logging.getLogger("django.request")
    logger.addHandler(handler)
    try:
        response = client.get("/no-such-page/", HTTP_X_CORRELATION_ID="lost-page-1")
    finally:
        logger.removeHandler(handler)
    assert response.status_code == 404
    assert [(record.getMessage(), record.correlation_id) for record in seen] == [
        ("Not Found: /no-such-page/", "lost-page-1")]
