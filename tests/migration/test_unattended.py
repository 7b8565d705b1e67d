"""The database poller with no supervisor beside it (legacy mode with pollers only, as after a rollback), and a
migration process that stalls while its run is rolled back: real processes, SIGKILL and SIGSTOP."""

import os
import signal
import subprocess
import sys

import pytest
from django.conf import settings as django_settings

from migration import state
from migration.models import MigrationRun, Mode, SystemMode
from migration.runs import rollback_create, run_execute
from queues.fleet.reconcile import TASK_LEASE_SECONDS
from queues.models import CaptionTask, Dispatch, TaskEvent, TaskStatus
from tests.conftest import respond, subprocess_env
from tests.processes import freeze, start_command, stop_process, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_a_poller_killed_mid_task_has_its_task_run_by_another_poller_without_a_supervisor(
        redis, mode, slow_poller, http_server):
    mode(mode=Mode.LEGACY)
    first, [task_id] = slow_poller("poller.killed", 1, 120)
    try:
        wait_for(lambda: CaptionTask.objects.filter(pk=task_id, status=TaskStatus.PROCESSING).exists(), 30,
                 "the first poller took the task")
    finally:
        first.kill()
        first.wait(10)
    http_server.route("/api/generate", respond(200, b'{"response": "A caption at last."}', "application/json"))
    second = start_command("run_legacy_worker", "--name", "poller.survivor", "--interval", "0.05",
                           CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url, IMAGE_FETCH_ALLOW_PRIVATE="true",
                           RQ_RETRY_BACKOFF="0")
    try:
        # The lease runs out TASK_LEASE_SECONDS after the kill; the survivor judges it on its next recovery pass.
        wait_for(lambda: CaptionTask.objects.filter(pk=task_id, status=TaskStatus.COMPLETED).exists(),
                 TASK_LEASE_SECONDS + 45, "the surviving poller ran the dead poller's task")
    finally:
        assert stop_process(second), "the survivor stops on SIGTERM"
    task = CaptionTask.objects.get(pk=task_id)
    assert (task.worker_name, task.attempts, task.dispatch) == ("poller.survivor", 2, Dispatch.DATABASE)
    lost = TaskEvent.objects.get(task_id=task_id, kind=TaskEvent.Kind.WORKER_LOST)
    assert lost.worker_name == "poller.killed"
    assert TaskEvent.objects.filter(task_id=task_id, kind=TaskEvent.Kind.COMPLETED).count() == 1


def test_a_live_pollers_long_task_is_not_taken_from_it(redis, mode, slow_poller, http_server):
    """The recovery judges leases only: a poller that renews its lease keeps its task however long it runs."""
    mode(mode=Mode.LEGACY)
    busy, [task_id] = slow_poller("poller.busy", 1, TASK_LEASE_SECONDS + 10)
    other = None
    try:
        wait_for(lambda: CaptionTask.objects.filter(pk=task_id, status=TaskStatus.PROCESSING).exists(), 30,
                 "the poller took the task")
        other = start_command("run_legacy_worker", "--name", "poller.other", "--interval", "0.05")
        wait_for(lambda: CaptionTask.objects.filter(pk=task_id, status=TaskStatus.COMPLETED).exists(),
                 TASK_LEASE_SECONDS + 40, "the busy poller finished its task")
    finally:
        if other is not None:
            stop_process(other)
        stop_process(busy)
    task = CaptionTask.objects.get(pk=task_id)
    assert (task.worker_name, task.attempts) == ("poller.busy", 1)
    assert not TaskEvent.objects.filter(task_id=task_id, kind=TaskEvent.Kind.WORKER_LOST).exists()


def test_a_phase_that_wakes_after_its_run_was_fenced_writes_nothing(mode):
    """The hybrid phase frozen between marking itself running and setting the mode (the stalled drill below lost
    that race on a loaded machine: the mode was hybrid after the rollback). The rollback's creation takes the run's
    lease away; the phase's writes are fenced under the mode row's lock, so it wakes to LeaseLost and changes
    nothing."""
    from datetime import timedelta

    from django.utils import timezone

    from migration import dispatch
    from migration.runs import run_create
    from migration.state import LeaseLost

    mode(mode=Mode.LEGACY)
    run = run_create(user=None)
    MigrationRun.objects.filter(pk=run.pk).update(state=MigrationRun.State.RUNNING, executor="host:1:abc",
                                                  heartbeat_at=timezone.now() - timedelta(hours=1))
    run.refresh_from_db()  # as the phase holds it: its executor is this process's
    rollback = rollback_create(user=None, of=run)  # allowed: the lease is stale; it takes the lease away
    # The rollback runs to its end while the phase sleeps (the drill below runs it for real).
    MigrationRun.objects.filter(pk=rollback.pk).update(state=MigrationRun.State.SUCCEEDED)
    MigrationRun.objects.filter(pk=run.pk).update(state=MigrationRun.State.ROLLED_BACK)
    before = SystemMode.objects.values().get(pk=1)
    for write in (lambda: dispatch.mode_set(mode=Mode.HYBRID, user=None, run=run, executing=True),
                  lambda: dispatch.submission_take_over(run=run, user=None),
                  lambda: dispatch.submission_resume(user=None, run=run, executing=True)):
        with pytest.raises(LeaseLost):
            write()
    assert SystemMode.objects.values().get(pk=1) == before


def test_a_stalled_migration_process_that_wakes_after_the_rollback_leaves_it_rolled_back(
        redis, mode, database_tasks, registered_worker, settings, tmp_path):
    settings.MIGRATION_RUN_LEASE_SECONDS = 2
    mode(mode=Mode.LEGACY)
    ids = database_tasks(20)
    migrating = subprocess.Popen(
        [sys.executable, "manage.py", "migrate_to_rq", "start", "--yes", "--soak", "60", "--validate-tasks", "0",
         "--drain-timeout", "5", "--no-progress"], cwd=django_settings.BASE_DIR,
        env=subprocess_env(MIGRATION_RUN_LEASE_SECONDS="2", MIGRATION_BACKUP_DIR=str(tmp_path)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: MigrationRun.objects.filter(phases__name="hybrid", phases__state="running").exists(), 60,
                 "the migration reached its hybrid soak")
        # A VM pause, a long GC, a partition: its lease goes stale. (Not inside a transaction on the rows the
        # rollback locks: the database would make the rollback wait for them.)
        freeze(migrating.pid, rows=[SystemMode.objects.filter(pk=1), MigrationRun.objects.all()])
        migration = MigrationRun.objects.get(kind=MigrationRun.Kind.MIGRATION)
        wait_for(lambda: not MigrationRun.objects.filter(pk=migration.pk, heartbeat_at__gt=_seconds_ago(3)).exists(),
                 15, "the frozen process's lease went stale")

        rollback = run_execute(run=rollback_create(user=None, options={"rollback_timeout": 10}))
        assert rollback.state == MigrationRun.State.SUCCEEDED, rollback.failure_reason
        migration.refresh_from_db()
        assert migration.state == MigrationRun.State.ROLLED_BACK

        os.kill(migrating.pid, signal.SIGCONT)
        output = migrating.communicate(timeout=60)[0]
    finally:
        if migrating.poll() is None:
            os.kill(migrating.pid, signal.SIGCONT)
            migrating.kill()
            migrating.communicate(timeout=10)
    assert migrating.returncode != 0, output
    assert "Traceback" not in output and "rolled back" in output, output
    migration.refresh_from_db()
    assert migration.state == MigrationRun.State.ROLLED_BACK, migration.failure_reason
    assert state.system_mode().mode == Mode.LEGACY
    assert set(CaptionTask.objects.filter(pk__in=ids).values_list("dispatch", "status")) == {
        (Dispatch.DATABASE, TaskStatus.QUEUED)}
    assert not migration.phases.filter(name__in=("drain", "migrate", "cutover"), state="done").exists()


def _seconds_ago(seconds: float):
    from datetime import timedelta

    from django.utils import timezone

    return timezone.now() - timedelta(seconds=seconds)
