import pytest
from django.urls import reverse

from queues import broker
from queues.models import CaptionTask, TaskStatus
from queues.services import TaskSpec, tasks_submit_many

pytestmark = pytest.mark.django_db


def test_admin_submits_a_task_through_the_service(client, admin_user, redis, media_image,
                                                  django_capture_on_commit_callbacks):
    reference = media_image()
    client.force_login(admin_user)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(reverse("admin:queues_captiontask_add"),
                               {"image_ref": reference, "priority": "urgent", "idempotency_key": ""})
    assert response.status_code == 302
    task = CaptionTask.objects.get()
    assert (task.image_ref, task.priority, task.status) == (reference, "urgent", TaskStatus.QUEUED)
    assert task.published_at is not None and broker.queue_lengths()["urgent"] == 1


def test_admin_add_form_shows_field_errors_and_writes_nothing(client, admin_user, redis, media_image):
    client.force_login(admin_user)
    response = client.post(reverse("admin:queues_captiontask_add"),
                           {"image_ref": "ftp://example.com/x.png", "priority": "normal"})
    assert response.status_code == 200
    assert "Unsupported URL scheme" in response.context["adminform"].form.errors["image_ref"][0]
    response = client.post(reverse("admin:queues_captiontask_add"), {"image_ref": media_image(), "priority": "asap"})
    assert "priority" in response.context["adminform"].form.errors
    assert CaptionTask.objects.count() == 0


def test_changelist_filters_search_and_shows_caption_and_error(client, admin_user, redis, media_image,
                                                               django_assert_max_num_queries):
    reference = media_image()
    tasks_submit_many(specs=[TaskSpec(reference) for _ in range(60)])
    ids = list(CaptionTask.objects.order_by("pk").values_list("pk", flat=True))
    CaptionTask.objects.filter(pk__in=ids[:5]).update(status=TaskStatus.COMPLETED,
                                                      caption="Square image, almost entirely red.")
    CaptionTask.objects.filter(pk__in=ids[5:8]).update(status=TaskStatus.FAILED,
                                                       last_error_class="PermanentCaptionError",
                                                       last_error_message="HTTP 404")
    client.force_login(admin_user)
    url = reverse("admin:queues_captiontask_changelist")
    # 8, and the dispatch mode row the admin banner reads (whether submission is paused)
    with django_assert_max_num_queries(9):
        response = client.get(url)
    assert response.status_code == 200
    with django_assert_max_num_queries(9):
        failed = client.get(url, {"status__exact": "FAILED"})
    assert failed.context["cl"].result_count == 3
    assert "PermanentCaptionError: HTTP 404" in failed.content.decode()
    assert client.get(url, {"q": "HTTP 404"}).context["cl"].result_count == 3  # search covers error text
    completed = client.get(url, {"status__exact": "COMPLETED"})
    assert "almost entirely red" in completed.content.decode()
    by_error = client.get(url, {"last_error_class": "PermanentCaptionError"})
    assert by_error.context["cl"].result_count == 3


def test_task_page_shows_timeline_and_is_read_only(client, admin_user, redis, media_image,
                                                   django_capture_on_commit_callbacks):
    from queues.execution import task_execute

    with django_capture_on_commit_callbacks(execute=True):
        task = tasks_submit_many(specs=[TaskSpec(media_image())]).created[0]
    task_execute(task_id=task, worker_name="worker-a")
    client.force_login(admin_user)
    response = client.get(reverse("admin:queues_captiontask_change", args=[task]))
    page = response.content.decode()
    assert "Completed" in page and "worker-a" in page and "Duration ms" in page
    # Editing a submitted task is not possible: posting a change leaves it as it was.
    client.post(reverse("admin:queues_captiontask_change", args=[task]), {"image_ref": "other.png"})
    assert CaptionTask.objects.get(pk=task).image_ref != "other.png"


def test_outsider_and_support_cannot_submit(client, outsider_user, support_user, redis, media_image):
    reference = media_image()
    add = reverse("admin:queues_captiontask_add")
    client.force_login(outsider_user)
    assert client.get(reverse("admin:queues_captiontask_changelist")).status_code == 302  # to the login page
    client.force_login(support_user)
    assert client.get(reverse("admin:queues_captiontask_changelist")).status_code == 200
    assert client.post(add, {"image_ref": reference, "priority": "normal"}).status_code == 403
    assert CaptionTask.objects.count() == 0
