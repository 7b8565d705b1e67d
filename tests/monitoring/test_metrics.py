"""/metrics, /readyz and the JSON APIs against real Redis and database state."""

import json
import socket
import time

import pytest
from django.core.cache import cache
from django.urls import reverse
from prometheus_client.parser import text_string_to_metric_families

from monitoring.metrics import recorder
from monitoring.metrics.monitors import monitor_pass
from queues import broker
from queues.fleet.worker import CaptionWorker
from queues.services import TaskSpec, task_submit, tasks_submit_many
from tests.conftest import respond, run_worker

TOKEN = "s3cret-token-for-prometheus"


def samples(client, **headers) -> dict:
    response = client.get(reverse("metrics"), **headers)
    assert response.status_code == 200, response.content
    values = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(values, name, **labels):
    return values[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def staff_client(client, admin_user):
    client.force_login(admin_user)
    return client


@pytest.mark.django_db
@pytest.mark.parametrize("url_name", ["metrics", "api-health", "api-metrics"])
def test_access_rule(client, settings, redis, outsider_user, admin_user, url_name):
    settings.METRICS_TOKEN = TOKEN
    url = reverse(url_name)
    anonymous = client.get(url)
    assert anonymous.status_code == 401 and "Bearer" in anonymous["WWW-Authenticate"]
    assert "authentication required" in anonymous.json()["error"]
    assert client.get(url, HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get(url, HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code in (200, 503)
    client.force_login(outsider_user)
    assert client.get(url).status_code == 403
    client.force_login(admin_user)
    assert client.get(url).status_code in (200, 503)


@pytest.mark.django_db
@pytest.mark.parametrize("url_name", ["metrics", "api-health", "api-metrics", "api-performance"])
def test_sessions_need_the_queue_view_permission_not_just_staff(client, redis, django_user_model, support_user,
                                                                 url_name):
    url = reverse(url_name)
    staff_only = django_user_model.objects.create_user(username="stan-staff", password="pw", is_staff=True)
    client.force_login(staff_only)
    refused = client.get(url)
    assert refused.status_code == 403
    assert refused.json() == {"error": "reading metrics needs the queues.view_queueoverview permission"}
    client.force_login(support_user)  # read-only, but may view the queues
    assert client.get(url).status_code in (200, 503)


@pytest.mark.django_db
def test_token_does_nothing_when_none_is_configured(client, settings, redis):
    settings.METRICS_TOKEN = None
    assert client.get(reverse("metrics"), HTTP_AUTHORIZATION="Bearer anything").status_code == 403


@pytest.mark.django_db(transaction=True)
def test_queue_task_and_histogram_families_follow_real_state(staff_client, redis, media_image, http_server,
                                                             settings):
    settings.RQ_MAX_RETRIES = 0
    reference = media_image()
    tasks_submit_many(specs=[TaskSpec(reference, priority="low") for _ in range(3)])
    task_submit(image_ref=http_server.route("/gone.png", respond(404, b"gone")), priority="high")
    values = samples(staff_client)
    assert value(values, "rq_queue_length", queue="low") == 3
    assert value(values, "rq_queue_length", queue="high") == 1

    run_worker()
    values = samples(staff_client)
    assert value(values, "rq_queue_length", queue="low") == 0
    assert value(values, "rq_dead_letter_size", queue="high") == 1
    assert value(values, "rq_tasks_total", status="completed") == 3
    assert value(values, "rq_tasks_total", status="failed") == 1
    assert value(values, "rq_task_processing_seconds_count", queue="low") == 3
    assert value(values, "rq_task_processing_seconds_bucket", queue="low", le="+Inf") == 3
    assert value(values, "rq_task_processing_seconds_sum", queue="low") > 0
    assert value(values, "rq_task_wait_seconds_count", queue="low") == 3


@pytest.mark.django_db(transaction=True)
def test_retries_are_counted(staff_client, redis, http_server, settings):
    settings.RQ_RETRY_BACKOFF = 600
    task_submit(image_ref=http_server.route("/busy.png", respond(503, b"busy")))
    run_worker()
    values = samples(staff_client)
    assert value(values, "rq_task_retries_total") == 1
    assert value(values, "rq_tasks_total", status="retried") == 1


@pytest.mark.django_db
def test_workers_health_and_redis_figures(staff_client, redis):
    values = samples(staff_client)
    assert value(values, "rq_workers_active") == 0 and value(values, "rq_system_health") == 0
    worker = CaptionWorker(broker.get_queues(), connection=redis, name="metrics-test-worker", pool="default")
    worker.register_birth()
    try:
        values = samples(staff_client)
        assert value(values, "rq_workers_active") == 1 and value(values, "rq_system_health") == 1
        assert value(values, "rq_worker_busy_ratio") == 0
        assert value(values, "rq_worker_memory_bytes", pool="default", host=socket.gethostname()) > 10_000_000
        assert value(values, "rq_redis_used_memory_bytes") > 0
        assert value(values, "rq_redis_connected_clients") >= 1
        assert value(values, "rq_redis_maxclients") > 0
        assert value(values, "rq_fallback_active") == 0
    finally:
        worker.register_death()


@pytest.mark.django_db
def test_scrape_cost_does_not_grow_with_jobs(staff_client, redis, media_image, django_assert_max_num_queries,
                                             django_capture_on_commit_callbacks):
    def commands_for_one_scrape():
        # What this process buffered meanwhile (the submissions' own counter) goes first: a scrape writes it in its
        # pipeline, one command whatever the number of tasks, but that is the submission's cost, not the scrape's.
        recorder.BUFFER.flush()
        before = {k: v["calls"] for k, v in redis.info("commandstats").items()}
        # Two indexed reads (overdue unpublished tasks; the oldest PROCESSING task), the dispatch mode row (a
        # primary-key read), the worker pools (a few rows: rq_pool_desired_workers, rq_pool_backlog) and the two
        # rows of the portal's own monitors, 2 for the session and user, 2 for the user's and its groups'
        # permissions (the view permission check)
        with django_assert_max_num_queries(5 + 2 + 2):
            samples(staff_client)
        after = {k: v["calls"] for k, v in redis.info("commandstats").items()}
        return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}

    reference = media_image()
    with django_capture_on_commit_callbacks(execute=True):
        tasks_submit_many(specs=[TaskSpec(reference) for _ in range(10)])
    samples(staff_client)  # adds what this process had buffered from earlier tests
    small = commands_for_one_scrape()
    with django_capture_on_commit_callbacks(execute=True):
        tasks_submit_many(specs=[TaskSpec(reference) for _ in range(2000)])
    large = commands_for_one_scrape()
    for measured in (small, large):
        measured.pop("cmdstat_info", None)  # commandstats itself
        # The Redis pool reports (metrics.recorder, every 5 s from a thread) and a scrape's removal of reports
        # of processes that are gone: neither depends on the jobs.
        measured.pop("cmdstat_hset", None), measured.pop("cmdstat_hdel", None)
        # A connection some thread of this process opened meanwhile (its handshake): not a cost of the jobs either.
        for handshake in ("hello", "ping", "select", "auth", "client|setinfo", "client|setname"):
            measured.pop(f"cmdstat_{handshake}", None)
    assert small == large
    assert not {"cmdstat_keys", "cmdstat_lrange", "cmdstat_zremrangebyscore", "cmdstat_scan"} & set(large)


@pytest.fixture(autouse=True)
def fresh_health(monkeypatch):
    """Each test sees the health of its own state, not a report cached by the previous test."""
    from monitoring.metrics import views

    monkeypatch.setattr(views, "HEALTH_CACHE_SECONDS", 0.0)
    cache.delete(views.HEALTH_CACHE_KEY)


@pytest.mark.django_db
def test_health_report_is_cached_for_a_second(staff_client, redis, monkeypatch):
    from monitoring.metrics import views

    monkeypatch.setattr(views, "HEALTH_CACHE_SECONDS", 1.0)
    first = staff_client.get(reverse("api-health")).json()
    worker = CaptionWorker(broker.get_queues(), connection=redis, name="cache-test")
    worker.register_birth()
    try:
        assert staff_client.get(reverse("api-health")).json()["checked_at"] == first["checked_at"]
        cache.delete(views.HEALTH_CACHE_KEY)  # as when the second is over
        assert staff_client.get(reverse("api-health")).json()["worker_count"] == 1
    finally:
        worker.register_death()


@pytest.mark.django_db
def test_health_api_reports_each_component(staff_client, redis):
    response = staff_client.get(reverse("api-health"))
    report = response.json()
    assert response.status_code == 503 and report["status"] == "unhealthy"
    assert report["component_details"]["redis"] == {"status": "healthy", "reason": "answers"}
    assert report["components"]["database"] == "healthy"
    assert report["component_details"]["workers"] == {"status": "unhealthy", "reason": "no worker is alive"}
    assert report["components"]["workers"] == "unhealthy" and "workers: no worker is alive" in report["issues"]
    workers = [CaptionWorker(broker.get_queues(), connection=redis, name=f"health-{index}") for index in range(2)]
    for worker in workers:
        worker.register_birth()
    for monitor, interval in (("sampler", 60), ("evaluator", 10)):  # the portal's own monitors run too
        monitor_pass(monitor, holder="host-a:1", interval=interval)
    try:
        response = staff_client.get(reverse("api-health"))
        assert response.status_code == 200 and response.json()["status"] == "healthy", response.json()
        assert response.json()["worker_count"] == 2
    finally:
        for worker in workers:
            worker.register_death()


@pytest.mark.django_db
def test_apis_with_redis_stopped(staff_client, redis_server_factory, media_image,
                                 django_capture_on_commit_callbacks):
    server = redis_server_factory("health")
    server.stop()
    with django_capture_on_commit_callbacks(execute=True):  # kept in the database while Redis is down
        tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(3)])
    health = staff_client.get(reverse("api-health"))
    assert health.status_code == 503
    assert health.json()["components"]["redis"] == "unhealthy"
    assert "Redis is unreachable" in health.json()["component_details"]["redis"]["reason"]
    assert health.json()["fallback_active"] is True
    ready = staff_client.get(reverse("readyz"))
    assert ready.status_code == 503 and ready.json() == {"status": "unavailable", "reasons": ["redis_unreachable"]}
    metrics = staff_client.get(reverse("api-metrics"))
    assert metrics.status_code == 503 and metrics.json()["redis_reachable"] is False
    assert metrics.json()["error"].startswith("Redis is unreachable")
    assert metrics.json()["tasks"]["queued"] == 3  # what the database knows is still reported
    values = samples(staff_client)
    assert value(values, "rq_system_health") == 0 and value(values, "rq_fallback_active") == 1
    server.start()
    broker.reset_connection()
    assert staff_client.get(reverse("readyz")).status_code == 200
    # The errors seen while Redis was down were kept and counted once it was back.
    values = samples(staff_client)
    assert value(values, "rq_redis_connection_errors_total") >= 1


@pytest.mark.django_db
def test_metrics_api_shape(staff_client, redis, media_image, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        tasks_submit_many(specs=[TaskSpec(media_image(), priority="urgent") for _ in range(4)])
    body = staff_client.get(reverse("api-metrics")).json()
    assert body["queue_details"]["urgent"] == {"length": 4, "dead_letters": 0}
    assert body["totals"]["queued_jobs"] == 4 and body["tasks"]["queued"] == 4
    assert {count for status, count in body["tasks"].items() if status != "queued"} == {0}
    assert body["workers"]["active"] == 0 and body["redis"]["used_memory"] > 0


def test_healthz_needs_nothing(client):
    assert client.get(reverse("healthz")).json() == {"status": "ok"}


@pytest.fixture
def unreachable_database():
    """Points the default connection at a database that cannot be reached (a file in a missing directory for
    SQLite, a port where nothing listens for MySQL), so the real driver raises its own error, path or host in it."""
    from django.db import connection

    from portal.embedded_redis import free_port

    saved = dict(connection.settings_dict)
    connection.close()
    if connection.vendor == "sqlite":
        connection.settings_dict["NAME"] = "/nonexistent-portal-dir/secret-name.sqlite3"
    else:
        connection.settings_dict.update(HOST="127.0.0.1", PORT=str(free_port()))
    yield
    connection.close()
    connection.settings_dict.clear()
    connection.settings_dict.update(saved)


@pytest.mark.django_db(transaction=True)
def test_readyz_answers_reason_codes_only_to_anonymous_callers(client, unreachable_redis, unreachable_database):
    response = client.get(reverse("readyz"))
    assert response.status_code == 503
    # No driver message, file path, host or port: /readyz needs no credentials.
    assert response.json() == {"status": "unavailable", "reasons": ["database_unreachable", "redis_unreachable"]}


@pytest.mark.django_db
def test_readyz_is_ready_when_database_and_redis_answer(client, redis):
    response = client.get(reverse("readyz"))
    assert response.status_code == 200 and response.json() == {"status": "ready"}


@pytest.mark.django_db
def test_http_database_and_cache_families_of_the_serving_process(staff_client, redis, monkeypatch):
    from monitoring.metrics import views

    def total(values, name, **labels):  # summed over the label values not given
        return sum(number for (sample, pairs), number in values.items()
                   if sample == name and all(dict(pairs).get(k) == v for k, v in labels.items()))

    monkeypatch.setattr(views, "HEALTH_CACHE_SECONDS", 60.0)
    before = samples(staff_client)
    staff_client.get(reverse("api-health"))  # computed: a cache miss and database queries
    staff_client.get(reverse("api-health"))  # answered from the cache: a hit
    after = samples(staff_client)
    assert total(after, "django_cache_get_total") - total(before, "django_cache_get_total") == 2
    assert total(after, "django_cache_get_hits_total") - total(before, "django_cache_get_hits_total") == 1
    vendor = connection_vendor()
    assert total(after, "django_db_execute_total", vendor=vendor) > total(before, "django_db_execute_total",
                                                                           vendor=vendor)
    # The first scrape and the two health requests (503: no worker is alive) were counted after they answered.
    assert total(after, "django_http_responses_total_by_status_total", status="503") == \
        total(before, "django_http_responses_total_by_status_total", status="503") + 2
    assert total(after, "django_http_responses_total_by_status_total", status="200") == \
        total(before, "django_http_responses_total_by_status_total", status="200") + 1


def connection_vendor() -> str:
    from django.db import connection

    return connection.vendor


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["/metrics", "/api/rq/health", "/api/rq/metrics", "/api/rq/performance", "/healthz"])
def test_other_methods_get_a_json_405(staff_client, url):
    response = staff_client.post(url)
    assert response.status_code == 405 and response["Allow"] == "GET, HEAD"
    assert response.json() == {"error": f"POST is not allowed on {url}; use GET"}


@pytest.mark.django_db
def test_unknown_api_path_is_a_json_404_and_pages_keep_html(staff_client):
    response = staff_client.get("/api/rq/queues")
    assert response.status_code == 404 and response.json() == {"error": "no such endpoint: /api/rq/queues",
                                                               "field": None}
    page = staff_client.get("/no-such-page/")
    assert page.status_code == 404 and page["Content-Type"].startswith("text/html")


def test_server_error_answer_is_json_on_machine_paths(rf):
    from portal.views import server_error

    response = server_error(rf.get("/api/rq/metrics"))
    assert response.status_code == 500 and response["Content-Type"] == "application/json"
    assert json.loads(response.content) == {"error": "internal error; the portal's log has the details", "field": None}
    assert server_error(rf.get("/admin/")).status_code == 500


@pytest.mark.django_db
def test_scrape_waits_for_a_flush_under_way(staff_client, redis):
    """The process's background flusher takes the buffered increments and then writes them; a scrape in between
    must not report the counters without them (it saw 0 completed tasks right after a worker ended 3 in CI)."""
    import threading

    from monitoring.metrics.recorder import BUFFER, record_attempt

    BUFFER.take()
    before = value(samples(staff_client), "rq_tasks_total", status="completed")
    for _ in range(3):
        record_attempt(queue="low", outcome="completed", processing_seconds=0.2, wait_seconds=0.01)
    redis.execute_command("CLIENT", "PAUSE", 700, "WRITE")  # the flush's HINCRBYs wait; reads are served
    flusher = threading.Thread(target=BUFFER.flush)
    flusher.start()
    try:
        deadline = time.monotonic() + 5
        while BUFFER._amounts and time.monotonic() < deadline:  # the flush has taken the increments
            time.sleep(0.005)
        values = samples(staff_client)
    finally:
        flusher.join()
    assert value(values, "rq_tasks_total", status="completed") == before + 3
    assert value(values, "rq_task_processing_seconds_count", queue="low") >= 3
