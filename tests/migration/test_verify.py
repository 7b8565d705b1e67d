"""Verification: the baseline's counts and checksums and the ran-twice check fail on the changes they exist to catch,
and pass over the changes operators make legitimately (a requeue, a clean-up) without failing a run for good."""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from migration.models import MigrationRun, Mode
from migration.runs import run_create, run_execute
from migration.verify import baseline_take, verification
from queues import broker
from queues.models import CaptionTask, Dispatch, TaskEvent, TaskStatus
from queues.operations.services import tasks_cleanup, tasks_requeue

pytestmark = pytest.mark.django_db(transaction=True)

QUICK = {"validate_tasks": 0, "drain_timeout": 5}


@pytest.fixture
def history(database_tasks):
    """Tasks of every kind, finished long before the baseline: 6 completed, 2 failed, 2 queued for the poller."""
    ids = database_tasks(10)
    long_ago = timezone.now() - timedelta(days=40)
    CaptionTask.objects.filter(pk__in=ids[:6]).update(status=TaskStatus.COMPLETED, started_at=long_ago,
                                                      finished_at=long_ago)
    CaptionTask.objects.filter(pk__in=ids[6:8]).update(status=TaskStatus.FAILED, started_at=long_ago,
                                                       finished_at=long_ago)
    for pk in ids[:6]:
        TaskEvent.objects.create(task_id=pk, kind=TaskEvent.Kind.COMPLETED, at=long_ago)
    return ids


def _problems(baseline) -> list[str]:
    return verification(direction="to_database", baseline=baseline)["problems"]


def test_the_tally_fails_on_a_row_lost_added_or_changed_and_the_ran_twice_check_on_a_second_completion(
        redis, mode, history):
    mode(mode=Mode.LEGACY)
    baseline = baseline_take(at=timezone.now())
    assert _problems(baseline) == []

    lost = CaptionTask.objects.filter(pk=history[0])
    row = lost.values().get()
    lost.delete()
    assert any(problem.startswith("COMPLETED: 6 task(s) before, 5 now") for problem in _problems(baseline))
    CaptionTask.objects.create(**row)
    assert _problems(baseline) == []

    CaptionTask.objects.filter(pk=history[1]).update(image_ref="https://elsewhere.example/other.png")
    assert any(problem.startswith("COMPLETED: 6 task(s) before, 6 now, or their checksums differ")
               for problem in _problems(baseline)), "a changed row shows in its group's checksum"
    CaptionTask.objects.filter(pk=history[1]).update(image_ref=row["image_ref"])

    CaptionTask.objects.filter(pk=history[8]).update(status=TaskStatus.FAILED, finished_at=timezone.now()
                                                     - timedelta(days=40))  # a queued task "finished" long ago
    assert any(problem.startswith("FAILED: 2 task(s) before, 3 now") for problem in _problems(baseline))
    CaptionTask.objects.filter(pk=history[8]).update(status=TaskStatus.QUEUED, finished_at=None)
    assert _problems(baseline) == []

    TaskEvent.objects.create(task_id=history[2], kind=TaskEvent.Kind.COMPLETED, at=timezone.now())
    assert "1 task(s) completed more than once" in _problems(baseline)


def test_the_ran_twice_check_allows_one_completion_per_requeue(redis, mode, history):
    TaskEvent.objects.create(task_id=history[0], kind=TaskEvent.Kind.REQUEUED, at=timezone.now())
    TaskEvent.objects.create(task_id=history[0], kind=TaskEvent.Kind.COMPLETED, at=timezone.now())
    assert verification(direction="to_database")["ran_twice"] == 0
    TaskEvent.objects.create(task_id=history[0], kind=TaskEvent.Kind.COMPLETED, at=timezone.now())
    assert verification(direction="to_database")["ran_twice"] == 1


def test_a_requeue_during_an_open_run_waits_and_the_run_still_verifies(redis, mode, history, registered_worker,
                                                                      settings, tmp_path):
    settings.MIGRATION_BACKUP_DIR = tmp_path
    mode(mode=Mode.LEGACY)
    run = run_create(user=None, options=QUICK)
    while not run.phases.filter(name="migrate", state="done").exists():
        run = run_execute(run=run, one_phase=True)

    result = tasks_requeue(task_ids=[history[6]])
    assert (result.changed, result.pinned) == (0, 1), result
    assert f"{run} verifies tasks up to" in result.describe()
    assert CaptionTask.objects.get(pk=history[6]).status == TaskStatus.FAILED
    kept = tasks_cleanup(cutoff=timezone.now() - timedelta(days=30))
    assert (kept["rows"], kept["kept"]) == (0, 6), kept

    run = run_execute(run=run)
    assert run.state == MigrationRun.State.SUCCEEDED, run.failure_reason
    assert tasks_requeue(task_ids=[history[6]]).changed == 1  # the run has ended: requeues go through again


def test_verify_any_time_after_a_run_passes_after_a_cleanup_and_a_requeue(redis, mode, history, registered_worker,
                                                                        settings, tmp_path, capsys):
    settings.MIGRATION_BACKUP_DIR = tmp_path
    mode(mode=Mode.LEGACY)
    run = run_execute(run=run_create(user=None, options=QUICK))
    assert run.state == MigrationRun.State.SUCCEEDED, run.failure_reason
    assert tasks_cleanup(cutoff=timezone.now() - timedelta(days=30))["rows"] == 6
    assert tasks_requeue(task_ids=[history[7]]).changed == 1
    assert CaptionTask.objects.get(pk=history[7]).dispatch == Dispatch.RQ

    call_command("migrate_to_rq", "verify")
    assert "no baseline compared" in capsys.readouterr().out
    broker.get_connection().lrem("rq:queue:normal", 1, f"caption-{history[9]}")
    with pytest.raises(CommandError, match="1 queued RQ task"):
        call_command("migrate_to_rq", "verify")  # what verify still checks, it still catches
