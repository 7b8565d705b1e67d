"""What the series of /metrics look like to Prometheus: stable labels across worker restarts, names promtool accepts,
outages counted once."""

import socket
import subprocess

import pytest
from django.urls import reverse
from prometheus_client.parser import text_string_to_metric_families

from queues import broker
from queues.fleet.worker import CaptionWorker
from tests.conftest import tool_or_skip


@pytest.fixture
def staff_client(client, admin_user):
    client.force_login(admin_user)
    return client


def scrape(client) -> str:
    response = client.get(reverse("metrics"))
    assert response.status_code == 200, response.content
    return response.content.decode()


def series(client, prefix: str) -> dict:
    """{(sample name, labels): value} of the samples whose name starts with ``prefix``."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(scrape(client))
            for sample in family.samples if sample.name.startswith(prefix)}


def start_worker(redis, name: str, *, pool: str = "default", done: int = 0, failed: int = 0) -> CaptionWorker:
    worker = CaptionWorker(broker.get_queues(), connection=redis, name=name, pool=pool)
    worker.register_birth()
    redis.hset(worker.key, mapping={"successful_job_count": done, "failed_job_count": failed})
    return worker


@pytest.mark.django_db
def test_a_restarted_worker_keeps_its_pool_and_host_series(staff_client, redis):
    host = socket.gethostname()
    first = start_worker(redis, "default-7f3a91", done=5, failed=1)
    other = start_worker(redis, "default-0c44e2", done=2)
    try:
        before = series(staff_client, "rq_worker_")
        first.register_death()  # the supervisor restarts it: same pool, same host, a new random name
        first = start_worker(redis, "default-b81d07", done=0)
        after = series(staff_client, "rq_worker_")
    finally:
        first.register_death()
        other.register_death()
    labels = {labels for _, labels in before}
    assert labels == {labels for _, labels in after}
    assert all("worker" not in dict(pairs) for pairs in labels)
    # The per-worker figures are added up per pool and host.
    assert before[("rq_worker_tasks", (("host", host), ("outcome", "successful"), ("pool", "default")))] == 7
    assert before[("rq_worker_tasks", (("host", host), ("outcome", "failed"), ("pool", "default")))] == 1
    assert after[("rq_worker_tasks", (("host", host), ("outcome", "successful"), ("pool", "default")))] == 2
    memory = before[("rq_worker_memory_bytes", (("host", host), ("pool", "default")))]
    assert memory > 2 * 10_000_000  # two workers' resident memory (both are this test process)


@pytest.mark.django_db
def test_promtool_accepts_the_whole_scrape(staff_client, redis, monkeypatch):
    promtool = tool_or_skip("promtool", "prometheus")
    from monitoring.metrics import hosts
    from monitoring.metrics.recorder import (BUFFER, record_attempt, record_fleet_event, record_submitted,
                                             report_pool_use)

    # Every family with samples: workers alive, attempts recorded, submissions, errors, timeouts, crashes, the
    # processes' host figures, requests served, the health cache used.
    workers = [start_worker(redis, f"promtool-{index}", done=3, failed=1) for index in range(2)]
    try:
        record_attempt(queue="normal", outcome="completed", processing_seconds=0.4, wait_seconds=0.05)
        record_attempt(queue="low", outcome="retry", processing_seconds=1.2, wait_seconds=2.0,
                       error_class="CaptionTimeout")
        record_submitted(counts={"normal": 2})
        record_fleet_event(kind="worker_crashed", pool="default")
        record_fleet_event(kind="worker_restarted", pool="default")
        monkeypatch.setattr(hosts, "CPU_INTERVAL_MIN", 0)  # run alone, this process' CPU meter would be too new
        report_pool_use()
        BUFFER.flush()
        staff_client.get(reverse("api-health"))
        staff_client.get(reverse("api-metrics"))
        text = scrape(staff_client)
    finally:
        for worker in workers:
            worker.register_death()
    assert "rq_worker_tasks{" in text and "rq_task_processing_seconds_bucket" in text
    for family in ("rq_tasks_submitted_total{", "rq_task_errors_total{", "rq_task_timeouts_total{",
                   "rq_worker_crashes_total{", "rq_worker_restarts_total{", "rq_host_cpu_usage_ratio{",
                   "rq_host_memory_usage_ratio{", "rq_portal_process_memory_bytes{",
                   "rq_portal_process_cpu_usage_cores{", "rq_submission_paused "):
        assert family in text, family
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def redis_errors(client) -> float:
    return series(client, "rq_redis_connection_errors")[("rq_redis_connection_errors_total", ())]


@pytest.mark.django_db
def test_a_redis_outage_is_counted_once_per_process_however_long_it_lasts(staff_client, redis_server_factory):
    from monitoring.metrics.recorder import BUFFER, record_attempt

    server = redis_server_factory("outage")
    before = redis_errors(staff_client)  # Redis answers: this process sees it reachable
    for outage in (1, 2):
        server.stop()
        for _ in range(4):  # what a few seconds of outage bring: flushes, scrapes and health checks that fail
            record_attempt(queue="normal", outcome="completed", processing_seconds=0.3, wait_seconds=0.1)
            assert BUFFER.flush() is False
            staff_client.get(reverse("metrics"))
            staff_client.get(reverse("api-health"))
        server.start()
        broker.reset_connection()
        assert BUFFER.flush() is True  # what was buffered during the outage arrives now
        assert redis_errors(staff_client) == before + outage


@pytest.mark.django_db
def test_a_database_outage_is_counted_once_until_a_connection_succeeds_again(redis):
    from django.db import connections

    from monitoring.metrics.recorder import BUFFER, COUNTERS_KEY
    from queues.signals import service_unavailable

    def database_errors() -> float:
        BUFFER.flush()
        return float(redis.hget(COUNTERS_KEY, "database_errors") or 0)

    fresh = connections.create_connection("default")
    fresh.ensure_connection()  # this process reaches the database
    fresh.close()
    before = database_errors()
    for _ in range(5):  # the relay's passes while the database is down: one report each
        service_unavailable.send(sender=None, service="database", where="relay")
    assert database_errors() == before + 1
    fresh = connections.create_connection("default")
    fresh.ensure_connection()  # Django reconnected: the database is back
    fresh.close()
    service_unavailable.send(sender=None, service="database", where="relay")
    assert database_errors() == before + 2
