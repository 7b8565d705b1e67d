"""Live figures cost nothing while nobody watches, and never a count over the whole task table."""

import signal
import subprocess
import sys
import tempfile
import time

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from monitoring import live, selectors
from monitoring.consumers import METRICS_GROUP
from monitoring.sampler import LAST_KEY
from queues.models import CaptionTask, TaskStatus
from tests.conftest import subprocess_env


def make_tasks(count: int, status: str = TaskStatus.QUEUED) -> None:
    CaptionTask.objects.bulk_create([CaptionTask(image_ref=f"img-{index}.png", status=status)
                                     for index in range(count)])


def receive(channel: str, timeout: float = 0.5):
    async def run():
        import asyncio

        try:
            return await asyncio.wait_for(get_channel_layer().receive(channel), timeout)
        except asyncio.TimeoutError:
            return None

    return async_to_sync(run)()


@pytest.fixture
def dashboard_channel(redis):
    """A real channel in the dashboards' group, as a connected consumer's is."""
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(METRICS_GROUP, channel)
    yield channel
    async_to_sync(layer.group_discard)(METRICS_GROUP, channel)


@pytest.mark.django_db
def test_nothing_is_computed_or_sent_while_nobody_watches(dashboard_channel, django_assert_num_queries):
    with django_assert_num_queries(0):
        assert live.dashboards_push(group=METRICS_GROUP) is False
    assert receive(dashboard_channel) is None


@pytest.mark.django_db
def test_a_watcher_gets_pushes_until_it_leaves_or_stops_renewing(dashboard_channel, monkeypatch):
    make_tasks(3)
    live.watcher_add(dashboard_channel)
    assert live.dashboards_push(group=METRICS_GROUP) is True
    message = receive(dashboard_channel)
    assert message["type"] == "metrics.update"
    assert {row["status"]: row["count"] for row in message["data"]["tasks"]}[TaskStatus.QUEUED] == 3
    live.watcher_remove(dashboard_channel)
    assert live.dashboards_push(group=METRICS_GROUP) is False
    # A watcher whose process died stops renewing its entry and no longer counts once it is older than the TTL.
    live.watcher_add(dashboard_channel, now=time.time() - live.WATCHER_TTL - 1)
    assert live.watchers_count() == 0 and live.dashboards_push(group=METRICS_GROUP) is False


@pytest.mark.django_db(transaction=True)
def test_the_consumer_helpers_join_renew_and_leave(redis, monkeypatch):
    class Consumer:
        channel_name = "specific.test!consumer"

    monkeypatch.setattr(live, "WATCHER_REFRESH", 0.05)

    async def run():
        import asyncio

        consumer = Consumer()
        await live.watcher_join(consumer)
        first = redis.zscore(live.WATCHERS_KEY, consumer.channel_name)
        await asyncio.sleep(0.3)
        renewed = redis.zscore(live.WATCHERS_KEY, consumer.channel_name)
        await live.watcher_leave(consumer)
        return first, renewed

    first, renewed = async_to_sync(run)()
    assert first is not None and renewed > first
    assert redis.zscore(live.WATCHERS_KEY, Consumer.channel_name) is None


@pytest.mark.django_db
def test_task_counts_are_bounded_per_status_never_a_count_of_the_table(redis, monkeypatch):
    monkeypatch.setattr(selectors, "TASK_COUNT_CAP", 5, raising=False)
    make_tasks(8)
    make_tasks(2, TaskStatus.FAILED)
    with CaptureQueriesContext(connection) as queries:
        snapshot = selectors.queue_snapshot()
    assert len(queries) <= len(TaskStatus.choices)
    assert not any("GROUP BY" in query["sql"].upper() for query in queries)
    counts = {row["status"]: (row["count"], row["more"]) for row in snapshot["tasks"]}
    assert counts[TaskStatus.QUEUED] == (5, True)  # shown as "5+"
    assert counts[TaskStatus.FAILED] == (2, False)


def captiontask_queries(queries) -> list[str]:
    return [query["sql"] for query in queries if "queues_captiontask" in query["sql"]]


@pytest.mark.django_db
def test_admin_index_counts_tasks_only_for_users_who_may_view_them(client, redis, django_user_model, support_user):
    make_tasks(4)
    staff_only = django_user_model.objects.create_user(username="stan-staff", password="pw", is_staff=True)
    client.force_login(staff_only)
    with CaptureQueriesContext(connection) as queries:
        page = client.get(reverse("admin:index"))
    assert page.status_code == 200 and b'id="queue-snapshot"' not in page.content
    assert captiontask_queries(queries) == []
    client.logout()
    with CaptureQueriesContext(connection) as queries:  # not logged in: the login page, nothing counted
        assert client.get(reverse("admin:index")).status_code == 302
    assert captiontask_queries(queries) == []

    client.force_login(support_user)
    with CaptureQueriesContext(connection) as queries:
        page = client.get(reverse("admin:index"))
    assert b'id="queue-snapshot"' in page.content and b'data-status="QUEUED"' in page.content
    assert len(captiontask_queries(queries)) <= len(TaskStatus.choices)
    assert not any("GROUP BY" in sql.upper() for sql in captiontask_queries(queries))


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_running_sampler_pushes_only_while_someone_watches(redis):
    import asyncio

    from asgiref.sync import sync_to_async

    async def listen() -> tuple:
        """On one event loop (the channel layer's receive buffers belong to the loop that made them)."""
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(METRICS_GROUP, channel)

        async def next_message(timeout: float):
            try:
                return await asyncio.wait_for(layer.receive(channel), timeout)
            except asyncio.TimeoutError:
                return None

        try:
            unwatched = await next_message(1.5)  # seven passes, nobody watching
            await sync_to_async(live.watcher_add)(channel)
            watched = await next_message(10)
        finally:
            await layer.group_discard(METRICS_GROUP, channel)
        return unwatched, watched

    log = tempfile.TemporaryFile()
    sampler = subprocess.Popen([sys.executable, "manage.py", "run_sampler", "--live-interval", "0.2"],
                               cwd=settings.BASE_DIR, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not redis.exists(LAST_KEY):  # its first pass has run
            assert sampler.poll() is None and time.monotonic() < deadline, "the sampler did not start"
            time.sleep(0.05)
        unwatched, watched = async_to_sync(listen)()
    finally:
        sampler.send_signal(signal.SIGTERM)
        sampler.wait(30)
        log.seek(0)
        print(log.read().decode(errors="replace"))
        log.close()
    assert unwatched is None
    assert watched is not None and watched["type"] == "metrics.update"
