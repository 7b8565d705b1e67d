"""Fixtures of the drills: the ``default`` pool at one worker (tests scale it as they need)."""

import pytest

from queues.models import WorkerPool


@pytest.fixture
def pool(db):
    pool, _ = WorkerPool.objects.update_or_create(
        name="default", defaults={"queues": "urgent high normal low", "desired": 1, "minimum": 1, "maximum": 6})
    return pool
