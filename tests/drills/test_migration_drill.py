"""Drills of the migration: the migrating process SIGKILLed half way through 100,000 tasks, hybrid mode under load
with both systems running and a migration cutting over in the middle, and Redis stopped during a submission with the
fallback on. Real processes, real Redis, the real database (SQLite here, MariaDB in CI, where SKIP LOCKED is real)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
from django.conf import settings
from django.db import connection
from django.db.models import Count
from django.utils import timezone

from migration.models import LegacyWorker, MigrationEvent, MigrationRun, Mode
from queues import broker
from queues.fleet.worker import CaptionWorker
from queues.models import CaptionTask, Dispatch, TaskEvent, TaskStatus
from queues.services import TaskSpec, tasks_submit_many
from tests.conftest import subprocess_env
from tests.processes import Supervisors, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _completions() -> dict[int, int]:
    return dict(TaskEvent.objects.filter(kind="completed").values("task_id").annotate(n=Count("id"))
                .values_list("task_id", "n"))


def _insert_database_tasks(reference: str, count: int) -> None:
    now = timezone.now()
    for start in range(0, count, 10_000):
        size = min(10_000, count - start)
        if connection.vendor == "mysql":  # insert_new goes row by row there (no INSERT ... RETURNING)
            CaptionTask.objects.bulk_create([CaptionTask(image_ref=reference, priority="normal", publish_after=now,
                                                         dispatch=Dispatch.DATABASE) for _ in range(size)],
                                            batch_size=2000)
        else:
            CaptionTask.objects.insert_new([(reference, "normal", None)] * size, publish_after=now,
                                           dispatch=[Dispatch.DATABASE] * size)


def _command(*arguments, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "manage.py", *arguments], cwd=settings.BASE_DIR, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_a_migration_killed_half_way_through_100000_tasks_resumes_with_nothing_lost_or_doubled(
        redis, media_image, settings, tmp_path):
    settings.MIGRATION_RUN_LEASE_SECONDS = 3
    env = subprocess_env(MIGRATION_BACKUP_DIR=str(tmp_path), MIGRATION_RUN_LEASE_SECONDS="3")
    total = 100_000
    began = time.monotonic()
    _insert_database_tasks(media_image(), total)
    print(f"insert {time.monotonic() - began:.1f} s")
    first, last = CaptionTask.objects.order_by("pk").values_list("pk", flat=True)[:1][0], \
        CaptionTask.objects.order_by("-pk").values_list("pk", flat=True)[:1][0]
    idle = CaptionWorker(broker.get_queues(), connection=broker.get_connection(), name="drill-idle-worker")
    idle.register_birth()  # alive for the preflight, takes nothing: the jobs stay in Redis to be counted
    try:
        process = _command("migrate_to_rq", "start", "--yes", "--validate-tasks", "0", "--no-progress", env=env)
        half = first + total // 2
        try:
            wait_for(lambda: (MigrationRun.objects.values_list("checkpoint", flat=True).first() or 0) >= half, 240,
                     "the migration passed half way", interval=0.02)
            process.send_signal(signal.SIGKILL)
            process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
        run = MigrationRun.objects.get()
        killed_at = run.checkpoint
        assert run.state == "running" and first + total // 2 <= killed_at < last, killed_at  # killed mid-way
        assert run.phases.get(name="migrate").state == "running"

        too_soon = _command("migrate_to_rq", "resume", "--no-progress", env=env)
        refusal = too_soon.communicate(timeout=60)[0].decode()
        assert too_soon.returncode == 1 and "is being executed by" in refusal  # its lease has not expired yet
        time.sleep(settings.MIGRATION_RUN_LEASE_SECONDS + 0.5)
        started = time.monotonic()
        resumed = _command("migrate_to_rq", "resume", "--no-progress", env=env)
        output = resumed.communicate(timeout=300)[0].decode()
        print(f"resumed run took {time.monotonic() - started:.1f} s")
        assert resumed.returncode == 0, output
    finally:
        idle.register_death()
    run.refresh_from_db()
    print({phase.name: round(phase.duration_seconds or 0, 2) for phase in run.phases.all()})
    assert run.state == "succeeded", run.failure_reason
    migrate = run.phases.get(name="migrate")
    assert migrate.attempts == 2
    verification = run.verification
    assert verification["ok"], verification["problems"]
    jobs = verification["jobs"]
    assert (jobs["waiting_tasks"], jobs["queue_entries"], jobs["distinct_entries"]) == (total, total, total)
    assert (jobs["missing_jobs"], jobs["duplicate_jobs"], jobs["jobs_without_task"]) == (0, 0, 0)
    assert all(group["ok"] for group in verification["tally"]["groups"])
    assert broker.queued_task_ids("normal") == set(range(first, last + 1))
    assert not CaptionTask.objects.filter(status=TaskStatus.QUEUED, dispatch=Dispatch.DATABASE).exists()
    check = _command("migrate_to_rq", "verify", env=env)
    assert check.wait(120) == 0, check.stdout.read().decode()


def test_hybrid_under_load_with_both_systems_then_a_migration_runs_every_task_once(redis, media_image, settings,
                                                                                   tmp_path, pool, mode):
    from migration.runs import run_create, run_execute

    mode(mode=Mode.HYBRID, hybrid_rq_percent=50)
    pool.desired = 2
    pool.save()
    env = subprocess_env(MIGRATION_BACKUP_DIR=str(tmp_path), RQ_RETRY_BACKOFF="0.2", LEGACY_POLL_INTERVAL="0.05")
    supervisors = Supervisors(LEGACY_POLL_INTERVAL="0.05")
    supervisors.start()
    pollers = [_command("run_legacy_worker", "--name", f"poller.drill.{index}", env=env) for index in range(2)]
    reference = media_image()
    submitted: list[int] = []
    try:
        wait_for(lambda: len([w for w in broker.workers()]) >= 2, 60, "two RQ workers")
        for _ in range(6):
            submitted += tasks_submit_many(specs=[TaskSpec(reference) for _ in range(500)]).created
            time.sleep(0.3)
        systems = dict(CaptionTask.objects.filter(pk__in=submitted).values_list("dispatch")
                       .annotate(n=Count("id")).values_list("dispatch", "n"))
        assert systems.get("rq", 0) > 1000 and systems.get("database", 0) > 1000, systems
        # The migration while both systems still have queued work: the drain stops the pollers, the rest moves.
        settings.MIGRATION_BACKUP_DIR = tmp_path
        run = run_execute(run=run_create(user=None, options={"validate_tasks": 3, "drain_timeout": 60}))
        assert run.state == "succeeded", run.failure_reason
        for poller in pollers:
            assert poller.wait(60) == 0  # asked to stop by the drain, after its task in hand
        wait_for(lambda: CaptionTask.objects.filter(pk__in=submitted, status=TaskStatus.COMPLETED).count()
                 == len(submitted), 240, "every submitted task completed")
    finally:
        for poller in pollers:
            if poller.poll() is None:
                poller.kill()
        supervisors.stop_all()
    completions = _completions()
    assert {completions.get(pk) for pk in submitted} == {1}  # every task once, none twice
    by_system = TaskEvent.objects.filter(task_id__in=submitted, kind="completed")
    assert by_system.filter(worker_name__startswith="poller.drill.").exists()
    assert by_system.exclude(worker_name__startswith="poller.").exists()
    # No task was attempted by both systems.
    polled = set(TaskEvent.objects.filter(task_id__in=submitted, worker_name__startswith="poller.")
                 .values_list("task_id", flat=True))
    rq_run = set(TaskEvent.objects.filter(task_id__in=submitted).exclude(worker_name__startswith="poller.")
                 .values_list("task_id", flat=True))
    assert not polled & rq_run
    assert run.verification["ok"], run.verification["problems"]


def test_redis_stopped_for_20_s_during_a_submission_with_the_fallback_on_runs_every_task_once(
        redis_server_factory, media_image, pool, mode):
    server = redis_server_factory("fallback")
    mode(fallback_enabled=True, fallback_timeout=2)
    pool.desired = 2
    pool.save()
    supervisors = Supervisors(LEGACY_POLL_INTERVAL="0.05", RELAY_INTERVAL="0.2")
    supervisors.start()
    reference = media_image()
    submitted: list[int] = []
    errors: list[BaseException] = []

    def submit():
        try:
            for _ in range(20):
                submitted.extend(tasks_submit_many(specs=[TaskSpec(reference) for _ in range(500)]).created)
                time.sleep(0.2)
        except BaseException as error:  # reported by the test below
            errors.append(error)

    try:
        wait_for(lambda: len(broker.workers()) >= 2, 60, "two RQ workers")
        submitter = threading.Thread(target=submit)
        submitter.start()
        wait_for(lambda: len(submitted) >= 1500, 60, "the submission under way")
        server.stop()
        stopped_at = time.monotonic()
        wait_for(lambda: MigrationEvent.objects.filter(kind="fallback_started").exists(), 20, "the fallback began")
        wait_for(lambda: LegacyWorker.objects.filter(fallback=True, stopped_at__isnull=True).exists(), 20,
                 "a supervisor started a database poller")
        time.sleep(max(0.0, 20 - (time.monotonic() - stopped_at)))
        server.start()
        submitter.join(120)
        assert not errors, errors
        assert len(submitted) == 10_000
        wait_for(lambda: MigrationEvent.objects.filter(kind="fallback_ended").exists(), 30, "the fallback ended")
        wait_for(lambda: CaptionTask.objects.filter(pk__in=submitted, status=TaskStatus.COMPLETED).count()
                 == 10_000, 300, "every task completed", interval=0.5)
        wait_for(lambda: not LegacyWorker.objects.filter(fallback=True, stopped_at__isnull=True).exists(), 60,
                 "the fallback poller stopped")
    finally:
        supervisors.stop_all()
    completions = _completions()
    assert {completions.get(pk) for pk in submitted} == {1}
    polled = TaskEvent.objects.filter(task_id__in=submitted, kind="completed", worker_name__startswith="poller.")
    assert polled.exists()  # the poller worked during the outage
    assert TaskEvent.objects.filter(task_id__in=submitted, kind="completed").exclude(
        worker_name__startswith="poller.").exists()  # and RQ after it
