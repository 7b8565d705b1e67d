"""What runs after a migrate rather than inside a data migration (queues.apps): the roles, and the pauses kept in
Redis before queues migration 0008 carried into the rows."""

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.db.migrations.loader import MigrationLoader

from queues.apps import PAUSES_INTO_ROWS, _after_migrate
from queues.fleet.services import REDIS_PAUSED_KEY, REDIS_SUSPENDED_KEY
from queues.models import QueueState

pytestmark = pytest.mark.django_db


def paused() -> set[str]:
    return set(QueueState.objects.filter(paused=True).values_list("queue", flat=True))


def test_the_migrate_that_applies_0008_carries_the_pauses_kept_in_redis_into_the_rows(redis):
    redis.sadd(REDIS_PAUSED_KEY, "high", "low", "not-a-queue")
    redis.set(REDIS_SUSPENDED_KEY, "1")
    migration = MigrationLoader(connection).get_migration(*PAUSES_INTO_ROWS)
    _after_migrate(sender=None, plan=[(migration, True)])  # unapplied: nothing carried
    _after_migrate(sender=None, plan=[])  # a later migrate: nothing carried
    assert paused() == set()
    _after_migrate(sender=None, plan=[(migration, False)])
    assert paused() == {"high", "low", QueueState.ALL}


def test_with_redis_unreachable_the_carry_over_writes_nothing_and_the_roles_are_still_synced(unreachable_redis):
    Group.objects.filter(name__in=["Support", "Operators", "Admins"]).delete()
    migration = MigrationLoader(connection).get_migration(*PAUSES_INTO_ROWS)
    _after_migrate(sender=None, plan=[(migration, False)])
    assert paused() == set()
    assert Group.objects.filter(name__in=["Support", "Operators", "Admins"]).count() == 3
