import re

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
    assert re.search(r'data-queue="high"><div class="tile-label">[^<]*</div><div class="tile-figure">7</div>', page)
    assert re.search(r'data-queue="urgent"><div class="tile-label">[^<]*</div><div class="tile-figure">0</div>', page)
    assert 'status__exact=QUEUED">7</a>' in page
    # The figures are tiles that wrap as a whole (the table they replace squeezed its headers to one letter a
    # line), and the page updates them live.
    assert "<th>" not in page.split('id="queue-snapshot"')[1].split("</div>\n<script")[0]
    assert 'id="live-status"' in page and "monitoring/live-pages" in page
    assert reverse("admin:dashboard") in page  # the dashboard is listed first among the apps


def test_admin_index_says_when_redis_is_unreachable(client, admin_user, unreachable_redis):
    client.force_login(admin_user)
    page = client.get(reverse("admin:index")).content.decode()
    assert 'id="snapshot-redis-warning" style="color: #ba2121;">Redis is unreachable' in page
    assert re.search(r'data-queue="high"><div class="tile-label">[^<]*</div><div class="tile-figure">–</div>', page)
