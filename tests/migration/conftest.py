"""Fixtures of the migration tests: the dispatch mode row in a chosen state, database-dispatched tasks."""

import pytest
from django.utils import timezone

from migration.dispatch import system_mode
from migration.models import SystemMode
from queues.models import CaptionTask, Dispatch


@pytest.fixture
def mode(db):
    """Sets fields of the dispatch mode row: ``mode(mode="legacy", submission_paused=True, ...)``."""

    def set_fields(**fields) -> SystemMode:
        system_mode()
        SystemMode.objects.filter(pk=1).update(**fields)
        return SystemMode.objects.get(pk=1)

    return set_fields


@pytest.fixture
def database_tasks(db, media_image):
    """Inserts ``count`` queued tasks dispatched to the database poller; returns their ids."""

    def insert(count: int, *, priority: str = "normal") -> list[int]:
        reference = media_image()
        return CaptionTask.objects.insert_new([(reference, priority, None)] * count, publish_after=timezone.now(),
                                              dispatch=[Dispatch.DATABASE] * count)

    return insert
