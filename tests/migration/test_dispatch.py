"""Where new tasks go: the mode row, submission pauses, hybrid shares, the fallback, and audit."""

from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from migration import dispatch, state
from migration.models import MigrationEvent, Mode, SystemMode
from queues import broker
from queues.models import AuditEntry, CaptionTask, Dispatch, TaskStatus
from queues.services import TaskSpec, task_submit, tasks_relay_once, tasks_submit_many

pytestmark = pytest.mark.django_db


def test_mode_row_defaults_from_the_old_systems_variables(settings):
    settings.RQ_ENABLED, settings.RQ_HYBRID_MODE, settings.RQ_HYBRID_RQ_PERCENT = True, True, 30
    settings.RQ_FALLBACK_ENABLED, settings.RQ_FALLBACK_TIMEOUT = False, 45
    SystemMode.objects.all().delete()  # as before the first change of it
    row = state.system_mode()
    assert (row.mode, row.hybrid_rq_percent, row.fallback_enabled, row.fallback_timeout) == ("hybrid", 30, False, 45)
    assert not SystemMode.objects.exists()  # reading writes nothing
    dispatch.mode_set(mode=Mode.HYBRID, user=None)
    row = SystemMode.objects.get()
    assert (row.hybrid_rq_percent, row.fallback_enabled, row.fallback_timeout) == (30, False, 45)


def test_without_rq_the_mode_row_starts_in_legacy(settings):
    settings.RQ_ENABLED, settings.RQ_HYBRID_MODE = False, False
    SystemMode.objects.all().delete()
    assert state.system_mode().mode == Mode.LEGACY


def test_database_polling_disabled_refuses_every_way_to_the_poller_but_the_fallback(settings, mode, admin_user,
                                                                                      client):
    from django.core.management import CommandError, call_command
    from django.urls import reverse

    from migration.runs import RunError, rollback_create

    mode(mode=Mode.RQ)
    settings.DATABASE_POLLING_ENABLED = False
    for target in (Mode.LEGACY, Mode.HYBRID):
        with pytest.raises(ValidationError, match="DATABASE_POLLING_ENABLED is false") as error:
            dispatch.mode_set(mode=target, user=admin_user)
        assert list(error.value.message_dict) == ["mode"]
    with pytest.raises(CommandError, match="DATABASE_POLLING_ENABLED is false"):
        call_command("run_legacy_worker", "--burst")
    with pytest.raises(RunError, match="DATABASE_POLLING_ENABLED is false"):
        rollback_create(user=admin_user)
    client.force_login(admin_user)
    response = client.post(reverse("admin:migration_systemmode_change", args=[1]),
                           {"mode": "legacy", "hybrid_rq_percent": "50", "fallback_timeout": "30"})
    assert response.status_code == 200 and b"The legacy mode dispatches to the database poller" in response.content
    assert state.system_mode().mode == Mode.RQ
    assert not MigrationEvent.objects.exists() and not AuditEntry.objects.exists()
    # The supervisor's fallback poller is not refused (the fallback is RQ_FALLBACK_ENABLED's to allow): it gets as
    # far as checking its other arguments.
    with pytest.raises(CommandError, match="--max-tasks must be at least 1"):
        call_command("run_legacy_worker", "--fallback", "--max-tasks", "0")


def test_the_commands_changes_are_audited_as_the_command(mode, capsys):
    from django.core.management import call_command

    call_command("migrate_to_rq", "mode", "hybrid", "--rq-percent", "25")
    call_command("migrate_to_rq", "pause-submission", "--reason", "index rebuild", "--for", "30m")
    entries = list(AuditEntry.objects.order_by("pk").values_list("action", "user", "detail"))
    assert [(action, user) for action, user, _ in entries] == [("dispatch_mode", None), ("submission_pause", None)]
    assert all(detail["via"].startswith("manage.py migrate_to_rq ") and "(account " in detail["via"]
               for _, _, detail in entries)
    assert "until" in capsys.readouterr().out


def test_legacy_mode_sends_new_tasks_to_the_database_and_publishes_nothing(redis, mode, media_image,
                                                                           django_capture_on_commit_callbacks):
    mode(mode=Mode.LEGACY)
    with django_capture_on_commit_callbacks(execute=True):
        task = task_submit(image_ref=media_image())
        result = tasks_submit_many(specs=[TaskSpec(image_ref=media_image())] * 20)
    assert CaptionTask.objects.get(pk=task.pk).dispatch == Dispatch.DATABASE
    assert set(CaptionTask.objects.filter(pk__in=result.created).values_list("dispatch", flat=True)) == {"database"}
    assert sum(broker.queue_lengths().values()) == 0
    assert CaptionTask.objects.filter(published_at__isnull=False).count() == 0
    assert tasks_relay_once() == 0  # the relay publishes RQ tasks only


def test_hybrid_mode_gives_each_task_exactly_one_system_by_the_configured_share(redis, mode, media_image,
                                                                               django_capture_on_commit_callbacks):
    mode(mode=Mode.HYBRID, hybrid_rq_percent=25)
    with django_capture_on_commit_callbacks(execute=True):
        result = tasks_submit_many(specs=[TaskSpec(image_ref=media_image())] * 2000)
    systems = dict(CaptionTask.objects.filter(pk__in=result.created).values_list("pk", "dispatch"))
    to_rq = [pk for pk, system in systems.items() if system == Dispatch.RQ]
    assert 350 <= len(to_rq) <= 650  # 25 % of 2000, well inside chance
    assert set(systems.values()) == {Dispatch.RQ, Dispatch.DATABASE}
    assert broker.queued_task_ids("normal") == set(to_rq)  # only the RQ share has jobs


def test_a_paused_submission_is_committed_and_held_then_released_on_resume(redis, mode, media_image, admin_user,
                                                                           django_capture_on_commit_callbacks):
    dispatch.submission_pause(reason="database upgrade", user=admin_user)
    with django_capture_on_commit_callbacks(execute=True):
        task = task_submit(image_ref=media_image())
        result = tasks_submit_many(specs=[TaskSpec(image_ref=media_image())] * 10)
    held = CaptionTask.objects.filter(pk__in=[task.pk, *result.created])
    assert set(held.values_list("dispatch", "status")) == {(Dispatch.HELD, TaskStatus.QUEUED)}
    assert sum(broker.queue_lengths().values()) == 0
    assert tasks_relay_once() == 0
    status = dispatch.ModePolicy().status()
    assert status.submission_paused and status.paused_reason == "database upgrade"

    released = dispatch.submission_resume(user=admin_user)
    assert released == 11
    assert broker.queued_task_ids("normal") == {task.pk, *result.created}
    assert list(MigrationEvent.objects.values_list("kind", flat=True)) == ["submission_resumed", "submission_paused"]
    assert list(AuditEntry.objects.values_list("action", flat=True)) == ["submission_resume", "submission_pause"]


def test_a_pause_with_an_end_time_is_lifted_by_the_relay(redis, mode, media_image,
                                                        django_capture_on_commit_callbacks):
    dispatch.submission_pause(reason="maintenance", user=None, duration=timedelta(hours=2))
    with django_capture_on_commit_callbacks(execute=True):
        task = task_submit(image_ref=media_image())
    assert CaptionTask.objects.get(pk=task.pk).dispatch == Dispatch.HELD
    SystemMode.objects.filter(pk=1).update(paused_until=timezone.now() - timedelta(seconds=1))
    tasks_relay_once()
    assert not SystemMode.objects.get(pk=1).submission_paused
    assert CaptionTask.objects.get(pk=task.pk).dispatch == Dispatch.RQ
    assert broker.queued_task_ids("normal") == {task.pk}


def test_pause_and_mode_refuse_bad_input_naming_the_field(mode):
    with pytest.raises(ValidationError) as error:
        dispatch.submission_pause(reason="  ", user=None)
    assert "reason" in error.value.message_dict
    with pytest.raises(ValidationError) as error:
        dispatch.mode_set(mode="both", user=None)
    assert "mode" in error.value.message_dict
    with pytest.raises(ValidationError) as error:
        dispatch.mode_set(mode="hybrid", user=None, hybrid_rq_percent=140)
    assert "hybrid_rq_percent" in error.value.message_dict
    for text in ("soon", "0h", "99999999d", "366d"):
        with pytest.raises(ValueError, match="positive duration|longer than a year"):
            dispatch.duration_parse(text)
    assert dispatch.duration_parse("365d") == timedelta(days=365)
    row = state.system_mode()
    assert not row.submission_paused and row.mode == Mode.RQ


def test_mode_change_is_an_event_and_an_audit_entry(mode, admin_user):
    dispatch.mode_set(mode=Mode.HYBRID, user=admin_user, hybrid_rq_percent=10)
    event = MigrationEvent.objects.get()
    assert (event.kind, event.figures["from"], event.figures["to"], event.user) == ("mode_changed", "rq", "hybrid",
                                                                                   admin_user)
    assert AuditEntry.objects.get().action == "dispatch_mode"


def test_fallback_starts_after_the_timeout_and_ends_when_redis_answers(redis, mode, media_image,
                                                                       django_capture_on_commit_callbacks):
    mode(fallback_timeout=1)
    unpublished = CaptionTask.objects.insert_new([(media_image(), "normal", None)] * 5, publish_after=timezone.now())
    dispatch.fallback_maintain(redis_up=False)
    row = SystemMode.objects.get(pk=1)
    assert row.redis_down_since is not None and not row.fallback_active  # not yet: the timeout counts from now
    SystemMode.objects.filter(pk=1).update(redis_down_since=timezone.now() - timedelta(seconds=2))
    dispatch.fallback_maintain(redis_up=False)
    assert SystemMode.objects.get(pk=1).fallback_active
    assert set(CaptionTask.objects.filter(pk__in=unpublished).values_list("dispatch", flat=True)) == {"fallback"}
    assert dispatch.ModePolicy().assign(2) == [Dispatch.FALLBACK, Dispatch.FALLBACK]
    assert dispatch.ModePolicy().processes(running=set())  # a supervisor would start a poller

    dispatch.fallback_maintain(redis_up=True)
    row = SystemMode.objects.get(pk=1)
    assert not row.fallback_active and row.redis_down_since is None
    assert set(CaptionTask.objects.filter(pk__in=unpublished).values_list("dispatch", flat=True)) == {"rq"}
    assert broker.queued_task_ids("normal") == set(unpublished)
    assert dispatch.ModePolicy().processes(running={"poller.x"}) == {}  # its supervisor stops it
    assert list(MigrationEvent.objects.values_list("kind", flat=True)) == ["fallback_ended", "fallback_started"]


def test_a_fallback_retry_in_its_backoff_goes_back_to_rq_unpublished_until_due(redis, mode, media_image):
    later = timezone.now() + timedelta(minutes=5)
    mode(fallback_active=True, redis_down_since=timezone.now() - timedelta(minutes=1))
    [due, waiting] = CaptionTask.objects.insert_new([(media_image(), "normal", None)] * 2,
                                                    publish_after=timezone.now(),
                                                    dispatch=[Dispatch.FALLBACK] * 2)
    CaptionTask.objects.filter(pk=waiting).update(publish_after=later, attempts=1)  # a retry the poller scheduled

    dispatch.fallback_maintain(redis_up=True)
    assert broker.queued_task_ids("normal") == {due}
    task = CaptionTask.objects.get(pk=waiting)
    assert (task.dispatch, task.published_at, task.publish_after) == (Dispatch.RQ, None, later)


def test_fallback_disabled_leaves_tasks_with_rq(redis, mode, media_image):
    mode(fallback_enabled=False, fallback_timeout=1, redis_down_since=timezone.now() - timedelta(minutes=5))
    task_ids = CaptionTask.objects.insert_new([(media_image(), "normal", None)], publish_after=timezone.now())
    dispatch.fallback_maintain(redis_up=False)
    assert not SystemMode.objects.get(pk=1).fallback_active
    assert CaptionTask.objects.get(pk=task_ids[0]).dispatch == Dispatch.RQ


@pytest.mark.django_db(transaction=True)
def test_an_rq_worker_never_runs_a_task_dispatched_to_the_database(redis, mode, database_tasks, worker_run):
    [task_id] = database_tasks(1)
    broker.publish([(task_id, "normal")])  # a stale job left in Redis for it
    CaptionTask.objects.filter(pk=task_id).update(published_at=timezone.now())
    worker_run()
    task = CaptionTask.objects.get(pk=task_id)
    assert (task.status, task.attempts) == (TaskStatus.QUEUED, 0)
