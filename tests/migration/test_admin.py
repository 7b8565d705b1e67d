"""The migration console in the admin: who may read and act, confirmations, and a run started from the admin."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from migration import dispatch, state
from migration.models import MigrationRun, Mode
from migration.runs import run_create
from queues.models import AuditEntry
from tests.conftest import subprocess_env
from tests.processes import wait_for


@pytest.fixture
def login(client):
    def as_user(user):
        client.force_login(user)
        return client

    return as_user


@pytest.mark.django_db
def test_support_reads_runs_and_mode_but_cannot_act(login, support_user, mode):
    run = run_create(user=None, options={"validate_tasks": 0})
    client = login(support_user)
    assert client.get(reverse("admin:migration_migrationrun_changelist")).status_code == 200
    page = client.get(reverse("admin:migration_migrationrun_change", args=[run.pk]))
    assert page.status_code == 200 and b"Preflight checks" in page.content and b"Advance one phase" not in page.content
    assert client.get(reverse("admin:migration_systemmode_change", args=[1])).status_code == 200
    for name, args in (("admin:migration_start", []), ("admin:migration_rollback", []),
                       ("admin:migration_act", [run.pk, "resume"]), ("admin:migration_pause", [])):
        assert client.post(reverse(name, args=args)).status_code == 403
    assert client.post(reverse("admin:migration_systemmode_change", args=[1]), {"mode": "legacy"}).status_code == 403
    assert state.system_mode().mode == Mode.RQ


@pytest.mark.django_db
def test_operators_pause_with_a_reason_and_resume(login, operator_user, mode):
    client = login(operator_user)
    assert b"Pause submission" in client.get(reverse("admin:migration_pause")).content  # the confirmation
    response = client.post(reverse("admin:migration_pause"), {"reason": ""})
    assert response.status_code == 400 and b"Say why" in response.content
    assert not state.system_mode().submission_paused
    client.post(reverse("admin:migration_pause"), {"reason": "disk swap"})
    assert state.system_mode().paused_reason == "disk swap"
    client.post(reverse("admin:migration_resume"))
    assert not state.system_mode().submission_paused
    assert list(AuditEntry.objects.values_list("action", flat=True)) == ["submission_resume", "submission_pause"]
    assert client.post(reverse("admin:migration_start")).status_code == 403  # runs are for Admins


@pytest.mark.django_db
def test_a_pause_from_the_admin_may_last_a_set_time(login, operator_user, mode):
    client = login(operator_user)
    assert b'name="duration"' in client.get(reverse("admin:migration_pause")).content
    response = client.post(reverse("admin:migration_pause"), {"reason": "disk swap", "duration": "soon"})
    assert response.status_code == 400 and b"For: &#x27;soon&#x27; is not a positive duration" in response.content
    assert not state.system_mode().submission_paused
    before = timezone.now()
    client.post(reverse("admin:migration_pause"), {"reason": "disk swap", "duration": "2h"})
    row = state.system_mode()
    assert row.submission_paused and timedelta(hours=2) <= row.paused_until - before < timedelta(hours=2, minutes=1)
    assert AuditEntry.objects.get().detail["until"] == row.paused_until.isoformat()


@pytest.mark.django_db
def test_admins_change_the_mode_through_the_service(login, admin_user, mode):
    client = login(admin_user)
    response = client.post(reverse("admin:migration_systemmode_change", args=[1]),
                           {"mode": "hybrid", "hybrid_rq_percent": "20", "fallback_enabled": "on",
                            "fallback_timeout": "30"})
    assert response.status_code == 302
    row = state.system_mode()
    assert (row.mode, row.hybrid_rq_percent) == ("hybrid", 20)
    assert AuditEntry.objects.filter(action="dispatch_mode", user=admin_user).exists()


@pytest.mark.django_db(transaction=True)
def test_a_run_started_from_the_admin_executes_in_its_own_process(login, admin_user, mode, database_tasks,
                                                                   rq_worker_process, monkeypatch, settings,
                                                                   tmp_path):
    settings.MIGRATION_BACKUP_DIR = tmp_path
    for name, value in subprocess_env(MIGRATION_BACKUP_DIR=str(tmp_path)).items():
        monkeypatch.setenv(name, value)
    ids = database_tasks(50)
    client = login(admin_user)
    assert b"Start the migration" in client.get(reverse("admin:migration_start")).content
    response = client.post(reverse("admin:migration_start"), {"soak_seconds": "0"})
    run = MigrationRun.objects.get()
    assert response.status_code == 302 and response.url == reverse("admin:migration_migrationrun_change",
                                                                   args=[run.pk])
    wait_for(lambda: MigrationRun.objects.get(pk=run.pk).state in ("succeeded", "failed"), 120, "the run ended")
    run.refresh_from_db()
    assert run.state == "succeeded", run.failure_reason
    assert run.phases.get(name="migrate").counts["migrated"] == len(ids)
    assert run.phases.get(name="cutover").actor == admin_user
    page = client.get(reverse("admin:migration_migrationrun_change", args=[run.pk]))
    assert b"everything matches" in page.content
    assert client.post(reverse("admin:migration_act", args=[run.pk, "resume"])).status_code == 400  # finished


@pytest.mark.django_db
def test_every_admin_page_says_when_submission_is_paused(login, support_user, mode):
    client = login(support_user)
    assert b"dispatch-status" not in client.get(reverse("admin:index")).content
    dispatch.submission_pause(reason="database upgrade", user=None)
    page = client.get(reverse("admin:index")).content.decode()
    assert 'id="dispatch-status"' in page and "Submission is paused: database upgrade" in page


@pytest.mark.django_db
def test_a_run_whose_process_is_gone_is_not_shown_live_and_offers_resume(login, admin_user, mode, settings):
    """A run's process SIGKILLed (or its host lost) leaves the run RUNNING: its page must say so once the lease has
    run out, stop refreshing, and offer Resume; a run whose process beats is shown live with its heartbeat's age."""
    settings.MIGRATION_RUN_LEASE_SECONDS = 30
    run = run_create(user=None, options={"validate_tasks": 0})
    client = login(admin_user)
    page = reverse("admin:migration_migrationrun_change", args=[run.pk])
    resume = reverse("admin:migration_act", args=[run.pk, "resume"]).encode()

    MigrationRun.objects.filter(pk=run.pk).update(state="running", executor="lost-host:4242:abcdef",
                                                  heartbeat_at=timezone.now() - timedelta(seconds=95))
    gone = client.get(page).content
    assert b'http-equiv="refresh"' not in gone
    assert b"has not been heard from for 95 s" in gone or b"has not been heard from for 96 s" in gone
    assert resume in gone

    MigrationRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now())
    live = client.get(page).content
    assert b'http-equiv="refresh"' in live and b"executed by lost-host:4242:abcdef (heartbeat 0 s ago)" in live
    assert resume not in live
