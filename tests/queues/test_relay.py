"""The outbox: submission works with Redis down; the relay publishes everything, once, when it is back."""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from queues import broker
from queues.models import CaptionTask, TaskStatus
from queues.services import TaskSpec, task_submit, tasks_relay_once, tasks_submit_many
from tests.conftest import run_worker

pytestmark = pytest.mark.django_db(transaction=True)


def test_submission_survives_redis_outage_and_relay_publishes_once_back(redis_server_factory, media_image,
                                                                       settings, capsys):
    settings.RELAY_GRACE_SECONDS = 0
    server = redis_server_factory("outbox")
    reference = media_image()
    server.stop()

    single = task_submit(image_ref=reference, priority="urgent")
    bulk = tasks_submit_many(specs=[TaskSpec(reference, priority="low") for _ in range(30)])
    assert bulk.created_count == 30
    assert CaptionTask.objects.filter(status=TaskStatus.QUEUED, published_at__isnull=True).count() == 31

    with pytest.raises(CommandError, match="Redis is unreachable"):
        call_command("relay_tasks", "--once")
    assert CaptionTask.objects.filter(published_at__isnull=True).count() == 31

    server.start()
    call_command("relay_tasks", "--once")
    assert "Published 31 task(s)." in capsys.readouterr().out
    assert broker.queue_lengths() == {"urgent": 1, "high": 0, "normal": 0, "low": 30}
    connection = broker.get_connection()
    low_ids = [job_id.decode() for job_id in connection.lrange("rq:queue:low", 0, -1)]
    assert len(set(low_ids)) == 30
    assert tasks_relay_once() == 0  # nothing published twice

    run_worker()
    assert CaptionTask.objects.filter(status=TaskStatus.COMPLETED).count() == 31
    assert single.pk in CaptionTask.objects.filter(status=TaskStatus.COMPLETED).values_list("pk", flat=True)


def test_queued_jobs_survive_a_redis_restart(redis_server_factory, media_image):
    server = redis_server_factory("durable")
    tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(5)])
    assert broker.queue_lengths()["normal"] == 5
    server.stop()  # a clean stop flushes the append-only file
    server.start()
    broker.reset_connection()
    assert broker.queue_lengths()["normal"] == 5
    run_worker()
    assert CaptionTask.objects.filter(status=TaskStatus.COMPLETED).count() == 5


def test_relay_leaves_fresh_tasks_to_their_submitter_during_grace(redis, media_image, settings):
    settings.RELAY_GRACE_SECONDS = 60
    task = task_submit(image_ref=media_image())
    # As the row is between its commit and the submitter's publish (after commit): unpublished, within its grace.
    CaptionTask.objects.filter(pk=task.pk).update(published_at=None,
                                                  publish_after=task.created_at + timedelta(seconds=60))
    assert tasks_relay_once() == 0
    assert tasks_relay_once(now=timezone.now() + timedelta(seconds=61)) == 1
    assert broker.queue_lengths()["normal"] == 2  # the submitter's job and the relay's: the claim makes one run


def test_relay_command_rejects_bad_interval(redis):
    with pytest.raises(CommandError, match="--interval must be a positive"):
        call_command("relay_tasks", "--interval", "0")


def test_tasks_whose_submitter_saw_redis_down_are_due_at_once(redis, media_image, settings):
    from portal.embedded_redis import free_port

    settings.RELAY_GRACE_SECONDS = 60  # a fresh task's grace must not delay a publish known to have failed
    working_url = settings.REDIS_URL
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    broker.reset_connection()
    created = tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(50)]).created
    assert CaptionTask.objects.filter(pk__in=created, published_at__isnull=True).count() == 50
    settings.REDIS_URL = working_url  # Redis is back
    broker.reset_connection()
    assert tasks_relay_once() == 50
    assert broker.queue_lengths()["normal"] == 50


def test_a_publication_that_loses_a_deadlock_runs_again_and_publishes_every_task(redis, media_image):
    """MariaDB rolls back the cheaper side of a lock cycle. The submitter's claim (one statement, after its commit)
    is that side when a heavier transaction holds the last of its rows and then wants the first: it must run again,
    not raise into a submission that has already succeeded."""
    import threading

    from django.db import connection, connections, transaction

    from queues.models import Dispatch, job_id_for
    from queues.services import tasks_publish

    if connection.vendor != "mysql":
        pytest.skip("SQLite locks the whole database: no lock cycle between two statements")
    reference = media_image()
    heavy = CaptionTask.objects.insert_new([(reference, "normal", None)] * 300, publish_after=timezone.now())
    targets = CaptionTask.objects.insert_new([(reference, "normal", None)] * 5,
                                             publish_after=timezone.now() + timedelta(minutes=5))
    assert CaptionTask.objects.filter(pk__in=targets, dispatch=Dispatch.RQ, published_at__isnull=True).count() == 5
    holding, release, outcome = threading.Event(), threading.Event(), {}

    def heavy_transaction():
        try:
            with transaction.atomic():
                CaptionTask.objects.filter(pk__in=heavy).update(priority="low")  # the heavier side of the cycle
                CaptionTask.objects.filter(pk=targets[-1]).update(priority="low")
                holding.set()
                release.wait(30)
                CaptionTask.objects.filter(pk=targets[0]).update(priority="low")  # closes the cycle
                outcome["heavy"] = "committed"
        except Exception as error:
            outcome["heavy"] = repr(error)
        finally:
            connections.close_all()

    def publish():
        try:
            outcome["published"] = tasks_publish(tasks=[(pk, "normal") for pk in targets], fresh=True)
        except Exception as error:
            outcome["published"] = repr(error)
        finally:
            connections.close_all()

    holder = threading.Thread(target=heavy_transaction)
    holder.start()
    assert holding.wait(30)
    publisher = threading.Thread(target=publish)
    publisher.start()
    with connection.cursor() as cursor:  # the publisher holds targets[:-1] and waits for targets[-1]
        for _ in range(300):
            # (the process list shows a user its own statements without the PROCESS privilege)
            cursor.execute("SELECT COUNT(*) FROM information_schema.processlist "
                           "WHERE info LIKE 'UPDATE %%published_at%%' AND time_ms > 200")
            if cursor.fetchone()[0]:
                break
            threading.Event().wait(0.05)
        else:
            pytest.fail("the publisher never waited for the held row")
    release.set()
    holder.join(60)
    publisher.join(60)

    assert outcome == {"heavy": "committed", "published": 5}
    assert CaptionTask.objects.filter(pk__in=targets, published_at__isnull=True).count() == 0
    queued = {job_id.decode() for job_id in broker.get_connection().lrange("rq:queue:normal", 0, -1)}
    assert {job_id_for(pk) for pk in targets} <= queued
