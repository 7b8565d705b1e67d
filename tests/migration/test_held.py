"""Held tasks never outlive their pause: whatever runs (relay or poller) releases them once submission is open, a
restore does not bring them back held, and verify counts any it finds."""

import threading
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from migration import dispatch, state
from migration.backup import backup_restore, backup_write
from migration.legacy import LegacyPoller
from migration.models import SystemMode
from migration.verify import verification
from queues import broker
from queues.models import CaptionTask, Dispatch, TaskStatus
from queues.services import TaskSpec, task_submit, tasks_relay_once, tasks_submit_many

pytestmark = pytest.mark.django_db(transaction=True)


def held_ids() -> set[int]:
    return set(CaptionTask.objects.filter(dispatch=Dispatch.HELD, status=TaskStatus.QUEUED)
               .values_list("pk", flat=True))


def test_tasks_held_with_submission_open_are_counted_by_verify_and_released_by_the_next_relay_pass(redis, mode,
                                                                                                 media_image):
    """The state a submission racing a resume leaves on MariaDB (its batch read "paused", committed after the
    resume had released what it could see): held rows, submission open."""
    mode(mode="rq")
    ids = CaptionTask.objects.insert_new([(media_image(), "normal", None)] * 5, publish_after=timezone.now(),
                                         dispatch=[Dispatch.HELD] * 5)
    report = verification(direction="to_rq")
    assert not report["ok"] and report["left_behind"]["held_with_submission_open"] == 5, report
    assert any("held" in problem for problem in report["problems"]), report["problems"]

    tasks_relay_once()
    assert held_ids() == set()
    assert broker.queued_task_ids("normal") == set(ids)
    assert verification(direction="to_rq")["ok"]


def test_held_tasks_stay_held_while_the_pause_lasts(redis, mode, media_image):
    dispatch.submission_pause(reason="index rebuild", user=None)
    task = task_submit(image_ref=media_image())
    tasks_relay_once()
    assert held_ids() == {task.pk}
    assert verification(direction="to_rq")["left_behind"]["held_with_submission_open"] == 0


@pytest.mark.skipif("connection.vendor != 'mysql'", reason="SQLite's IMMEDIATE transactions serialise the two")
def test_a_batch_that_read_paused_and_commits_after_the_resume_is_released(redis, mode, media_image):
    """MariaDB, READ COMMITTED: the batch reads the mode row without a lock, so the resume commits and releases
    what it can see before the batch commits its held rows."""
    dispatch.submission_pause(reason="database upgrade", user=None)
    reference = media_image()
    read_paused, resumed, created = threading.Event(), threading.Event(), []

    def submit_batch():
        try:
            with transaction.atomic():
                created.extend(tasks_submit_many(specs=[TaskSpec(image_ref=reference)] * 200).created)
                read_paused.set()
                resumed.wait(30)
        finally:
            read_paused.set()
            connection.close()

    submitter = threading.Thread(target=submit_batch)
    submitter.start()
    assert read_paused.wait(30)
    assert dispatch.submission_resume(user=None) == 0  # the batch is not committed: nothing to see yet
    resumed.set()
    submitter.join(30)
    assert len(created) == 200 and held_ids() == set(created)  # the race, as it happens
    assert not state.system_mode().paused_now()

    tasks_relay_once()
    assert held_ids() == set()
    assert broker.queued_task_ids("normal") == set(created)


def test_a_timed_pause_in_legacy_mode_ends_with_pollers_only(redis, mode, media_image):
    """No supervisor, no relay: the poller itself lifts an expired pause and runs what was held."""
    mode(mode="legacy")
    dispatch.submission_pause(reason="maintenance", user=None, duration=timedelta(hours=1))
    task = task_submit(image_ref=media_image())
    assert held_ids() == {task.pk}
    SystemMode.objects.filter(pk=1).update(paused_until=timezone.now() - timedelta(seconds=1))

    result = LegacyPoller(name="poller.alone", interval=0.01).work(burst=True)
    assert (result.processed, result.completed) == (1, 1), result
    task.refresh_from_db()
    assert (task.status, task.dispatch) == (TaskStatus.COMPLETED, Dispatch.DATABASE)
    assert not SystemMode.objects.get(pk=1).submission_paused


def test_a_poller_releases_tasks_held_with_submission_open(redis, mode, media_image):
    mode(mode="legacy")
    ids = CaptionTask.objects.insert_new([(media_image(), "normal", None)] * 3, publish_after=timezone.now(),
                                         dispatch=[Dispatch.HELD] * 3)
    result = LegacyPoller(name="poller.alone", interval=0.01).work(burst=True)
    assert result.completed == 3, result
    assert set(CaptionTask.objects.filter(pk__in=ids).values_list("status", flat=True)) == {TaskStatus.COMPLETED}


def test_a_restored_backup_taken_during_a_pause_brings_no_task_back_held(redis, mode, media_image, tmp_path):
    mode(mode="rq")
    dispatch.submission_pause(reason="backup", user=None)
    submitted = [task_submit(image_ref=media_image()).pk for _ in range(3)]
    manifest = backup_write(directory=tmp_path)
    dispatch.submission_resume(user=None)
    broker.jobs_delete(submitted)
    for name in broker.QUEUE_NAMES:
        broker.queue_purge_missing(name)
    CaptionTask.objects.filter(pk__in=submitted).delete()

    counts = backup_restore(path=manifest["path"])
    assert counts["inserted"] == 3
    assert held_ids() == set()
    assert set(CaptionTask.objects.filter(pk__in=submitted).values_list("dispatch", "status")) == {
        (Dispatch.RQ, TaskStatus.QUEUED)}
    tasks_relay_once()
    assert broker.queued_task_ids("normal") == set(submitted)
