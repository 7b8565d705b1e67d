"""What runs after a migrate rather than inside a data migration (queues.apps): the roles, and the pauses kept in
Redis before queues migration 0008 carried into the rows."""

import pytest
from django.contrib.auth.models import Group

from queues.apps import _after_migrate
from queues.fleet.services import CARRIED_KEY, REDIS_PAUSED_KEY, REDIS_SUSPENDED_KEY
from queues.models import QueueState

pytestmark = pytest.mark.django_db


def paused() -> set[str]:
    return set(QueueState.objects.filter(paused=True).values_list("queue", flat=True))


def test_a_migrate_carries_the_pauses_kept_in_redis_into_the_rows_once(redis):
    redis.sadd(REDIS_PAUSED_KEY, "high", "low", "not-a-queue")
    redis.set(REDIS_SUSPENDED_KEY, "1")
    _after_migrate(sender=None)  # a flush sends the signal without a plan: nothing carried
    assert paused() == set()
    _after_migrate(sender=None, plan=[])  # any migrate, even one with nothing to apply
    assert paused() == {"high", "low", QueueState.ALL} and redis.exists(CARRIED_KEY)
    QueueState.objects.filter(queue="high").update(paused=False)  # an operator resumed it since
    _after_migrate(sender=None, plan=[])
    assert paused() == {"low", QueueState.ALL}, "carried once: a later migrate does not pause it again"


def test_with_redis_unreachable_nothing_is_carried_yet_and_the_roles_are_still_synced(unreachable_redis):
    Group.objects.filter(name__in=["Support", "Operators", "Admins"]).delete()
    _after_migrate(sender=None, plan=[])
    assert paused() == set()
    assert Group.objects.filter(name__in=["Support", "Operators", "Admins"]).count() == 3
