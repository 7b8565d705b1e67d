"""The fleet under /api/v1/: pools listed, one scaled within its bounds, a pool's or one worker's graceful
restart; the fleet services and permission of the admin's buttons, audited via the token."""

import pytest

from queues import broker
from queues.fleet.worker import CaptionWorker
from queues.models import AuditEntry, FleetEvent, WorkerPool

pytestmark = pytest.mark.django_db


@pytest.fixture
def pool(db):
    pool, _ = WorkerPool.objects.update_or_create(
        name="default", defaults={"queues": "urgent high normal low", "desired": 2, "minimum": 1, "maximum": 6})
    return pool


def test_pools_are_listed_and_one_is_scaled_within_its_bounds(as_operator, as_support, operator_user, pool, redis):
    listed = as_support.get("/api/v1/pools").json()
    assert [(row["name"], row["queues"], row["desired"]) for row in listed] == [
        ("default", ["urgent", "high", "normal", "low"], 2)]
    response = as_operator.post("/api/v1/pools/default/scale", {"count": 5})
    assert response.status_code == 200 and response.json()["desired"] == 5 and response.json()["previous"] == 2
    assert WorkerPool.objects.get(name="default").desired == 5
    entry = AuditEntry.objects.get(action="pool_scale")
    assert entry.user == operator_user and entry.detail["via"] == "API token deploy hook"
    refused = as_operator.post("/api/v1/pools/default/scale", {"count": 9})
    assert refused.status_code == 400 and refused.json()["field"] == "count"
    assert "between 1 and 6" in refused.json()["error"] and WorkerPool.objects.get(name="default").desired == 5
    assert as_operator.post("/api/v1/pools/nightly/scale", {"count": 1}).status_code == 404
    assert as_support.post("/api/v1/pools/default/scale", {"count": 3}).status_code == 403


def test_a_pool_and_a_worker_restart_gracefully(as_operator, pool, redis):
    worker = CaptionWorker(broker.get_queues(), connection=broker.get_connection(), name="default.api.1")
    worker.register_birth()
    try:
        response = as_operator.post("/api/v1/workers/default.api.1/restart")
        assert response.status_code == 202 and response.json() == {"restarting": 1}
        assert FleetEvent.objects.filter(kind=FleetEvent.Kind.RESTART_REQUESTED, worker_name="default.api.1").exists()
        assert as_operator.post("/api/v1/pools/default/restart").status_code == 202
        assert FleetEvent.objects.filter(kind=FleetEvent.Kind.RESTART_REQUESTED, pool__name="default").exists()
        assert as_operator.post("/api/v1/workers/nobody/restart").status_code == 404
    finally:
        worker.register_death()
