"""Which migration runs keep the database pollers from claiming, and what health says about the pollers."""

import pytest

from migration import dispatch, state
from migration.legacy import LegacyPoller
from migration.models import MigrationRun, Mode
from migration.runs import run_create, run_execute
from migration.state import pollers_blocked
from monitoring.metrics.health import health_report
from monitoring.metrics.monitors import monitor_pass
from monitoring.metrics.snapshot import take_snapshot
from queues.models import CaptionTask, Dispatch, TaskStatus
from queues.services import task_submit

pytestmark = pytest.mark.django_db(transaction=True)


def _run(**options) -> MigrationRun:
    return run_create(user=None, options={"drain_timeout": 5, **options})


def test_a_run_that_failed_after_its_cutover_leaves_the_fallback_working(redis, mode, registered_worker, settings,
                                                                        tmp_path, media_image):
    settings.MIGRATION_BACKUP_DIR = tmp_path
    mode(mode=Mode.LEGACY)
    run = run_execute(run=_run(validate_tasks=1, validate_timeout=1))  # the worker is idle: validate fails
    assert run.state == MigrationRun.State.FAILED and "validation" in run.failure_reason, run.failure_reason
    assert state.system_mode().mode == Mode.RQ
    assert not pollers_blocked()

    mode(fallback_active=True)  # Redis went away afterwards
    task = task_submit(image_ref=media_image())
    assert CaptionTask.objects.get(pk=task.pk).dispatch == Dispatch.FALLBACK
    assert dispatch.ModePolicy().processes(running=set()), "the supervisor is told to start a fallback poller"
    result = LegacyPoller(name="poller.fallback", interval=0.01, fallback=True).work(burst=True)
    assert result.completed >= 1, result
    assert CaptionTask.objects.get(pk=task.pk).status == TaskStatus.COMPLETED


def test_a_run_stopped_between_its_drain_and_its_cutover_keeps_the_pollers_idle_and_health_says_why(
        redis, mode, database_tasks, registered_worker, settings, tmp_path):
    settings.MIGRATION_BACKUP_DIR = tmp_path
    mode(mode=Mode.LEGACY)
    ids = database_tasks(3)
    run = _run(validate_tasks=0)
    while not run.phases.filter(name="drain", state="done").exists():
        run = run_execute(run=run, one_phase=True)
    assert run.state == MigrationRun.State.STOPPED
    assert pollers_blocked()

    result = LegacyPoller(name="poller.late", interval=0.01).work(burst=True)
    assert result.processed == 0 and str(run) in result.reason, result
    assert set(CaptionTask.objects.filter(pk__in=ids).values_list("status", flat=True)) == {TaskStatus.QUEUED}
    health = health_report(take_snapshot())
    assert health["components"]["dispatch"]["status"] == "unhealthy", health["components"]
    assert "resume it" in health["components"]["dispatch"]["reason"]

    run = run_execute(run=run)  # resumed to its end: the pollers are free again
    assert run.state == MigrationRun.State.SUCCEEDED, run.failure_reason
    assert not pollers_blocked()


def test_health_in_legacy_mode_judges_the_pollers_not_the_rq_workers(redis, mode, database_tasks):
    mode(mode=Mode.LEGACY)
    database_tasks(2)
    health = health_report(take_snapshot())
    assert health["components"]["dispatch"]["status"] == "unhealthy", health["components"]
    assert "no poller is alive" in health["components"]["dispatch"]["reason"]
    assert health["components"]["workers"]["status"] == "healthy"  # no RQ worker is needed in legacy mode

    LegacyPoller(name="poller.alive").register()
    for monitor, interval in (("sampler", 60), ("evaluator", 10)):  # the portal's own monitors run too
        monitor_pass(monitor, holder="host-a:1", interval=interval)
    health = health_report(take_snapshot())
    assert health["components"]["dispatch"] == {"status": "healthy",
                                                "reason": "mode legacy; 1 database poller(s) alive"}
    assert health["status"] == "healthy", health["components"]
