import pytest
from django.urls import reverse

from queues.services import TaskSpec, tasks_submit_many

pytestmark = pytest.mark.django_db


def test_admin_index_shows_queue_lengths_and_task_counts(client, admin_user, redis, media_image,
                                                         django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        tasks_submit_many(specs=[TaskSpec(media_image(), priority="high") for _ in range(7)])
    client.force_login(admin_user)
    page = client.get(reverse("admin:index")).content.decode()
    assert '<td data-queue="high">7</td>' in page
    assert '<td data-queue="urgent">0</td>' in page
    assert 'status__exact=QUEUED">7</a>' in page


def test_admin_index_says_when_redis_is_unreachable(client, admin_user, unreachable_redis):
    client.force_login(admin_user)
    page = client.get(reverse("admin:index")).content.decode()
    assert "Redis unreachable" in page and '<td data-queue="high">–</td>' in page
