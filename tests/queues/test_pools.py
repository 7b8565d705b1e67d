"""Pools: scaling rules, the autoscaler's policy with injectable time, and ``manage.py workers``."""

import importlib
from datetime import timedelta

import pytest
from django.apps import apps
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from queues import control
from queues.fleet.services import pool_autoscale, pool_backlog, pool_scale
from queues.models import AuditEntry, FleetEvent, WorkerPool
from queues.services import TaskSpec, tasks_submit_many

pytestmark = pytest.mark.django_db


@pytest.fixture
def pool():
    """The default pool as the first migrate writes it: written again where a transactional test that ran before on
    this worker emptied the table (the order of tests differs with work stealing)."""
    if not WorkerPool.objects.filter(name="default").exists():
        importlib.import_module("queues.migrations.0003_default_pool").create_default_pool(apps, None)
    return WorkerPool.objects.get(name="default")


def test_default_pool_exists_after_migrate(pool):
    assert (pool.queue_names, pool.desired, pool.minimum, pool.maximum) == (
        ["urgent", "high", "normal", "low"], 2, 2, 10)
    assert (pool.scale_up_threshold, pool.scale_down_threshold, pool.scale_up_cooldown,
            pool.scale_down_cooldown) == (100, 20, 300, 600)


def test_scale_is_validated_against_min_and_max(pool, admin_user):
    with pytest.raises(ValidationError) as raised:
        pool_scale(pool=pool, desired=11, user=admin_user)
    assert "between 2 and 10" in raised.value.message_dict["desired"][0]
    assert WorkerPool.objects.get(pk=pool.pk).desired == 2 and not AuditEntry.objects.exists()
    pool_scale(pool=pool, desired=5, user=admin_user, address="10.0.0.9")
    event = FleetEvent.objects.get(kind=FleetEvent.Kind.POOL_SCALED)
    assert (event.figures, event.user) == ({"from": 2, "to": 5}, admin_user)
    entry = AuditEntry.objects.get()
    assert (entry.user, entry.action, entry.target, entry.count, entry.address) == (
        admin_user, "pool_scale", "default", 5, "10.0.0.9")


def test_autoscaler_steps_up_and_down_with_cooldowns_and_bounds(pool):
    pool.autoscale, pool.minimum, pool.maximum, pool.desired = True, 2, 4, 2
    pool.scale_up_cooldown, pool.scale_down_cooldown = 300, 600
    pool.save()
    start = timezone.now()

    decision = pool_autoscale(pool=pool, queued=150, now=start)
    assert (decision.previous, decision.desired) == (2, 3)
    assert pool_autoscale(pool=pool, queued=500, now=start + timedelta(seconds=299)) is None  # cooldown
    assert pool_autoscale(pool=pool, queued=500, now=start + timedelta(seconds=300)).desired == 4
    assert pool_autoscale(pool=pool, queued=5000, now=start + timedelta(seconds=900)) is None  # at maximum
    assert pool_autoscale(pool=pool, queued=50, now=start + timedelta(seconds=2000)) is None  # between thresholds
    assert pool_autoscale(pool=pool, queued=5, now=start + timedelta(seconds=300 + 599)) is None  # down cooldown
    assert pool_autoscale(pool=pool, queued=5, now=start + timedelta(seconds=300 + 600)).desired == 3
    assert pool_autoscale(pool=pool, queued=5, now=start + timedelta(seconds=300 + 1200)).desired == 2
    assert pool_autoscale(pool=pool, queued=0, now=start + timedelta(days=1)) is None  # at minimum
    assert WorkerPool.objects.get(pk=pool.pk).desired == 2

    decisions = list(FleetEvent.objects.filter(kind=FleetEvent.Kind.AUTOSCALE).order_by("at"))
    assert [(event.figures["from"], event.figures["to"], event.figures["queued"]) for event in decisions] == [
        (2, 3, 150), (3, 4, 500), (4, 3, 5), (3, 2, 5)]
    assert decisions[0].reason == "150 jobs waiting > 100"


def test_autoscaler_steps_by_one_process_of_caption_slots(pool):
    pool.autoscale, pool.slots, pool.minimum, pool.maximum, pool.desired = True, 4, 4, 10, 4
    pool.scale_up_cooldown = pool.scale_down_cooldown = 0
    pool.save()
    start = timezone.now()
    assert [pool_autoscale(pool=pool, queued=500, now=start + timedelta(seconds=step)).desired
            for step in (1, 2)] == [8, 10]  # the last step stops at the maximum
    assert pool_autoscale(pool=pool, queued=500, now=start + timedelta(seconds=3)) is None
    assert [pool_autoscale(pool=pool, queued=0, now=start + timedelta(seconds=step)).desired
            for step in (4, 5)] == [6, 4]
    assert pool_autoscale(pool=pool, queued=0, now=start + timedelta(seconds=6)) is None  # at the minimum


def test_autoscaler_is_off_unless_enabled(pool):
    assert pool_autoscale(pool=pool, queued=10_000) is None


def test_backlog_counts_the_pool_queues(pool, redis, media_image, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        tasks_submit_many(specs=[TaskSpec(media_image(), priority="low") for _ in range(7)])
    assert pool_backlog(pool) == 7
    pool.queues = "urgent high"
    assert pool_backlog(pool) == 0


def test_workers_command(pool, redis, capsys):
    call_command("workers", "status")
    assert "Pool default: 0 running, desired 2 (min 2, max 10, autoscale off)" in capsys.readouterr().out
    call_command("workers", "scale", "default", "4")
    assert WorkerPool.objects.get(pk=pool.pk).desired == 4
    call_command("workers", "suspend")
    assert control.processing_suspended()
    call_command("workers", "status")
    assert "Processing: SUSPENDED" in capsys.readouterr().out
    call_command("workers", "resume")
    assert not control.processing_suspended()
    call_command("workers", "restart")
    assert "Asked 0 worker(s) to restart" in capsys.readouterr().out
    kinds = set(FleetEvent.objects.values_list("kind", flat=True))
    assert {FleetEvent.Kind.SUSPENDED, FleetEvent.Kind.RESUMED, FleetEvent.Kind.POOL_SCALED} <= kinds


@pytest.mark.parametrize("arguments, message", [
    (["scale", "nope", "3"], "Unknown pool 'nope'"),
    (["scale", "default", "11"], "between 2 and 10"),
    (["scale", "default", "-1"], "cannot be negative"),
    (["restart", "nope"], "Unknown pool 'nope'"),
])
def test_workers_command_errors(pool, redis, arguments, message):
    with pytest.raises(CommandError, match=message):
        call_command("workers", *arguments)


def test_workers_command_without_redis(pool, unreachable_redis):
    with pytest.raises(CommandError, match="Redis is unreachable"):
        call_command("workers", "status")


def test_workers_command_exits_non_zero_on_error(pool, redis):
    import subprocess
    import sys

    from django.conf import settings

    from tests.conftest import subprocess_env

    result = subprocess.run([sys.executable, "manage.py", "workers", "scale", "nope", "2"], cwd=settings.BASE_DIR,
                            env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Unknown pool 'nope'" in result.stderr and "Traceback" not in result.stderr


def test_roles_exist_with_their_permissions():
    from django.contrib.auth.models import Group, Permission

    operators = set(Group.objects.get(name="Operators").permissions.values_list("codename", flat=True))
    support = set(Group.objects.get(name="Support").permissions.values_list("codename", flat=True))
    admins = Group.objects.get(name="Admins").permissions.count()
    assert {"requeue_task", "cancel_task", "change_task_priority", "pause_queue", "manage_fleet"} <= operators
    assert "empty_queue" not in operators and "view_captiontask" in operators
    assert support and all(codename.startswith("view_") for codename in support)
    assert "view_liveworker" in support and "view_auditentry" not in support
    assert admins == Permission.objects.count()
