"""A rollback while a real RQ worker is busy: it waits for the tasks RQ runs, moves a retry that comes back to the
queue, and says so when they outlast its timeout. A two-slot ``rqworker`` process, captioning through a slow local
Ollama stand-in; one task's image answers 500 after a while (a transient error: a retry)."""

import pytest
from django.utils import timezone

from migration.models import MigrationRun, Mode
from migration.runs import rollback_create, run_execute
from queues.models import CaptionTask, Dispatch, TaskEvent, TaskStatus
from queues.services import TaskSpec, tasks_submit_many
from tests.conftest import respond
from tests.processes import slow_ollama, start_command, stop_process, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CAPTION_SECONDS = 6
FAILING_IMAGE_SECONDS = 3


@pytest.fixture
def busy_rq(redis, mode, http_server, png_bytes, django_capture_on_commit_callbacks):
    """Mode rq; a worker with two slots runs task A (a caption of 6 s) and task B (whose image answers 500 after
    3 s, so B comes back to the queue as a retry while the rollback waits). Yields (A, B)."""
    mode(mode=Mode.RQ)
    image = slow_ollama(http_server, png_bytes, delay=CAPTION_SECONDS)
    failing = http_server.route("/gone.png", respond(500, b"try later", "text/plain", delay=FAILING_IMAGE_SECONDS))
    with django_capture_on_commit_callbacks(execute=True):
        a, b = tasks_submit_many(specs=[TaskSpec(image), TaskSpec(failing)]).created
    worker = start_command("rqworker", "--slots", "2", "--name", "busy-rq", "--verbosity", "0",
                           CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url, IMAGE_FETCH_ALLOW_PRIVATE="true",
                           RQ_RETRY_BACKOFF="60")  # the retry waits in the queue: the rollback must move it
    try:
        wait_for(lambda: CaptionTask.objects.filter(pk__in=(a, b), status=TaskStatus.PROCESSING).count() == 2, 30,
                 "both tasks running in RQ")
        yield a, b
    finally:
        stop_process(worker, grace=30)


def test_a_rollback_waits_for_the_tasks_rq_runs_and_moves_a_retry_back_to_the_poller(busy_rq, settings, tmp_path):
    settings.MIGRATION_BACKUP_DIR = tmp_path
    a, b = busy_rq
    started = timezone.now()
    rollback = run_execute(run=rollback_create(user=None, options={"rollback_timeout": 60}))
    assert rollback.state == MigrationRun.State.SUCCEEDED, rollback.failure_reason
    returned = rollback.phases.get(name="return_tasks")
    assert returned.counts["returned"] == 1  # B, back from its failed attempt as a retry
    assert (returned.finished_at - started).total_seconds() >= CAPTION_SECONDS - 1, "it waited for A"

    task_a, task_b = CaptionTask.objects.get(pk=a), CaptionTask.objects.get(pk=b)
    assert (task_a.status, task_a.dispatch, task_a.attempts) == (TaskStatus.COMPLETED, Dispatch.RQ, 1)
    assert (task_b.status, task_b.dispatch, task_b.attempts) == (TaskStatus.QUEUED, Dispatch.DATABASE, 1)
    assert TaskEvent.objects.filter(task_id=b, kind=TaskEvent.Kind.RETRY_SCHEDULED).count() == 1
    assert rollback.verification["ok"], rollback.verification["problems"]


def test_a_rollback_whose_timeout_a_running_task_outlasts_fails_saying_so_then_resumes(busy_rq, settings,
                                                                                        tmp_path):
    settings.MIGRATION_BACKUP_DIR = tmp_path
    a, _ = busy_rq
    rollback = run_execute(run=rollback_create(user=None, options={"rollback_timeout": 1}))
    assert rollback.state == MigrationRun.State.FAILED
    assert "still run in RQ after 1 s; resume the rollback once they have finished" in rollback.failure_reason

    wait_for(lambda: CaptionTask.objects.filter(pk=a, status=TaskStatus.COMPLETED).exists(), 30, "A finished")
    rollback = run_execute(run=rollback)
    assert rollback.state == MigrationRun.State.SUCCEEDED, rollback.failure_reason
    assert set(CaptionTask.objects.filter(status=TaskStatus.QUEUED).values_list("dispatch", flat=True)) == {
        Dispatch.DATABASE}
