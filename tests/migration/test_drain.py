"""The drain phase against pollers that overrun its timeout: on another host, and frozen (SIGSTOP). Real
``run_legacy_worker`` processes captioning through a slow local Ollama stand-in, real Redis and database."""

import os
import signal

import pytest

from migration.models import LegacyWorker, MigrationRun, Mode
from migration.runs import run_create, run_execute
from queues import broker
from queues.models import CaptionTask, Dispatch, TaskEvent, TaskStatus
from tests.processes import freeze, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

CAPTION_SECONDS = 20  # far longer than the drain's timeout: the poller cannot finish its task in time


@pytest.fixture
def busy_poller(redis, mode, slow_poller, settings, tmp_path):
    """A poller process in the middle of a 20 s caption, registered as if on another host; yields (process, task id)."""
    settings.MIGRATION_BACKUP_DIR = tmp_path
    mode(mode=Mode.LEGACY)
    process, [task_id] = slow_poller("poller.far", 1, CAPTION_SECONDS)
    try:
        wait_for(lambda: CaptionTask.objects.filter(pk=task_id, status=TaskStatus.PROCESSING).exists(), 20,
                 "the poller took the task")
        # Nothing on this host may reach it by pid: the drain must get through to it by its row alone.
        LegacyWorker.objects.filter(name="poller.far").update(host="another-host", pid=1)
        yield process, task_id
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
        process.wait(10)


def _migrate(drain_timeout: float) -> MigrationRun:
    return run_execute(run=run_create(user=None, options={"validate_tasks": 0, "drain_timeout": drain_timeout}))


def _moved_to_rq(task_id: int) -> CaptionTask:
    task = CaptionTask.objects.get(pk=task_id)
    assert (task.dispatch, task.status) == (Dispatch.RQ, TaskStatus.QUEUED)
    return task


def test_a_poller_on_another_host_that_overruns_the_drain_gives_its_task_back_and_exits(busy_poller,
                                                                                      registered_worker):
    process, task_id = busy_poller
    run = _migrate(drain_timeout=1)
    assert run.state == MigrationRun.State.SUCCEEDED, run.failure_reason
    assert run.phases.get(name="drain").counts["stopped_by_force"] == ["poller.far"]
    output = process.communicate(timeout=20)[0].decode()
    assert process.returncode == 0, output
    assert "told to stop at once" in output
    task = _moved_to_rq(task_id)
    assert task.attempts == 0  # given back without using a retry
    assert task_id in broker.queued_task_ids("normal")
    given_back = TaskEvent.objects.get(task_id=task_id, kind=TaskEvent.Kind.RETRY_SCHEDULED)
    assert given_back.worker_name == "poller.far" and "without using a retry" in given_back.detail
    assert run.log_lines.filter(message__contains="told to give their task back").exists()


def test_a_frozen_poller_is_drained_by_its_stale_heartbeat_and_writes_nothing_when_it_wakes(busy_poller,
                                                                                          registered_worker):
    process, task_id = busy_poller
    freeze(process.pid, rows=[CaptionTask.objects.filter(pk=task_id), LegacyWorker.objects.all()])
    run = _migrate(drain_timeout=1)
    assert run.state == MigrationRun.State.SUCCEEDED, run.failure_reason
    assert run.log_lines.filter(message__contains="poller.far on another-host stopped answering; its task(s) were "
                                                  "given back").exists()
    moved = _moved_to_rq(task_id)
    assert moved.attempts == 0  # given back without using a retry: the drain stopped the poller, not the task
    lost = TaskEvent.objects.get(task_id=task_id, kind=TaskEvent.Kind.WORKER_LOST)
    assert lost.worker_name == "poller.far" and "without using a retry" in lost.detail
    events = set(TaskEvent.objects.filter(task_id=task_id).values_list("pk", flat=True))
    os.kill(process.pid, signal.SIGCONT)  # it wakes inside its old attempt, told to stop at once
    output = process.communicate(timeout=CAPTION_SECONDS + 15)[0].decode()
    assert process.returncode == 0, output
    after = _moved_to_rq(task_id)  # the woken poller's give-back found its claim taken: it wrote nothing
    assert (after.attempts, after.claim_token, after.publish_after) == (moved.attempts, moved.claim_token,
                                                                        moved.publish_after)
    assert set(TaskEvent.objects.filter(task_id=task_id).values_list("pk", flat=True)) == events


def test_an_attempt_left_by_a_poller_that_exited_on_an_error_is_given_back_by_the_drain(
        redis, mode, database_tasks, registered_worker, settings, tmp_path):
    """A poller whose loop ended on an exception closes its row with the task still in hand: no stale registration
    points at it, yet its attempt must go back once its lease has run out."""
    from datetime import timedelta

    from django.utils import timezone

    from queues.execution import task_claim_as

    settings.MIGRATION_BACKUP_DIR = tmp_path
    mode(mode=Mode.LEGACY)
    [task_id] = database_tasks(1)
    assert task_claim_as(task_id=task_id, worker_name="poller.crashed",
                         expect={"status": TaskStatus.QUEUED, "dispatch": Dispatch.DATABASE}) is not None
    long_ago = timezone.now() - timedelta(minutes=5)
    LegacyWorker.objects.create(name="poller.crashed", host="elsewhere", pid=1, heartbeat_at=long_ago,
                                stopped_at=long_ago)
    CaptionTask.objects.filter(pk=task_id).update(heartbeat_at=long_ago)

    run = _migrate(drain_timeout=1)
    assert run.state == MigrationRun.State.SUCCEEDED, run.failure_reason
    task = _moved_to_rq(task_id)
    assert task.attempts == 0
    assert run.log_lines.filter(message__contains="poller.crashed, which had exited with it in hand").exists()
