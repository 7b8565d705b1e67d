"""While a migration or rollback run is open, the mode and the submission pause are the run's: a timed pause it
finds cannot lapse mid-run, and operators' pauses, resumes and mode changes wait until it ends."""

from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from migration import dispatch
from migration.models import MigrationRun, Mode, SystemMode
from migration.runs import run_create, run_execute
from queues.models import CaptionTask, Dispatch
from queues.services import task_submit, tasks_relay_once

pytestmark = pytest.mark.django_db(transaction=True)


def _to_phase(run: MigrationRun, name: str) -> MigrationRun:
    while not run.phases.filter(name=name, state="done").exists():
        run = run_execute(run=run, one_phase=True)
    return run


def test_a_timed_pause_in_force_at_the_start_becomes_the_runs_own(redis, mode, registered_worker, settings,
                                                                   tmp_path, media_image):
    settings.MIGRATION_BACKUP_DIR = tmp_path
    mode(mode=Mode.LEGACY)
    dispatch.submission_pause(reason="index rebuild", user=None, duration=timedelta(minutes=30))
    run = _to_phase(run_create(user=None, options={"validate_tasks": 0, "drain_timeout": 5}), "pause_submission")

    row = SystemMode.objects.get(pk=1)
    assert row.submission_paused and row.paused_until is None, "the pause can no longer lapse mid-run"
    assert str(run) in row.paused_reason and "index rebuild" in row.paused_reason
    assert run.log_lines.filter(message__contains="holds that pause now").exists()
    tasks_relay_once()
    task = task_submit(image_ref=media_image())
    assert CaptionTask.objects.get(pk=task.pk).dispatch == Dispatch.HELD

    run = run_execute(run=run)
    assert run.state == MigrationRun.State.SUCCEEDED, run.failure_reason
    assert not SystemMode.objects.get(pk=1).submission_paused
    assert CaptionTask.objects.get(pk=task.pk).dispatch == Dispatch.RQ


def test_operators_cannot_resume_pause_or_change_the_mode_while_a_run_is_open(redis, mode, registered_worker,
                                                                             settings, tmp_path, admin_user, client,
                                                                             media_image):
    settings.MIGRATION_BACKUP_DIR = tmp_path
    mode(mode=Mode.LEGACY)
    run = _to_phase(run_create(user=None, options={"validate_tasks": 0, "drain_timeout": 5}), "drain")
    task = task_submit(image_ref=media_image())

    with pytest.raises(ValidationError, match=f"{run} is stopped"):
        dispatch.submission_resume(user=admin_user)
    with pytest.raises(ValidationError, match="Resume it to its end, or roll it back"):
        dispatch.mode_set(mode=Mode.RQ, user=admin_user)
    with pytest.raises(ValidationError):
        dispatch.submission_pause(reason="my own pause", user=admin_user, duration=timedelta(seconds=5))

    client.force_login(admin_user)
    page = client.post(reverse("admin:migration_resume"))
    assert page.status_code == 400 and b"roll it back" in page.content
    form = client.post(reverse("admin:migration_systemmode_change", args=[1]),
                       {"mode": "rq", "hybrid_rq_percent": 10, "fallback_enabled": "on", "fallback_timeout": 30})
    assert form.status_code == 200 and b"roll it back" in form.content
    row = SystemMode.objects.get(pk=1)
    assert (row.mode, row.submission_paused) == (Mode.LEGACY, True)
    assert CaptionTask.objects.get(pk=task.pk).dispatch == Dispatch.HELD

    run = run_execute(run=run)
    assert run.state == MigrationRun.State.SUCCEEDED, run.failure_reason
    assert dispatch.mode_set(mode=Mode.HYBRID, user=admin_user).mode == Mode.HYBRID  # the run has ended
