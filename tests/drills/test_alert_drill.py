"""Drill: Redis stops. The critical alert fires and is delivered once to each route; the alerts Redis being down
causes (no workers alive, health unhealthy) are recorded but page nobody; Redis starts again; the alert resolves
and the resolution is delivered once to each route. Real Redis, supervisors, workers and evaluator processes; the
Slack and webhook receivers are real local HTTP servers."""

from __future__ import annotations

import json
import time

import pytest

from monitoring.models import (
    Alert,
    AlertRule,
    DeliveryAttempt,
    Notification,
    NotificationChannel,
    NotificationRoute,
)
from queues.fleet.services import pool_scale
from tests.conftest import respond
from tests.processes import (
    Supervisors,
    live_workers,
    start_command,
    stop_process,
    wait_for,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow,
              pytest.mark.usefixtures("seeded_alert_rules")]


def messages(server, path):
    return [json.loads(request["body"]) for request in server.requests if request["path"] == path]


def slack_statuses(server):
    return [body["text"].split("]")[0].lstrip("[").split(":")[0] for body in messages(server, "/slack")]


@pytest.fixture
def seeded_alert_rules():
    from tests.conftest import alert_rules_seed

    alert_rules_seed()


def test_redis_stopped_pages_once_per_route_and_its_consequences_page_nobody(redis_server_factory, pool,
                                                                               http_server):
    server = redis_server_factory("alerts")
    # The drill's only shortening: alerts resolve 20 s after their condition ends, Redis' own 5 s after Redis
    # answers (60 s by default). The others then wait out their clear time un-inhibited: they must not page.
    AlertRule.objects.update(clear_seconds=20)
    AlertRule.objects.filter(name="redis-unreachable").update(clear_seconds=5)
    # The test machine's own CPU and memory are not what this drill is about (a loaded CI host keeps host-cpu-high
    # pending, and so open, for as long as the load lasts).
    AlertRule.objects.filter(component="hosts").update(enabled=False)
    # The drill's routes are its own. A fresh install's (migration 0014) are there when this is the first test of its
    # database, and MariaDB compares names without case: "everything to Slack" is this "everything to slack".
    NotificationRoute.objects.all().delete()
    pager = NotificationChannel.objects.create(name="pager hook", kind="webhook",
                                               config={"url": http_server.route("/pager", respond(200, b"{}"))})
    slack = NotificationChannel.objects.create(name="ops slack", kind="slack",
                                               config={"url": http_server.route("/slack", respond(200, b"ok"))})
    critical = NotificationRoute.objects.create(name="critical to the pager", position=1, severities=["critical"],
                                                group_wait_seconds=0, continue_matching=True)
    critical.channels.add(pager)
    everything = NotificationRoute.objects.create(name="everything to slack", position=2, group_wait_seconds=0)
    everything.channels.add(slack)

    group = Supervisors()
    evaluator = None
    try:
        group.start()
        pool_scale(pool=pool, desired=2)
        wait_for(lambda: len(live_workers()) == 2, 30, "two workers")
        evaluator = start_command("evaluate_alerts", "--interval", "0.5")
        time.sleep(3)
        assert not Alert.objects.filter(state=Alert.State.FIRING).exists(), list(Alert.objects.values("summary"))

        server.stop()
        wait_for(lambda: len(messages(http_server, "/pager")) >= 1 and len(messages(http_server, "/slack")) >= 1,
                 30, "the Redis alert delivered to both routes")
        time.sleep(8)  # repeated evaluations while Redis stays down
        redis_alert = Alert.objects.get(name="redis-unreachable")
        assert redis_alert.state == Alert.State.FIRING
        caused = Alert.objects.filter(name__in=["no-active-workers", "health-unhealthy"], state=Alert.State.FIRING)
        assert {alert.name for alert in caused} == {"no-active-workers", "health-unhealthy"}
        assert all(alert.inhibited_by_id == redis_alert.pk for alert in caused)
        assert [body["status"] for body in messages(http_server, "/pager")] == ["firing"]
        assert [body["alerts"][0]["name"] for body in messages(http_server, "/pager")] == ["redis-unreachable"]
        assert slack_statuses(http_server) == ["FIRING"]
        assert set(Notification.objects.values_list("alerts__name", flat=True)) == {"redis-unreachable"}
        assert set(DeliveryAttempt.objects.values_list("worker", flat=True)) == {"evaluator"}, \
            "Redis is down: the evaluator delivered itself"

        server.start()
        wait_for(lambda: Alert.objects.filter(pk=redis_alert.pk, state=Alert.State.RESOLVED).exists(), 30,
                 "the Redis alert resolved")
        wait_for(lambda: len(messages(http_server, "/pager")) == 2 and len(messages(http_server, "/slack")) == 2,
                 30, "the resolution delivered to both routes")
        wait_for(lambda: not Alert.objects.open().exists(), 60, "every alert resolved")
        time.sleep(2)
        assert [body["status"] for body in messages(http_server, "/pager")] == ["firing", "resolved"]
        assert slack_statuses(http_server) == ["FIRING", "RESOLVED"]
        assert set(Notification.objects.values_list("alerts__name", flat=True)) == {"redis-unreachable"}, \
            "nothing else paged"
        assert Notification.objects.filter(status=Notification.Status.DELIVERED).count() == 4
        resolved_by = set(DeliveryAttempt.objects.filter(notification__kind="resolved").values_list("worker",
                                                                                                    flat=True))
        assert resolved_by and "evaluator" not in resolved_by, "Redis is back: the workers delivered the resolution"
    finally:
        if evaluator is not None:
            stop_process(evaluator, grace=20)
        group.stop_all()
