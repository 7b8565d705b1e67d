import json
import zlib

import pytest
from django.core.exceptions import ValidationError
from rq import Queue

from queues import broker
from queues.models import CaptionTask, TaskEvent, TaskStatus
from queues.services import TaskSpec, task_submit, tasks_publish, tasks_submit_many

pytestmark = pytest.mark.django_db


def queued_job_ids(redis, queue="normal"):
    return [job_id.decode() for job_id in redis.lrange(f"rq:queue:{queue}", 0, -1)]


def test_submit_commits_row_then_publishes_json_job_with_task_id_only(redis, media_image,
                                                                      django_capture_on_commit_callbacks):
    reference = media_image()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        task = task_submit(image_ref=reference, priority="high")
        # Before commit nothing is in Redis: a worker must never see a job whose row does not exist yet.
        assert queued_job_ids(redis, "high") == []
    for callback in callbacks:
        callback()

    task.refresh_from_db()
    assert task.status == TaskStatus.QUEUED and task.published_at is not None
    assert queued_job_ids(redis, "high") == [f"caption-{task.pk}"]
    raw = redis.hget(f"rq:job:caption-{task.pk}", "data")
    assert json.loads(zlib.decompress(raw)) == ["queues.jobs.caption_task", None, [task.pk], {}]
    assert broker.queue_lengths() == {"urgent": 0, "high": 1, "normal": 0, "low": 0}


def test_bulk_submission_writes_every_row_and_one_job_each(redis, media_image, django_capture_on_commit_callbacks):
    reference = media_image()
    specs = [TaskSpec(image_ref=reference, priority=("urgent", "low")[index % 2]) for index in range(2500)]
    progress = []
    with django_capture_on_commit_callbacks(execute=True):
        result = tasks_submit_many(specs=specs, batch_size=1000, on_batch=progress.append)
    assert progress == [1000, 1000, 500]
    assert result.created_count == 2500 and CaptionTask.objects.count() == 2500
    assert CaptionTask.objects.filter(published_at__isnull=True).count() == 0
    assert broker.queue_lengths() == {"urgent": 1250, "high": 0, "normal": 0, "low": 1250}
    assert set(queued_job_ids(redis, "urgent")) == {f"caption-{pk}" for pk in
                                                    CaptionTask.objects.filter(priority="urgent").values_list("pk", flat=True)}


def test_repeated_idempotency_key_returns_existing_task_without_second_job(redis, media_image,
                                                                           django_capture_on_commit_callbacks):
    reference = media_image()
    with django_capture_on_commit_callbacks(execute=True):
        first = task_submit(image_ref=reference, idempotency_key="order-17")
        again = task_submit(image_ref=reference, idempotency_key="order-17")
        result = tasks_submit_many(specs=[TaskSpec(reference, idempotency_key="order-17"),
                                          TaskSpec(reference, idempotency_key="order-18"),
                                          TaskSpec(reference, idempotency_key="order-18")])
    assert again.pk == first.pk
    # The repeated new key's item is the first one's task (a caller can map every item to a task).
    assert len(result.created) == 1 and result.existing == [first.pk, result.created[0]]
    assert CaptionTask.objects.count() == 2
    assert len(queued_job_ids(redis)) == 2


@pytest.mark.parametrize("fields, field_name, fragment", [
    ({"priority": "asap"}, "priority", "Unknown priority 'asap'"),
    ({"image_ref": ""}, "image_ref", "required"),
    ({"image_ref": "ftp://example.com/cat.png"}, "image_ref", "Unsupported URL scheme 'ftp'"),
    ({"image_ref": "http:///nohost.png"}, "image_ref", "has no host"),
    ({"image_ref": "../../etc/passwd"}, "image_ref", "outside the media root"),
    ({"image_ref": "missing.png"}, "image_ref", "No file 'missing.png'"),
    ({"idempotency_key": "k" * 201}, "idempotency_key", "1 to 200 characters"),
])
def test_bad_input_names_the_field_and_writes_nothing(redis, media_image, fields, field_name, fragment):
    arguments = {"image_ref": media_image(), "priority": "normal", **fields}
    with pytest.raises(ValidationError) as raised:
        task_submit(**arguments)
    assert fragment in " ".join(raised.value.message_dict[field_name])
    assert CaptionTask.objects.count() == 0
    assert sum(broker.queue_lengths().values()) == 0


def test_oversized_media_image_is_refused_at_submission(redis, media_image, settings):
    reference = media_image(size=(400, 400))
    settings.IMAGE_MAX_BYTES = 100
    with pytest.raises(ValidationError) as raised:
        task_submit(image_ref=reference)
    assert "larger than the limit of 100 bytes" in raised.value.message_dict["image_ref"][0]
    assert CaptionTask.objects.count() == 0


def test_bulk_submission_validates_everything_before_writing(redis, media_image):
    reference = media_image()
    specs = [TaskSpec(reference)] * 5 + [TaskSpec(reference, priority="whenever")]
    with pytest.raises(ValidationError) as raised:
        tasks_submit_many(specs=specs)
    assert "item 5: priority" in raised.value.message_dict
    assert CaptionTask.objects.count() == 0


def test_jobs_are_queued_with_configured_timeout_and_ttls(redis, media_image, settings,
                                                          django_capture_on_commit_callbacks):
    settings.RQ_DEFAULT_TIMEOUT = 45
    settings.RQ_RESULT_TTL = 120
    with django_capture_on_commit_callbacks(execute=True):
        task = task_submit(image_ref=media_image())
    job = Queue("normal", connection=redis).fetch_job(task.job_id)
    assert job.timeout == 45 + 30  # the captioner's own limit plus room to record a timeout
    assert job.result_ttl == 120


def test_publishing_twice_claims_once(redis, media_image, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        task = task_submit(image_ref=media_image())
    assert tasks_publish(tasks=[(task.pk, "normal")]) == 1
    assert tasks_publish(tasks=[(task.pk, "normal")]) == 0
    assert redis.llen("rq:queue:normal") == 1
    assert TaskEvent.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_submissions_with_one_idempotency_key_give_one_task(redis, media_image):
    import threading

    from django.db import connection, connections, transaction

    if connection.vendor != "mysql":
        pytest.skip("the stale snapshot is REPEATABLE READ's, MySQL/MariaDB's default isolation level")
    reference = media_image()
    other = {}

    def other_request():
        other["task"] = task_submit(image_ref=reference, idempotency_key="upload-7")
        connections.close_all()

    # Django asks MySQL for READ COMMITTED, but a deployment may run REPEATABLE READ (MySQL's own default, set by
    # the server, a proxy or the connection options): the service must be right under both.
    with connection.cursor() as cursor:
        cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    try:
        with transaction.atomic():  # as the admin's add view runs
            CaptionTask.objects.count()  # this transaction's snapshot is taken here
            thread = threading.Thread(target=other_request)
            thread.start()
            thread.join()  # the other submission commits the same key meanwhile
            task = task_submit(image_ref=reference, idempotency_key="upload-7")
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    assert task.pk == other["task"].pk
    assert CaptionTask.objects.filter(idempotency_key="upload-7").count() == 1
