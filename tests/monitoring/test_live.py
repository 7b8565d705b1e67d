"""Live figures cost nothing while nobody watches, and never a count over the whole task table."""

import json
import signal
import time
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from monitoring.live import dashboard
from monitoring.live import events as live
from monitoring.live.dashboard import LiveSampler
from monitoring.live.events import METRICS_GROUP
from monitoring.metrics import selectors
from monitoring.metrics.sampler import LAST_KEY
from queues.models import CaptionTask, TaskStatus
from tests.processes import start_command, stop_process


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
    import uuid

    layer = get_channel_layer()
    # A plain channel name (no "!"): channels-redis reads it straight from Redis, so each receive() may run on an
    # event loop of its own (a process-specific channel's buffer is bound to the first loop that read it).
    channel = f"dashboard-test-{uuid.uuid4().hex}"
    async_to_sync(layer.group_add)(METRICS_GROUP, channel)
    yield channel
    async_to_sync(layer.group_discard)(METRICS_GROUP, channel)


@pytest.mark.django_db
def test_nothing_is_computed_or_sent_while_nobody_watches(dashboard_channel, django_assert_num_queries):
    sampler = LiveSampler()
    with django_assert_num_queries(0):
        assert sampler.step() is None
    assert sampler.holding  # it holds the lock all the same, and is ready when someone connects
    assert receive(dashboard_channel) is None


def sample_of(message) -> dict:
    assert message["type"] == "metrics.update"
    payload = json.loads(message["text"])
    assert payload["type"] == "sample"
    return payload["data"]


@pytest.mark.django_db
def test_a_watcher_gets_samples_until_it_leaves_or_stops_renewing(dashboard_channel, redis):
    redis.rpush("rq:queue:high", "probe-1")  # a job id waiting in the high queue
    sampler = LiveSampler()
    live.watcher_add(dashboard_channel)
    sent = sampler.step()
    data = sample_of(receive(dashboard_channel))
    assert data == json.loads(json.dumps(sent))
    assert data["queues"]["high"]["depth"] == 1 and data["queues"]["low"]["depth"] == 0
    assert data["redis"]["ok"] is True and data["redis"]["used_memory"] > 0
    assert data["health"]["status"] in ("healthy", "warning", "unhealthy")
    assert abs(data["at"] / 1000 - time.time()) < 5
    assert json.loads(live.last_sample())["data"] == data  # what a dashboard connecting now gets first
    live.watcher_remove(dashboard_channel)
    assert sampler.step() is None and receive(dashboard_channel) is None
    # A watcher whose process died stops renewing its entry and no longer counts once it is older than the TTL.
    live.watcher_add(dashboard_channel, now=time.time() - live.WATCHER_TTL - 1)
    assert live.watchers_count() == 0 and sampler.step() is None


@pytest.mark.django_db
def test_one_sampler_of_the_deployment_samples_and_a_standby_takes_over(dashboard_channel, redis, monkeypatch):
    live.watcher_add(dashboard_channel)
    first, second = LiveSampler(), LiveSampler()
    assert first.step() is not None
    assert second.step() is None  # standing by: the lock is the first one's
    assert sample_of(receive(dashboard_channel)) and receive(dashboard_channel) is None
    assert first.step() is not None and second.step() is None  # renewing keeps it
    receive(dashboard_channel)
    redis.pexpire(dashboard.LIVE_LOCK_KEY, 1)  # the holder stopped renewing (killed, paused) and its lock ran out
    time.sleep(0.01)
    assert second.step() is not None
    assert first.step() is None and not first.holding  # the old holder does not take it back
    receive(dashboard_channel)
    second.release()
    assert first.step() is not None  # a clean stop hands over at the next pass


@pytest.mark.django_db
def test_a_sample_reads_no_more_than_a_scrape_and_never_counts_the_task_table(dashboard_channel, redis):
    make_tasks(50)
    live.watcher_add(dashboard_channel)
    sampler = LiveSampler()
    sampler.step()  # the first reads the slow figures (bounded counts per status, pools) too
    with CaptureQueriesContext(connection) as queries:
        sampler.step()
    tables = [query["sql"] for query in queries]
    # overdue unpublished, dispatch mode, pools, oldest processing, the portal's monitors, firing alerts
    assert len(tables) <= 6, tables
    assert not any("COUNT(" in sql.upper() for sql in tables)


def test_rates_and_percentiles_come_from_the_counters_a_minute_apart():
    from collections import deque

    from monitoring.metrics.snapshot import Snapshot

    snapshot = Snapshot(redis_ok=True, database_ok=True, queue_lengths={"normal": 4})
    before = {"tasks:completed": 100.0, "tasks:failed": 1.0, "retries": 0.0, "queue:normal:completed": 100.0}
    now = {"tasks:completed": 130.0, "tasks:failed": 4.0, "retries": 2.0, "queue:normal:completed": 130.0}
    histograms_before = {"processing:normal": {"b3": 10.0, "count": 10.0}}
    histograms_now = {"processing:normal": {"b3": 40.0, "count": 40.0}}  # 30 attempts between 0.5 s and 1 s
    ring = deque([(1000.0, before, histograms_before), (1060.0, now, histograms_now)])
    sample = dashboard.build_sample(snapshot, at=1060.0, ring=ring, slow={}, alerts={"alerts": []})
    assert sample["throughput"] == {"completed": 30.0, "failed": 3.0, "retried": 2.0}
    assert sample["queues"]["normal"]["completed_per_minute"] == 30.0
    assert sample["queues"]["normal"]["completed_5m"] == 30
    assert 0.5 < sample["processing"]["p50"] < sample["processing"]["p95"] <= 1.0
    assert sample["wait"] == {"p50": None, "p95": None}  # no attempt waited in the window: nothing to say
    assert sample["queues"]["normal"]["depth"] == 4 and sample["at"] == 1060000.0
    # Half a minute of history is scaled to a rate per minute.
    ring = deque([(1030.0, before, {}), (1060.0, now, {})])
    sample = dashboard.build_sample(snapshot, at=1060.0, ring=ring, slow={}, alerts={"alerts": []})
    assert sample["throughput"]["completed"] == 60.0 and sample["rate_window_seconds"] == 30.0


@pytest.mark.django_db(transaction=True)
def test_fleet_events_and_alert_changes_are_pushed_when_they_are_committed(dashboard_channel, redis):
    from django.db import transaction
    from django.utils import timezone

    from monitoring.models import Alert, AlertEvent
    from queues.models import FleetEvent

    FleetEvent.objects.create(kind=FleetEvent.Kind.WORKER_STARTED, worker_name="w-unwatched")
    assert receive(dashboard_channel) is None  # nobody watches: nothing is sent
    live.watcher_add(dashboard_channel)
    with transaction.atomic():
        event = FleetEvent.objects.create(kind=FleetEvent.Kind.WORKER_CRASHED, worker_name="w-1", reason="SIGKILL")
        assert receive(dashboard_channel, timeout=0.2) is None  # not before the commit
    message = receive(dashboard_channel, timeout=5)  # sent from the process' announcer thread
    payload = json.loads(message["text"])
    assert payload["type"] == "events"
    assert payload["data"] == [{"source": "fleet", "id": event.pk, "at": event.at.isoformat(),
                                "kind": "worker_crashed", "level": "error",
                                "text": "Worker crashed: w-1 (SIGKILL)",
                                "url": reverse("admin:queues_fleetevent_change", args=[event.pk])}]
    alert = Alert.objects.create(name="queue-backlog", fingerprint="f" * 16, severity="critical",
                                 summary="Backlog above 100", state=Alert.State.FIRING, started_at=timezone.now(),
                                 holding_since=timezone.now(), last_seen_at=timezone.now())
    AlertEvent.objects.bulk_create([AlertEvent(alert_id=alert.pk, kind=AlertEvent.Kind.FIRING),
                                    AlertEvent(alert_id=alert.pk, kind=AlertEvent.Kind.NOTIFIED)])
    payload = json.loads(receive(dashboard_channel, timeout=5)["text"])
    assert [(line["source"], line["kind"], line["level"]) for line in payload["data"]] == [
        ("alert", "firing", "error"), ("alert", "notified", "info")]
    assert payload["data"][0]["text"] == "Firing: [critical] Backlog above 100"
    with transaction.atomic():
        FleetEvent.objects.create(kind=FleetEvent.Kind.POOL_SCALED, reason="rolled back")
        transaction.set_rollback(True)
    assert receive(dashboard_channel, timeout=0.3) is None  # a rolled-back row is never announced


@pytest.mark.django_db
def test_history_holds_the_last_hour_and_the_newest_ticker_lines(client, redis, support_user, django_user_model,
                                                                 django_assert_max_num_queries):
    from django.utils import timezone

    from monitoring.models import MetricSample
    from queues.models import FleetEvent

    now = timezone.now().replace(second=0, microsecond=0)
    for minutes_ago in (90, 30, 2):
        at = now - timedelta(minutes=minutes_ago)
        MetricSample.objects.create(at=at, queue="", completed=120, failed=6, workers=4, busy_ratio=0.5,
                                    processing_p95=1.5)
        MetricSample.objects.create(at=at, queue="high", depth=minutes_ago)
    FleetEvent.objects.create(kind=FleetEvent.Kind.WORKER_STARTED, worker_name="w-9")
    client.force_login(support_user)
    with django_assert_max_num_queries(8):
        response = client.get(reverse("admin:dashboard_history"))
    assert response.status_code == 200
    history = response.json()
    assert len(history["times"]) == 2  # 90 minutes ago is outside the hour
    assert history["times"][0] == (now - timedelta(minutes=29)).timestamp()  # drawn at the end of its minute
    assert history["series"]["depth:high"] == [30, 2] and history["series"]["depth:urgent"] == [None, None]
    assert history["series"]["completed"] == [120, 120] and history["series"]["processing_p95"] == [1.5, 1.5]
    assert history["events"][0]["text"] == "Worker started: w-9"

    staff_only = django_user_model.objects.create_user(username="stan-staff", password="pw", is_staff=True)
    client.force_login(staff_only)
    assert client.get(reverse("admin:dashboard_history")).status_code == 403
    assert client.get(reverse("admin:dashboard")).status_code == 403
    client.logout()
    assert client.get(reverse("admin:dashboard")).status_code == 302  # to the login page


@pytest.mark.django_db
def test_the_dashboard_page_loads_its_scripts_from_the_portal(client, redis, support_user):
    client.force_login(support_user)
    page = client.get(reverse("admin:dashboard")).content.decode()
    for name in ("monitoring/vendor/uplot/uPlot.iife.min.js", "monitoring/vendor/uplot/uPlot.min.css",
                 "monitoring/live.js", "monitoring/dashboard.js"):
        assert f"/static/{name}" in page
    assert "http://" not in page.split("<body")[1].split('id="footer"')[0].replace(
        "http://www.w3.org", "")  # no CDN: every script and style is the portal's own
    assert 'id="chart-depth"' in page and 'id="figure-completed"' in page and 'id="ticker"' in page


def test_the_vendored_chart_library_is_the_version_its_note_names():
    import hashlib
    import re
    from pathlib import Path

    folder = Path(settings.BASE_DIR) / "monitoring/static/monitoring/vendor/uplot"
    note = (folder / "VENDORED.md").read_text()
    assert "MIT" in (folder / "LICENSE").read_text()
    for name in ("uPlot.iife.min.js", "uPlot.min.css"):
        digest = re.search(rf"`{re.escape(name)}` sha256 `([0-9a-f]{{64}})`", note).group(1)
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    version = re.search(r"^# uPlot (\S+)", note, re.M).group(1)
    template = (Path(settings.BASE_DIR) / "templates/admin/monitoring/dashboard.html").read_text()
    assert f"uPlot {version}" in template


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

    sampler = start_command("run_sampler", "--live-interval", "0.2")
    try:
        deadline = time.monotonic() + 60
        while not redis.exists(LAST_KEY):  # its first pass has run
            assert sampler.poll() is None and time.monotonic() < deadline, "the sampler did not start"
            time.sleep(0.05)
        unwatched, watched = async_to_sync(listen)()
    finally:
        stop_process(sampler, grace=30)
    assert unwatched is None
    assert watched is not None and watched["type"] == "metrics.update"


@pytest.mark.django_db(transaction=True)
def test_writing_a_fleet_event_never_waits_for_a_frozen_redis(redis_server_factory):
    """A supervisor writes fleet events while Redis hangs (SIGSTOP: connections neither answer nor fail); the push
    to the dashboards must not hold it for a socket timeout per event (it did when the commit hook asked Redis
    whether anyone watched)."""
    import os

    from queues.models import FleetEvent

    server = redis_server_factory("frozen-events")
    live.watcher_add("someone-watching")  # so the push is really tried
    pid = server.running_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        FleetEvent.objects.create(kind=FleetEvent.Kind.WORKER_CRASHED, worker_name="w-frozen")
        waited = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert waited < 2, f"writing the event waited {waited:.1f} s for Redis"  # the socket timeout is 10 s
    assert FleetEvent.objects.filter(worker_name="w-frozen").exists()


@pytest.mark.django_db
def test_history_ranges_reach_back_six_hours_a_day_and_a_week(client, redis, support_user):
    from django.utils import timezone

    from monitoring.models import MetricSample

    now = timezone.now().replace(second=0, microsecond=0)
    for minutes_ago, depth in ((30, 5), (200, 7), (20 * 60, 9)):
        MetricSample.objects.create(at=now - timedelta(minutes=minutes_ago), queue="", completed=60, workers=2)
        MetricSample.objects.create(at=now - timedelta(minutes=minutes_ago), queue="high", depth=depth)
    # Three days ago: folded into an hourly row (60 minutes, 600 completed: 10 a minute), as the sampler leaves it.
    three_days = (now - timedelta(days=3)).replace(minute=0)
    MetricSample.objects.create(at=three_days, resolution=MetricSample.Resolution.HOUR, minutes=60, queue="",
                                completed=600, workers=3, processing_p95=4.0)
    MetricSample.objects.create(at=three_days, resolution=MetricSample.Resolution.HOUR, minutes=60, queue="high",
                                depth=40)
    client.force_login(support_user)

    def depths(span):
        response = client.get(reverse("admin:dashboard_history"), {"range": span})
        assert response.status_code == 200, response.content
        return response.json()

    assert depths("1h")["series"]["depth:high"] == [5] and depths("1h")["seconds"] == 3600
    assert depths("6h")["series"]["depth:high"] == [7, 5]
    assert depths("24h")["series"]["depth:high"] == [9, 7, 5]
    week = depths("7d")
    assert week["range"] == "7d" and week["seconds"] == 7 * 86400
    assert week["series"]["depth:high"] == [40, 9, 7, 5]  # one point per hour
    assert week["series"]["completed"][0] == 10 and week["series"]["processing_p95"][0] == 4.0
    assert week["times"][0] == (three_days + timedelta(hours=1)).timestamp()  # drawn at the end of its hour
    wrong = client.get(reverse("admin:dashboard_history"), {"range": "2w"})
    assert wrong.status_code == 400 and wrong.json() == {"error": "range: must be one of 1h, 6h, 24h, 7d; got '2w'",
                                                         "field": "range"}
