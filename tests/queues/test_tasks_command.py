import getpass
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from queues import broker
from queues.models import AuditEntry, CaptionTask, TaskEvent, TaskStatus
from queues.services import TaskSpec, tasks_submit_many
from tests.conftest import run_worker

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def mixed(redis, media_image):
    ids = tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(10)]).created
    CaptionTask.objects.filter(pk__in=ids[:4]).update(status=TaskStatus.FAILED, last_error_class="HTTPNotFound")
    CaptionTask.objects.filter(pk__in=ids[4:6]).update(status=TaskStatus.FAILED, last_error_class="WorkerLost")
    return ids


def command_via(action: str) -> str:
    """What an audit entry of ``manage.py tasks ACTION`` says of how it came: the command and the OS account."""
    return f"manage.py tasks {action} (account {getpass.getuser()})"


def test_stats(mixed, capsys):
    call_command("tasks", "stats")
    out = capsys.readouterr().out
    assert "queued 4" in out and "failed 6" in out and "Queue normal: waiting 10" in out


def test_requeue_failed_by_error_class_with_progress(mixed, capsys):
    call_command("tasks", "requeue", "--failed", "--error-class", "HTTPNotFound", "--yes")
    captured = capsys.readouterr()
    assert "Requeued 4 task(s)." in captured.out and "Requeue: 100%" in captured.err
    assert CaptionTask.objects.filter(status=TaskStatus.FAILED).count() == 2
    entry = AuditEntry.objects.get(action="tasks_requeue")
    assert (entry.user, entry.count, entry.detail["via"]) == (None, 4, command_via("requeue"))


def test_requeue_ids_reports_refusals_and_dry_run_changes_nothing(mixed, capsys):
    call_command("tasks", "requeue", "--ids", f"{mixed[0]},{mixed[8]}", "--dry-run")
    assert "Would requeue up to 2 task(s)" in capsys.readouterr().out
    assert CaptionTask.objects.filter(status=TaskStatus.FAILED).count() == 6
    call_command("tasks", "requeue", "--ids", f"{mixed[0]},{mixed[8]}", "--yes")
    assert "Requeued 1 task(s). Refused 1 (1 queued)" in capsys.readouterr().out


def test_cancel_by_queue_needs_confirmation_when_not_interactive(mixed):
    with pytest.raises(CommandError, match="Add --yes to confirm"):
        call_command("tasks", "cancel", "--queue", "normal")
    assert CaptionTask.objects.filter(status=TaskStatus.CANCELLED).count() == 0
    call_command("tasks", "cancel", "--queue", "normal", "--yes")
    assert CaptionTask.objects.filter(status=TaskStatus.CANCELLED).count() == 4
    entry = AuditEntry.objects.get(action="tasks_cancel")
    assert (entry.user, entry.count, entry.detail["via"]) == (None, 4, command_via("cancel"))


@pytest.mark.parametrize("arguments, message", [
    (["requeue"], "--failed"), (["cancel"], "--ids 1,2,3 or --queue"), (["requeue", "--ids", "a,b"], "--ids must be"),
    (["cleanup", "--older-than", "week"], "--older-than must look like"),
])
def test_errors(redis, arguments, message):
    with pytest.raises(CommandError, match=message):
        call_command("tasks", *arguments)


class BurstSimpleWorker(SimpleWorker):
    """rq's own SimpleWorker without its command listener: a burst run takes no commands, and rq 2.12's listener
    can keep an exiting worker 60 s with redis-py 8.2 (queues/fleet/worker.py has our own)."""

    def subscribe(self):
        pass

    def unsubscribe(self):
        pass


def run_with_rq_worker() -> None:
    """Runs the queues with rq's own SimpleWorker, which keeps a finished job's hash and result (as the portal's
    worker did before it trimmed them, and still does for jobs that are not captions)."""
    BurstSimpleWorker(broker.get_queues(), connection=broker.get_connection(), job_class=broker.CaptionJob,
                      serializer=JSONSerializer).work(burst=True, logging_level="WARNING")


def test_our_worker_leaves_no_finished_caption_jobs_to_clean_up(redis, media_image, capsys):
    ids = tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(3)]).created
    run_worker()
    assert CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.COMPLETED).count() == 3
    assert all(broker.fetch_job(task_id) is None for task_id in ids)
    call_command("tasks", "cleanup", "--older-than", "0s", "--yes")
    assert "Deleted 3 task row(s) and 0 finished job(s)" in capsys.readouterr().out


def test_cleanup_deletes_old_finished_rows_and_jobs_in_batches(redis, media_image, capsys):
    ids = tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(5)]).created
    run_with_rq_worker()
    old, recent = ids[:3], ids[3:]
    CaptionTask.objects.filter(pk__in=old).update(finished_at=timezone.now() - timedelta(days=10))
    long_ago = (timezone.now() - timedelta(days=10)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    for task_id in old:
        redis.hset(f"rq:job:caption-{task_id}", "ended_at", long_ago)
    call_command("tasks", "cleanup", "--older-than", "7d", "--dry-run")
    assert "Would delete 3 task row(s)" in capsys.readouterr().out and CaptionTask.objects.count() == 5
    assert not AuditEntry.objects.filter(action="tasks_cleanup").exists()  # a dry run changes nothing
    call_command("tasks", "cleanup", "--older-than", "7d", "--yes")
    assert "Deleted 3 task row(s) and 3 finished job(s)" in capsys.readouterr().out
    entry = AuditEntry.objects.get(action="tasks_cleanup")
    assert (entry.user, entry.count, entry.detail) == (None, 3, {"jobs": 3, "kept": 0, "via": command_via("cleanup")})
    assert sorted(CaptionTask.objects.values_list("pk", flat=True)) == sorted(recent)
    assert not TaskEvent.objects.filter(task_id__in=old).exists()
    assert all(broker.fetch_job(task_id) is None for task_id in old)
    assert all(broker.fetch_job(task_id) is not None for task_id in recent)


def test_cleanup_with_retries_in_flight_keeps_their_jobs(redis, http_server, capsys, settings):
    from queues.operations.services import tasks_retry_now

    image = http_server.route("/flaky.png", lambda request, body: (request.send_response(503),
                                                                   request.send_header("Content-Length", "0"),
                                                                   request.end_headers()))
    settings.RQ_RETRY_BACKOFF = 60
    ids = tasks_submit_many(specs=[TaskSpec(image) for _ in range(3)]).created
    run_with_rq_worker()  # each attempt meets a 503: a retry is scheduled, and rq files the job as finished
    assert CaptionTask.objects.filter(status=TaskStatus.QUEUED, attempts=1).count() == 3
    tasks_retry_now(task_ids=ids)  # published again under the same job ids: queued, no end time
    assert all(broker.fetch_job(task_id).get_status() == "queued" for task_id in ids)
    call_command("tasks", "cleanup", "--older-than", "7d", "--dry-run")
    assert "finished job" in capsys.readouterr().out
    call_command("tasks", "cleanup", "--older-than", "0s", "--yes")
    capsys.readouterr()
    assert redis.llen("rq:queue:normal") == 3
    assert all(broker.fetch_job(task_id).get_status() == "queued" for task_id in ids)  # live jobs kept
    assert redis.zcard("rq:finished:normal") == 0  # only the stale registry entries went
