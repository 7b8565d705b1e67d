"""Migration runs end to end on a real Redis and database: phases, checkpoint repair, verification, rollback."""

import json
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db.models import Count
from django.utils import timezone

from migration import dispatch, state
from migration.backup import BackupError, backup_restore, backup_write
from migration.models import MigrationPhase, MigrationRun, Mode
from migration.runs import RunError, rollback_create, run_create, run_execute
from queues import broker
from queues.models import CaptionTask, Dispatch, TaskEvent, TaskStatus
from tests.processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

QUICK = {"validate_tasks": 0, "drain_timeout": 5}


def _phases(run):
    return dict(run.phases.values_list("name", "state"))


def _completions():
    return dict(TaskEvent.objects.filter(kind="completed").values("task_id").annotate(n=Count("id"))
                .values_list("task_id", "n"))


def test_a_run_migrates_every_queued_database_task_and_proves_it(redis, mode, database_tasks, rq_worker_process,
                                                                  settings, tmp_path):
    settings.MIGRATION_BACKUP_DIR = tmp_path / "backups"
    mode(mode=Mode.LEGACY)
    queued = database_tasks(300)
    done = database_tasks(20)
    CaptionTask.objects.filter(pk__in=done).update(status=TaskStatus.COMPLETED, finished_at=timezone.now())
    run = run_execute(run=run_create(user=None, options={**QUICK, "validate_tasks": 3}))
    assert run.state == MigrationRun.State.SUCCEEDED, run.failure_reason
    assert set(_phases(run).values()) == {"done", "skipped"} and _phases(run)["hybrid"] == "skipped"
    assert run.verification["ok"]
    assert run.verification["left_behind"] == {"queued_for_database": 0, "held_with_submission_open": 0}
    row = state.system_mode()
    assert row.mode == Mode.RQ and not row.paused_now()
    migrate = run.phases.get(name="migrate")
    assert migrate.counts["migrated"] == 300 and migrate.progress_done == migrate.progress_total == 320  # the walk
    backup = run.phases.get(name="backup").counts
    assert backup["rows"] == 320 and (tmp_path / "backups").exists()
    wait_for(lambda: CaptionTask.objects.filter(pk__in=queued, status=TaskStatus.COMPLETED).count() == 300, 60,
             "the RQ worker completed the migrated tasks")
    assert set(_completions().values()) == {1}  # nothing ran twice
    assert run.log_lines.filter(level="error").count() == 0


def test_preflight_stops_the_run_on_an_evicting_redis_and_the_run_resumes_once_fixed(
        redis, mode, database_tasks, registered_worker, settings, tmp_path):
    settings.MIGRATION_BACKUP_DIR = tmp_path
    database_tasks(5)
    redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        run = run_execute(run=run_create(user=None, options=QUICK))
    finally:
        redis.config_set("maxmemory-policy", "noeviction")
    assert run.state == MigrationRun.State.FAILED and "noeviction" in run.failure_reason
    assert _phases(run)["preflight"] == "failed" and _phases(run)["backup"] == "pending"
    with pytest.raises(RunError, match="resume it or roll it back"):
        run_create(user=None)
    run = run_execute(run=run)
    assert run.state == MigrationRun.State.SUCCEEDED, run.failure_reason
    assert run.phases.get(name="preflight").attempts == 2


def test_an_interrupted_batch_is_published_when_the_run_resumes(redis, mode, database_tasks, registered_worker,
                                                               settings, tmp_path):
    """The state a SIGKILL leaves between the batch's commit and its MULTI/EXEC: moved, stamped, no jobs."""
    settings.MIGRATION_BACKUP_DIR = tmp_path
    ids = database_tasks(50)
    # Submitted through requests with ids: one in the interrupted batch, one moved by the resumed phase.
    CaptionTask.objects.filter(pk=ids[3]).update(correlation_id="request-in-batch")
    CaptionTask.objects.filter(pk=ids[30]).update(correlation_id="request-after")
    run = run_create(user=None, options=QUICK)
    run.phases.filter(order__lt=MigrationPhase.objects.get(run=run, name="migrate").order).update(state="done")
    run.phases.filter(name="migrate").update(state="running", attempts=1)
    from migration.verify import baseline_take

    baseline = baseline_take(at=timezone.now())
    stamp = timezone.now()
    CaptionTask.objects.filter(pk__in=ids[:20]).update(dispatch=Dispatch.RQ, published_at=stamp, publish_after=stamp)
    MigrationRun.objects.filter(pk=run.pk).update(state="running", baseline=baseline, checkpoint=ids[19],
                                                  checkpoint_window={"ids": ids[:20], "stamp": stamp.isoformat()})
    run = run_execute(run=MigrationRun.objects.get(pk=run.pk))
    assert run.state == MigrationRun.State.SUCCEEDED, run.failure_reason
    assert run.phases.get(name="migrate").counts["republished_after_interruption"] == 20
    assert broker.queued_task_ids("normal") == set(ids)
    assert run.verification["jobs"]["duplicate_jobs"] == 0 and run.verification["jobs"]["missing_jobs"] == 0
    assert broker.fetch_job(ids[3]).meta["correlation_id"] == "request-in-batch"
    assert broker.fetch_job(ids[30]).meta["correlation_id"] == "request-after"
    assert "correlation_id" not in broker.fetch_job(ids[0]).meta


def test_rollback_after_cutover_returns_every_queued_task_to_the_poller(redis, mode, database_tasks,
                                                                       registered_worker, settings, tmp_path):
    from migration.legacy import LegacyPoller

    settings.MIGRATION_BACKUP_DIR = tmp_path
    ids = database_tasks(120)
    migration = run_execute(run=run_create(user=None, options=QUICK))
    assert migration.state == MigrationRun.State.SUCCEEDED, migration.failure_reason
    assert broker.queued_task_ids("normal") == set(ids)

    rollback = run_execute(run=rollback_create(user=None))
    assert rollback.state == MigrationRun.State.SUCCEEDED, rollback.failure_reason
    migration.refresh_from_db()
    assert migration.state == MigrationRun.State.ROLLED_BACK and rollback.rollback_of == migration
    assert state.system_mode().mode == Mode.LEGACY
    assert set(CaptionTask.objects.filter(pk__in=ids).values_list("dispatch", "published_at")) == {
        (Dispatch.DATABASE, None)}
    assert not any(redis.exists(f"rq:job:caption-{pk}") for pk in ids)
    assert rollback.verification["ok"], rollback.verification["problems"]

    LegacyPoller(interval=0.01).work(burst=True)
    assert CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.COMPLETED).count() == 120
    from tests.conftest import run_worker

    # A job published for one of them anyway (a publish that raced the rollback): an RQ worker pops it and claims
    # nothing, since the task is the poller's (and done).
    broker.publish([(ids[0], "normal")])
    assert broker.queued_task_ids("normal") == {ids[0]}
    run_worker()
    assert broker.queued_task_ids("normal") == set()
    assert set(_completions().values()) == {1}


def test_rollback_from_the_migrate_phase(redis, mode, database_tasks, registered_worker, settings, tmp_path):
    settings.MIGRATION_BACKUP_DIR = tmp_path
    mode(mode=Mode.LEGACY)
    ids = database_tasks(40)
    run = run_execute(run=run_create(user=None, options=QUICK), one_phase=True)
    while _phases(run)["migrate"] == "pending":
        run = run_execute(run=run, one_phase=True)
    assert run.state == MigrationRun.State.STOPPED and _phases(run)["verify"] == "pending"
    assert state.system_mode().mode == Mode.LEGACY and state.system_mode().paused_now()  # before cutover
    assert broker.queued_task_ids("normal") == set(ids)
    rollback = run_execute(run=rollback_create(user=None))
    assert rollback.state == MigrationRun.State.SUCCEEDED, rollback.failure_reason
    assert set(CaptionTask.objects.filter(pk__in=ids).values_list("dispatch", flat=True)) == {Dispatch.DATABASE}
    assert sum(broker.queue_lengths().values()) == 0
    assert not state.system_mode().paused_now()


def test_a_run_executed_elsewhere_is_not_taken_over(redis, mode, registered_worker):
    run = run_create(user=None, options=QUICK)
    MigrationRun.objects.filter(pk=run.pk).update(executor="other-host:1:abc", heartbeat_at=timezone.now(),
                                                  state="running")
    with pytest.raises(RunError, match="being executed by other-host"):
        run_execute(run=run)


def test_backup_round_trip_and_a_damaged_backup_is_refused(mode, database_tasks, tmp_path):
    ids = database_tasks(30)
    manifest = backup_write(directory=tmp_path)
    assert manifest["rows"] == 30 and manifest["by_status"]["QUEUED"]["count"] == 30
    CaptionTask.objects.filter(pk__in=ids[:10]).delete()
    result = backup_restore(path=manifest["path"])
    assert (result["inserted"], result["present"], result["differing"]) == (10, 20, 0)
    assert CaptionTask.objects.count() == 30
    data = tmp_path / manifest["path"].split("/")[-1] / "tasks.jsonl.gz"
    data.write_bytes(data.read_bytes()[:-5] + b"XXXXX")
    with pytest.raises(BackupError, match="damaged"):
        backup_restore(path=manifest["path"])


def test_a_new_backup_keeps_the_newest_and_deletes_older_ones_of_ours_only(mode, database_tasks, tmp_path,
                                                                          settings):
    settings.MIGRATION_BACKUP_KEEP = 2
    database_tasks(3)
    backups = tmp_path / "backups"
    (backups / "operator-notes").mkdir(parents=True)
    (backups / "tasks-19990101T000000Z-incomplete").mkdir()  # no manifest: not a backup we finished
    written = []
    for label in ("one", "two", "three"):
        written.append(backup_write(directory=backups, label=label))
    assert written[2]["pruned"] == [written[0]["path"]]
    assert sorted(path.name for path in backups.iterdir()) == sorted(
        ["operator-notes", "tasks-19990101T000000Z-incomplete", *(Path(w["path"]).name for w in written[1:])])


def test_a_backup_is_readable_by_its_owner_only_whatever_the_umask(mode, database_tasks, tmp_path):
    """A backup holds every task's image reference (URLs may carry credentials), caption and correlation id: its
    directory is 0700 and its files 0600. They were made with the process' umask (0755 and 0644 here)."""
    import os
    import stat
    from pathlib import Path

    database_tasks(3)
    previous = os.umask(0o022)
    try:
        manifest = backup_write(directory=tmp_path / "backups")
    finally:
        os.umask(previous)
    target = Path(manifest["path"])
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert {entry.name: stat.S_IMODE(entry.stat().st_mode) for entry in target.iterdir()} == {
        "tasks.jsonl.gz": 0o600, "manifest.json": 0o600}
    assert backup_restore(path=manifest["path"])["present"] == 3  # and it still restores


def test_the_command_verify_fails_when_a_job_is_missing(redis, mode, database_tasks, registered_worker, settings,
                                                        tmp_path):
    settings.MIGRATION_BACKUP_DIR = tmp_path
    ids = database_tasks(10)
    call_command("migrate_to_rq", "start", "--yes", "--validate-tasks", "0", "--drain-timeout", "5",
                 "--no-progress", stdout=open("/dev/null", "w"))
    call_command("migrate_to_rq", "verify", stdout=open("/dev/null", "w"))
    redis.lrem("rq:queue:normal", 1, f"caption-{ids[3]}")
    with pytest.raises(CommandError, match="1 queued RQ task"):
        call_command("migrate_to_rq", "verify", stdout=open("/dev/null", "w"))


def test_the_command_refuses_bad_input_clearly(mode, capsys):
    with pytest.raises(CommandError, match="--for"):
        call_command("migrate_to_rq", "pause-submission", "--reason", "x", "--for", "soon")
    with pytest.raises(CommandError, match="--yes"):
        call_command("migrate_to_rq", "start")
    with pytest.raises(CommandError, match="No run is open"):
        call_command("migrate_to_rq", "resume")
    with pytest.raises(CommandError, match="batch_size"):
        call_command("migrate_to_rq", "start", "--yes", "--batch-size", "0")
    assert MigrationRun.objects.count() == 0
    call_command("migrate_to_rq", "pause-submission", "--reason", "upgrade", "--for", "2h")
    call_command("migrate_to_rq", "status", "--json")
    status = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert status["dispatch"]["submission_paused"] and status["dispatch"]["paused_reason"] == "upgrade"


def test_a_retry_in_its_backoff_moves_to_rq_unpublished_and_keeps_its_wait(redis, mode, database_tasks,
                                                                          registered_worker, settings, tmp_path):
    settings.MIGRATION_BACKUP_DIR = tmp_path
    due, waiting = database_tasks(2)
    later = timezone.now() + timedelta(hours=1)
    CaptionTask.objects.filter(pk=waiting).update(attempts=1, publish_after=later)
    run = run_execute(run=run_create(user=None, options=QUICK))
    assert run.state == MigrationRun.State.SUCCEEDED, run.failure_reason
    task = CaptionTask.objects.get(pk=waiting)
    assert (task.dispatch, task.published_at, task.publish_after) == (Dispatch.RQ, None, later)
    assert broker.queued_task_ids("normal") == {due}


def test_a_failed_verify_moves_again_when_the_run_resumes(redis, mode, database_tasks, registered_worker, settings,
                                                          tmp_path):
    """A task queued for the poller behind the migrate phase (a poller's retry landing after the drain) fails the
    verification; resuming runs the migrate phase again, then verifies."""
    settings.MIGRATION_BACKUP_DIR = tmp_path
    mode(mode=Mode.LEGACY)
    ids = database_tasks(30)
    run = run_create(user=None, options=QUICK)
    while _phases(run)["verify"] == "pending" and _phases(run)["migrate"] != "done":
        run = run_execute(run=run, one_phase=True)
    [straggler] = database_tasks(1)
    run = run_execute(run=run)
    assert run.state == MigrationRun.State.FAILED and "queued for database" in run.failure_reason
    assert _phases(run)["migrate"] == "pending"
    run = run_execute(run=run)
    assert run.state == MigrationRun.State.SUCCEEDED, run.failure_reason
    assert broker.queued_task_ids("normal") == {*ids, straggler}


def test_a_process_that_lost_the_run_stops_without_writing(redis, mode, registered_worker, settings, tmp_path):
    import threading

    settings.MIGRATION_BACKUP_DIR = tmp_path
    run = run_create(user=None, options={**QUICK, "soak_seconds": 3})
    outcome = {}

    def execute():
        from django.db import connection

        try:
            run_execute(run=run)
        except RunError as error:
            outcome["error"] = str(error)
        finally:
            connection.close()

    thread = threading.Thread(target=execute)
    thread.start()
    wait_for(lambda: MigrationPhase.objects.filter(run=run, name="hybrid", state="running").exists(), 30,
             "the soak began")
    MigrationRun.objects.filter(pk=run.pk).update(executor="another-host:1:abcdef")  # taken over
    thread.join(30)
    assert "taken over" in outcome.get("error", "")
    assert MigrationPhase.objects.get(run=run, name="hybrid").state == "running"  # not written by the old process
    assert MigrationPhase.objects.get(run=run, name="pause_submission").state == "pending"


def test_requeue_sends_a_task_where_new_tasks_go(redis, mode, database_tasks, admin_user,
                                                 django_capture_on_commit_callbacks):
    from queues.operations.services import tasks_requeue

    [task_id] = database_tasks(1)
    CaptionTask.objects.filter(pk=task_id).update(status=TaskStatus.FAILED, finished_at=timezone.now())
    with django_capture_on_commit_callbacks(execute=True):
        tasks_requeue(task_ids=[task_id], user=admin_user)
    task = CaptionTask.objects.get(pk=task_id)
    assert (task.status, task.dispatch) == (TaskStatus.QUEUED, Dispatch.RQ)  # mode rq: the poller may be long gone
    assert broker.queued_task_ids("normal") == {task_id}


def test_outside_runs_the_relay_sends_stragglers_to_the_modes_system(redis, mode, database_tasks, media_image):
    from queues.services import tasks_relay_once

    [task_id] = database_tasks(1)
    tasks_relay_once()
    assert CaptionTask.objects.get(pk=task_id).dispatch == Dispatch.RQ  # mode rq
    assert broker.queued_task_ids("normal") == {task_id}
    mode(mode=Mode.LEGACY)
    [rq_task] = CaptionTask.objects.insert_new([(media_image(), "normal", None)],
                                               publish_after=timezone.now() + timedelta(hours=1))
    tasks_relay_once()
    assert CaptionTask.objects.get(pk=rq_task).dispatch == Dispatch.DATABASE


def test_a_rollback_killed_between_its_move_and_the_job_deletion_verifies_when_resumed(
        redis, mode, database_tasks, registered_worker, settings, tmp_path):
    """The state a kill (or a Redis error on the deletion) leaves in return_tasks: the tasks moved back to the
    poller and committed, their jobs still queued in Redis. The resumed phase finds no RQ task to move: it must go
    by the queues."""
    settings.MIGRATION_BACKUP_DIR = tmp_path
    ids = database_tasks(30)
    migration = run_execute(run=run_create(user=None, options=QUICK))
    assert migration.state == MigrationRun.State.SUCCEEDED, migration.failure_reason
    rollback = rollback_create(user=None, options={"rollback_timeout": 10})
    while not rollback.phases.filter(name="switch_to_legacy", state="done").exists():
        rollback = run_execute(run=rollback, one_phase=True)
    moved = dispatch.tasks_move(source=(Dispatch.RQ, Dispatch.FALLBACK), target=Dispatch.DATABASE, published=True)
    assert len(moved) == 30 and broker.queued_task_ids("normal") == set(ids)  # the process dies here

    rollback = run_execute(run=rollback)
    assert rollback.state == MigrationRun.State.SUCCEEDED, rollback.failure_reason
    assert sum(broker.queue_lengths().values()) == 0
    assert not any(redis.exists(f"rq:job:caption-{pk}") for pk in ids)
    assert rollback.phases.get(name="return_tasks").counts["queue_entries_removed"] == 30


def test_resume_republishes_an_interrupted_batch_whose_task_has_a_job_hash_from_its_earlier_life(
        redis, mode, database_tasks, registered_worker, settings, tmp_path):
    """A dead letter of the poller, requeued: its failed job hash is still in Redis. Then a batch holding it is
    moved and stamped, and the process is killed before its MULTI/EXEC. The hash is not a published job."""
    settings.MIGRATION_BACKUP_DIR = tmp_path
    ids = database_tasks(10)
    broker.job_dead_letter(ids[4], "normal", "CaptionError: an earlier attempt")  # the poller's dead letter
    assert redis.hget(f"rq:job:caption-{ids[4]}", "status") == b"failed"
    run = run_create(user=None, options=QUICK)
    run.phases.filter(order__lt=MigrationPhase.objects.get(run=run, name="migrate").order).update(state="done")
    run.phases.filter(name="migrate").update(state="running", attempts=1)
    from migration.verify import baseline_take

    baseline = baseline_take(at=timezone.now())
    stamp = timezone.now()
    CaptionTask.objects.filter(pk__in=ids).update(dispatch=Dispatch.RQ, published_at=stamp, publish_after=stamp)
    MigrationRun.objects.filter(pk=run.pk).update(state="running", baseline=baseline, checkpoint=ids[-1],
                                                  checkpoint_window={"ids": ids, "stamp": stamp.isoformat()})
    run = run_execute(run=MigrationRun.objects.get(pk=run.pk))
    assert run.state == MigrationRun.State.SUCCEEDED, run.failure_reason
    assert run.phases.get(name="migrate").counts["republished_after_interruption"] == 10
    assert broker.queued_task_ids("normal") == set(ids)


def test_the_migrate_phase_reports_its_walk_through_the_table_not_only_the_tasks_it_moved(
        redis, mode, database_tasks, registered_worker, settings, tmp_path):
    """Queued tasks clustered at the newest ids: the bar moves with the walk from the first batch on."""
    settings.MIGRATION_BACKUP_DIR = tmp_path
    finished = database_tasks(400)
    CaptionTask.objects.filter(pk__in=finished).update(status=TaskStatus.COMPLETED, finished_at=timezone.now())
    queued = database_tasks(10)
    seen: list[tuple[int, int]] = []
    run = run_execute(run=run_create(user=None, options={**QUICK, "batch_size": 100}),
                      on_progress=lambda phase: seen.append((phase.progress_done, phase.progress_total))
                      if phase.name == "migrate" else None)
    assert run.state == MigrationRun.State.SUCCEEDED, run.failure_reason
    assert run.phases.get(name="migrate").counts["migrated"] == len(queued)
    total = seen[-1][1]
    assert seen[-1] == (total, total) and total == 410
    assert [done for done, _ in seen[1:5]] == [100, 200, 300, 400], seen
