"""The old system's JSON shapes (../shared/seeds/000-rq-monitoring-integration.md): every key path the document's
endpoint answers with is in the portal's live answer, with the same type. The examples below are the documents'
dicts written out (the seed builds them in Flask views); where the seeds are beside the checkout, a test also
checks that every key named here is in the document, so the transcription cannot drift."""

from pathlib import Path

import pytest
from django.conf import settings
from django.core.cache import cache
from django.urls import reverse

from monitoring.metrics.views import HEALTH_CACHE_KEY

SEED_000 = Path(settings.BASE_DIR).parent / "shared" / "seeds" / "000-rq-monitoring-integration.md"

# get_rq_health(): health_status, with one issue and a worker count (both appear in the document's code).
HEALTH_EXAMPLE = {
    "timestamp": "2026-12-01T10:00:00",
    "overall_status": "warning",
    "components": {"redis": "healthy", "database": "healthy", "workers": "warning"},
    "issues": ["No active workers found"],
    "worker_count": 0,
}

# get_rq_metrics(): metrics, for a fleet with one worker and tasks of each status the document counts.
METRICS_EXAMPLE = {
    "timestamp": "2026-12-01T10:00:00",
    "queues": {"by_priority": {"urgent": 4, "high": 0, "normal": 0, "low": 0}, "total_queued": 4, "failed_jobs": 0},
    "workers": {"active_count": 1, "worker_ids": ["rq:workers:normal"]},
    "tasks": {"queued": 4, "processing": 0, "completed": 0, "failed": 0},
    "redis": {"connected_clients": 3, "used_memory_human": "1.02M", "keyspace_hits": 10, "keyspace_misses": 2},
    "system": {"fallback_active": False, "health_status": "healthy"},
}

# get_performance_metrics(): performance_data (the document's figures were constants; ours come from samples).
PERFORMANCE_EXAMPLE = {
    "timestamp": "2026-12-01T10:00:00",
    "period": "1 hour",
    "metrics": {"avg_processing_time": 45.2, "throughput": 12.5, "error_rate": 2.1, "queue_wait_time": 8.3},
    "trends": {"processing_time_trend": "stable", "throughput_trend": "increasing", "error_rate_trend": "decreasing"},
}

# get_rq_alerts(): one alert of the four the document checks, as it answers them.
ALERTS_EXAMPLE = {
    "alerts": [{"level": "warning", "message": "High queue backlog: 150 tasks", "timestamp": "2026-12-01T10:00:00",
                "metric": "queue_backlog", "value": 150, "threshold": 100}],
    "alert_count": 1,
    "timestamp": "2026-12-01T10:00:00",
}


@pytest.fixture
def staff_client(client, admin_user):
    client.force_login(admin_user)
    return client


def key_paths(value, prefix: str = "") -> dict[str, type]:
    """Each key path of a JSON value with the type found there: ``components.redis`` -> str, ``issues[]`` -> str."""
    found = {}
    if isinstance(value, dict):
        for key, inner in value.items():
            path = f"{prefix}.{key}" if prefix else key
            found[path] = dict if isinstance(inner, dict) else type(inner)
            found.update(key_paths(inner, path))
    elif isinstance(value, list) and value:
        found[f"{prefix}[]"] = type(value[0])
        found.update(key_paths(value[0], f"{prefix}[]"))
    return found


def missing_or_mistyped(example: dict, answer: dict) -> list[str]:
    answered = key_paths(answer)
    wrong = []
    for path, kind in key_paths(example).items():
        if path not in answered:
            wrong.append(f"{path}: missing")
        elif answered[path] is not kind:
            wrong.append(f"{path}: {answered[path].__name__}, the document has {kind.__name__}")
    return wrong


def test_key_paths_catch_a_missing_key_and_a_changed_type():
    example = {"components": {"redis": "healthy"}, "issues": ["x"], "worker_count": 1}
    assert missing_or_mistyped(example, {"components": {"redis": "healthy"}, "issues": ["y"], "worker_count": 3}) == []
    assert missing_or_mistyped(example, {"components": {"redis": {"status": "healthy"}}, "issues": ["y"],
                                         "worker_count": 3}) == ["components.redis: dict, the document has str"]
    assert missing_or_mistyped(example, {"components": {}, "issues": [], "worker_count": 3}) == [
        "components.redis: missing", "issues[]: missing"]


@pytest.mark.django_db
def test_health_answers_every_key_of_the_documents_health_check(staff_client, redis):
    """Redis and the database answer and no worker runs: the document's example is the same case (workers
    'warning' there, 'unhealthy' here: the README says why)."""
    cache.delete(HEALTH_CACHE_KEY)
    answer = staff_client.get(reverse("api-health")).json()
    assert missing_or_mistyped(HEALTH_EXAMPLE, answer) == []
    assert answer["overall_status"] == answer["status"] == "unhealthy"
    assert set(answer["components"]) >= {"redis", "database", "workers"}
    assert answer["components"]["workers"] == answer["component_details"]["workers"]["status"] == "unhealthy"
    assert answer["issues"] == [f"{name}: {detail['reason']}" for name, detail in answer["component_details"].items()
                                if detail["status"] != "healthy"]


@pytest.mark.django_db
def test_metrics_answer_every_key_of_the_documents_metrics(staff_client, redis, media_image,
                                                           django_capture_on_commit_callbacks):
    from queues import broker
    from queues.fleet.worker import CaptionWorker
    from queues.services import TaskSpec, tasks_submit_many

    with django_capture_on_commit_callbacks(execute=True):
        tasks_submit_many(specs=[TaskSpec(media_image(), priority="urgent") for _ in range(4)])
    worker = CaptionWorker(broker.get_queues(), connection=redis, name="contract-1")
    worker.register_birth()
    try:
        answer = staff_client.get(reverse("api-metrics")).json()
    finally:
        worker.register_death()
    assert missing_or_mistyped(METRICS_EXAMPLE, answer) == []
    assert answer["queues"]["by_priority"]["urgent"] == answer["queues"]["total_queued"] == 4
    assert answer["tasks"]["queued"] == 4 and answer["tasks"]["failed"] == 0
    assert answer["workers"]["active_count"] == 1 and answer["workers"]["worker_ids"] == ["contract-1"]
    assert answer["redis"]["keyspace_hits"] + answer["redis"]["keyspace_misses"] > 0
    assert answer["system"]["health_status"] in ("healthy", "warning", "unhealthy")


@pytest.mark.django_db
def test_performance_answers_every_key_of_the_documents_performance(staff_client):
    from datetime import timedelta

    from django.utils import timezone

    from tests.monitoring.test_history import fleet_rows

    fleet_rows(timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=60), [(10, 1, 1.0, 5)] * 60)
    answer = staff_client.get(reverse("api-performance"), {"window": "1h"}).json()
    assert missing_or_mistyped(PERFORMANCE_EXAMPLE, answer) == []
    assert answer["period"] == "1 hour"
    assert answer["metrics"]["error_rate"] == pytest.approx(100 / 11)  # percent, as the document has it
    assert answer["error_rate"] == pytest.approx(1 / 11)  # the portal's own: a fraction


@pytest.mark.django_db
@pytest.mark.usefixtures("seeded_alert_rules")
def test_alerts_answer_the_documents_metrics_with_its_values(staff_client, redis, media_image,
                                                             django_capture_on_commit_callbacks):
    """The four conditions the old endpoint checked, each firing: its metric names, and its figures (counts; the
    stuck tasks as a number of tasks, not the oldest one's age)."""
    from datetime import timedelta

    from django.utils import timezone

    from monitoring.alerts.evaluate import alerts_evaluate
    from monitoring.alerts.rules import Readings
    from monitoring.metrics.snapshot import Snapshot
    from monitoring.models import AlertRule
    from queues.models import CaptionTask, TaskStatus
    from queues.services import TaskSpec, tasks_submit_many

    names = ("no-active-workers", "backlog-high", "dead-letters-high", "processing-stuck")
    AlertRule.objects.exclude(name__in=names).update(enabled=False)
    AlertRule.objects.update(for_seconds=0)
    with django_capture_on_commit_callbacks(execute=True):
        tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(3)])
    now = timezone.now()
    CaptionTask.objects.update(status=TaskStatus.PROCESSING, started_at=now - timedelta(hours=3))
    state = Snapshot(redis_ok=True, database_ok=True, queue_lengths={"urgent": 0, "high": 0, "normal": 150, "low": 0},
                     dead_letters={"urgent": 0, "high": 0, "normal": 12, "low": 0}, workers=[],
                     oldest_processing_started=now - timedelta(hours=3))
    alerts_evaluate(now=now, readings=Readings(now=now, snapshot=state))
    answer = staff_client.get(reverse("api-alerts")).json()
    assert missing_or_mistyped(ALERTS_EXAMPLE, answer) == []
    by_metric = {alert["metric"]: (alert["level"], alert["value"], alert["threshold"]) for alert in answer["alerts"]}
    assert by_metric == {"active_workers": ("critical", 0, 1), "queue_backlog": ("warning", 150, 100),
                         "failed_jobs": ("error", 12, 10), "stuck_tasks": ("warning", 3, 0)}
    assert answer["alert_count"] == 4


@pytest.mark.django_db
@pytest.mark.usefixtures("seeded_alert_rules")
def test_the_documents_metric_names_belong_to_their_four_conditions_only(staff_client):
    """Every seeded rule on: one worker alive fires few-workers, not the document's "no active RQ workers"
    (active_workers), and 250 jobs in normal fire normal-backlog-high besides the document's backlog condition; a
    script that pages on ``metric == "active_workers"`` must not be woken by a fleet that still runs."""
    from django.utils import timezone

    from monitoring.alerts.evaluate import alerts_evaluate
    from monitoring.alerts.rules import Readings
    from monitoring.metrics.snapshot import Snapshot
    from monitoring.models import AlertRule

    AlertRule.objects.update(for_seconds=0)
    now = timezone.now()
    worker = {"name": "w-1", "state": "idle", "alive": True, "successful": 0, "failed": 0, "host": "h",
              "pool": "default", "rss": None, "slots": 1, "busy_slots": 0}
    state = Snapshot(redis_ok=True, database_ok=True, queue_lengths={"urgent": 0, "high": 0, "normal": 250, "low": 0},
                     dead_letters={"urgent": 0, "high": 0, "normal": 0, "low": 0}, workers=[worker])
    alerts_evaluate(now=now, readings=Readings(now=now, snapshot=state))
    metrics = sorted(alert["metric"] for alert in staff_client.get(reverse("api-alerts")).json()["alerts"])
    assert {"few-workers", "normal-backlog-high", "queue_backlog"} <= set(metrics), metrics
    assert "active_workers" not in metrics and metrics.count("queue_backlog") == 1, metrics


@pytest.mark.skipif(not SEED_000.exists(), reason="the seed documents are not beside this checkout")
def test_the_examples_name_only_keys_the_document_names():
    text = SEED_000.read_text()
    for path in [*key_paths(HEALTH_EXAMPLE), *key_paths(METRICS_EXAMPLE), *key_paths(PERFORMANCE_EXAMPLE),
                 *key_paths(ALERTS_EXAMPLE)]:
        key = path.replace("[]", "").rsplit(".", 1)[-1]
        if key in ("urgent", "high", "normal", "low", "queued", "processing", "completed", "failed"):
            assert key in text.lower(), f"{key!r} is not in {SEED_000.name}"  # a queue or a status, not a literal key
        else:
            assert f"'{key}'" in text, f"{key!r} is not in {SEED_000.name}"


@pytest.mark.django_db
def test_the_old_health_and_stats_paths_answer_what_the_runbooks_read(staff_client, redis):
    """Seed 001 reads `/health | jq .status`, `/admin/rq/health | jq .workers` and `/admin/rq/stats | jq .queues`;
    seed 000's exporter reads `status` and `fallback_active` from /admin/rq/health. The portal's own views answer
    them (django-rq's pages stay unserved)."""
    from queues import broker
    from queues.fleet.worker import CaptionWorker

    worker = CaptionWorker(broker.get_queues(), connection=redis, name="runbook-1")
    worker.register_birth()
    try:
        cache.delete(HEALTH_CACHE_KEY)
        health = staff_client.get("/health")
        assert health.json()["status"] == health.json()["overall_status"]
        assert missing_or_mistyped(HEALTH_EXAMPLE, health.json()) == []
        admin_health = staff_client.get("/admin/rq/health").json()
        assert admin_health["workers"]["worker_ids"] == ["runbook-1"] and admin_health["workers"]["active_count"] == 1
        assert isinstance(admin_health["fallback_active"], bool) and admin_health["status"] == health.json()["status"]
        stats = staff_client.get("/admin/rq/stats")
        assert stats.status_code == 200 and missing_or_mistyped(METRICS_EXAMPLE["queues"], stats.json()["queues"]) == []
    finally:
        worker.register_death()


@pytest.mark.django_db
def test_the_old_paths_need_the_same_access_as_the_apis(client, outsider_user):
    for path in ("/health", "/admin/rq/health", "/admin/rq/stats"):
        anonymous = client.get(path)
        assert anonymous.status_code == 401 and "error" in anonymous.json(), path
    client.force_login(outsider_user)
    for path in ("/health", "/admin/rq/health", "/admin/rq/stats"):
        assert client.get(path).status_code == 403, path
