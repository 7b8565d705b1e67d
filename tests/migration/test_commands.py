"""migrate_to_rq and run_legacy_worker as an operator runs them: real manage.py processes with their exit codes and
progress bars, against the test's Redis and database; and what health and metrics say meanwhile."""

import re
import shutil
import subprocess
import sys

import pytest
from django.conf import settings
from django.core.cache import cache

from migration import dispatch, runs
from migration.models import MigrationRun, Mode
from monitoring.metrics.views import HEALTH_CACHE_KEY
from queues import broker
from queues.models import AuditEntry, CaptionTask, Dispatch, TaskStatus
from tests.conftest import subprocess_env
from tests.monitoring.test_metrics import samples, value

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def manage(tmp_path):
    def run(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "manage.py", *arguments], cwd=settings.BASE_DIR, text=True,
                              env=subprocess_env(MIGRATION_BACKUP_DIR=str(tmp_path / "backups")),
                              capture_output=True, timeout=180)

    return run


@pytest.fixture
def staff_client(client, admin_user):
    client.force_login(admin_user)
    return client


def _statuses(ids):
    return set(CaptionTask.objects.filter(pk__in=ids).values_list("dispatch", "status"))


def test_the_procedure_and_the_rollback_through_manage_py(redis, mode, database_tasks, manage, tmp_path):
    assert manage("migrate_to_rq", "mode", "legacy").returncode == 0
    ids = database_tasks(30)

    checks = manage("migrate_to_rq", "preflight")  # no RQ worker is alive yet
    assert checks.returncode == 1 and "FAILED rq_workers" in checks.stdout, checks.stdout + checks.stderr
    assert "1 check(s) failed" in checks.stderr and "Traceback" not in checks.stderr

    from queues.fleet.worker import CaptionWorker
    worker = CaptionWorker(broker.get_queues(), connection=broker.get_connection(), name="cli-test-worker")
    worker.register_birth()
    try:
        assert manage("migrate_to_rq", "preflight").returncode == 0

        started = manage("migrate_to_rq", "start", "--yes", "--validate-tasks", "0", "--drain-timeout", "5")
        assert started.returncode == 0, started.stdout + started.stderr
        assert "30/30" in started.stderr  # the migrate phase's progress bar, drawn on stderr
        assert _statuses(ids) == {(Dispatch.RQ, TaskStatus.QUEUED)}
        status = manage("migrate_to_rq", "status")
        assert re.search(r"Migrate queued tasks +done", status.stdout) and "Mode: rq;" in status.stdout, status.stdout

        assert manage("migrate_to_rq", "verify").returncode == 0
        redis.lrem("rq:queue:normal", 1, f"caption-{ids[0]}")
        verified = manage("migrate_to_rq", "verify")
        assert verified.returncode == 1 and "Verification failed" in verified.stderr, verified.stderr

        refused = manage("migrate_to_rq", "rollback")  # no terminal to confirm on
        assert refused.returncode == 1 and "--yes" in refused.stderr
        rolled_back = manage("migrate_to_rq", "rollback", "--yes", "--timeout", "10")
        assert rolled_back.returncode == 0, rolled_back.stdout + rolled_back.stderr
    finally:
        worker.register_death()
    assert _statuses(ids) == {(Dispatch.DATABASE, TaskStatus.QUEUED)}
    assert sum(broker.queue_lengths().values()) == 0
    assert manage("migrate_to_rq", "mode").stdout.startswith("legacy")
    assert list(MigrationRun.objects.order_by("pk").values_list("kind", "state")) == [
        (MigrationRun.Kind.MIGRATION, MigrationRun.State.ROLLED_BACK),
        (MigrationRun.Kind.ROLLBACK, MigrationRun.State.SUCCEEDED)]

    # The backup the run wrote brings back rows the database lost, and leaves the others alone.
    [backup] = [path for path in (tmp_path / "backups").iterdir() if path.is_dir()]
    CaptionTask.objects.filter(pk__in=ids[:5]).delete()
    restored = manage("migrate_to_rq", "restore", str(backup), "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert CaptionTask.objects.filter(pk__in=ids).count() == 30
    # Queued when the backup was taken, they come back queued for the system of the mode (legacy): the poller.
    assert _statuses(ids[:5]) == {(Dispatch.DATABASE, TaskStatus.QUEUED)}
    entry = AuditEntry.objects.get(action="migration_restore")
    assert entry.count == 5 and entry.detail["via"].startswith("manage.py migrate_to_rq restore")
    damaged = tmp_path / "damaged"
    shutil.copytree(backup, damaged)
    (damaged / "manifest.json").write_text("{")
    refused = manage("migrate_to_rq", "restore", str(damaged), "--yes")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr and refused.stderr.strip()


def test_the_poller_command_stops_after_max_tasks_or_when_nothing_is_left(redis, mode, database_tasks, manage):
    ids = database_tasks(5)
    first = manage("run_legacy_worker", "--max-tasks", "2", "--interval", "0.05", "--name", "poller.cli")
    assert first.returncode == 0, first.stdout + first.stderr
    assert CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.COMPLETED).count() == 2
    rest = manage("run_legacy_worker", "--burst", "--name", "poller.cli")
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert CaptionTask.objects.filter(pk__in=ids, status=TaskStatus.COMPLETED).count() == 5
    bad = manage("run_legacy_worker", "--max-tasks", "0")
    assert bad.returncode == 1 and "--max-tasks must be at least 1" in bad.stderr


def test_health_and_metrics_say_when_submission_is_paused_and_the_fallback_is_on(redis, mode, staff_client):
    dispatch.submission_pause(reason="database upgrade", user=None)
    health = staff_client.get("/api/rq/health").json()
    assert health["components"]["submission"] == "warning"
    assert "database upgrade" in health["component_details"]["submission"]["reason"]
    assert health["dispatch"]["paused_reason"] == "database upgrade"
    values = samples(staff_client)
    assert value(values, "rq_submission_paused") == 1 and value(values, "rq_fallback_active") == 0

    dispatch.submission_resume(user=None)
    mode(mode=Mode.RQ, fallback_active=True)  # as the relay leaves it once Redis was away past the timeout
    cache.delete(HEALTH_CACHE_KEY)  # the report is cached for a second
    health = staff_client.get("/api/rq/health").json()
    assert health["fallback_active"] and health["components"]["dispatch"] == "warning"
    values = samples(staff_client)
    assert value(values, "rq_submission_paused") == 0 and value(values, "rq_fallback_active") == 1


def test_the_live_workers_page_lists_the_database_pollers(redis, staff_client):
    import threading

    from django.urls import reverse

    from migration.legacy import LegacyPoller
    from tests.processes import wait_for

    poller = LegacyPoller(name="poller.page", interval=0.05)
    thread = threading.Thread(target=poller.work)
    thread.start()
    try:
        wait_for(lambda: dispatch.legacy_workers_alive().filter(name="poller.page").exists(), 10, "registered")
        page = staff_client.get(reverse("admin:queues_liveworker_changelist")).content.decode()
        assert "poller.page" in page
    finally:
        poller.stopping = True
        thread.join(10)
    assert "poller.page" not in staff_client.get(reverse("admin:queues_liveworker_changelist")).content.decode()


def test_health_says_when_the_mode_needs_pollers_this_installation_forbids(redis, mode, staff_client, settings):
    mode(mode=Mode.LEGACY)  # set before DATABASE_POLLING_ENABLED was turned off
    settings.DATABASE_POLLING_ENABLED = False
    cache.delete(HEALTH_CACHE_KEY)
    response = staff_client.get("/api/rq/health")
    dispatching = response.json()["component_details"]["dispatch"]
    assert response.status_code == 503 and dispatching["status"] == "unhealthy"
    assert "DATABASE_POLLING_ENABLED is false" in dispatching["reason"]



def test_a_restore_that_skips_rows_says_so_and_fails_and_resume_is_audited(redis, mode, media_image, manage,
                                                                           tmp_path):
    from django.utils import timezone

    from migration.backup import backup_write

    ids = CaptionTask.objects.insert_new([(media_image(), "normal", f"order-{index}") for index in range(3)],
                                         publish_after=timezone.now(), dispatch=[Dispatch.DATABASE] * 3)
    backup = backup_write(directory=tmp_path / "kept")["path"]
    CaptionTask.objects.filter(pk__in=ids[:2]).delete()
    CaptionTask.objects.insert_new([(media_image(), "normal", "order-0")], publish_after=timezone.now(),
                                   dispatch=[Dispatch.DATABASE])  # resubmitted since: its key is taken
    restored = manage("migrate_to_rq", "restore", str(backup), "--yes")
    assert restored.returncode == 1, restored.stdout + restored.stderr
    assert "1 task(s) restored" in restored.stdout
    assert "1 task(s) of the backup were not restored: their idempotency key belongs to another task" \
        in restored.stderr and "Traceback" not in restored.stderr
    assert CaptionTask.objects.filter(pk=ids[1]).exists() and not CaptionTask.objects.filter(pk=ids[0]).exists()
    assert AuditEntry.objects.get(action="migration_restore").detail["conflicting"] == 1

    refused = manage("migrate_to_rq", "resume")
    assert refused.returncode == 1 and "No run is open" in refused.stderr
    run = runs.run_create(user=None, options={"validate_tasks": 0})
    advanced = manage("migrate_to_rq", "advance")  # one phase: preflight (it fails: no RQ worker is alive)
    assert "Preflight checks" in advanced.stdout, advanced.stdout + advanced.stderr
    entry = AuditEntry.objects.get(action="migration_run_advance")
    assert entry.target == str(run) and entry.detail["via"].startswith("manage.py migrate_to_rq advance")
