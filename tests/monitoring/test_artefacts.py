"""The exported Prometheus rules and Grafana dashboard: valid, and naming only metrics the portal serves."""

import json
import re
import subprocess

import pytest
import yaml
from django.core.management import call_command
from django.urls import reverse
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import tool_or_skip

# The seeded rule rows as Prometheus sees them: alert name and "for" (None: fires at once).
REQUIRED_ALERTS = {"RQNoActiveWorkers": None, "RQRedisUnreachable": None, "RQDatabaseUnreachable": None,
                   "RQHealthUnhealthy": None, "RQBacklogHigh": "15m", "RQDeadLettersHigh": "30m",
                   "RQProcessingSlow": "1h", "RQProcessingStuck": None, "RQRedisMemoryHigh": "1h",
                   "RQThroughputLow": "2h", "RQErrorRateHigh": "30m", "RQNormalBacklogHigh": None,
                   "RQFewWorkers": "5m", "RQWorkersSaturated": "5m", "RQSuccessRateLow": "5m", "RQWaitLong": None,
                   "RQRedisClientsHigh": None, "RQFallbackActive": "2m"}
PROMQL_WORDS = {"sum", "rate", "max", "by", "le", "histogram_quantile", "clamp_min", "deriv", "and", "on", "bool",
                "queue", "status", "e", "completed", "failed", "retried", "worker_lost", "increase", "scalar"}


@pytest.fixture
def served_metric_names(client, admin_user, redis, monkeypatch):
    from monitoring.metrics import hosts
    from monitoring.metrics.monitors import EVALUATOR, SAMPLER, monitor_pass
    from monitoring.metrics.recorder import (
        BUFFER,
        record_attempt,
        record_fleet_event,
        report_pool_use,
    )
    from tests.monitoring.test_metric_series import start_worker

    for monitor in (SAMPLER, EVALUATOR):  # their figures are served once they have passed
        monitor_pass(monitor, holder="host-a:1", interval=10)
    # A worker alive, its host reported, an error and a crash counted: every family a panel or rule reads has samples.
    worker = start_worker(redis, "default-artefacts", done=1)
    try:
        record_attempt(queue="normal", outcome="retry", processing_seconds=1.0, wait_seconds=0.1,
                       error_class="CaptionTimeout")
        record_fleet_event(kind="worker_crashed", pool="default")
        # This process' CPU meter reports once it is a second old; run alone, the test's meter would be new.
        monkeypatch.setattr(hosts, "CPU_INTERVAL_MIN", 0)
        report_pool_use()
        BUFFER.flush()
        client.force_login(admin_user)
        names = set()
        for family in text_string_to_metric_families(client.get(reverse("metrics")).content.decode()):
            names.update(sample.name for sample in family.samples)
    finally:
        worker.register_death()
    return names


def metric_names_in(expression: str) -> set[str]:
    return {word for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expression)
            if word.startswith("rq") and word not in PROMQL_WORDS}


@pytest.mark.django_db
@pytest.mark.usefixtures("seeded_alert_rules")  # a transactional test before may have emptied them
def test_rules_cover_the_alerting_guide_and_name_served_metrics(tmp_path, capsys, served_metric_names):
    call_command("export_prometheus_rules")
    rules = yaml.safe_load(capsys.readouterr().out)
    recorded = {rule["record"] for rule in rules["groups"][0]["rules"]}
    alerts = {rule["alert"]: rule for rule in rules["groups"][1]["rules"]}
    assert {name: alerts[name].get("for") for name in REQUIRED_ALERTS} == REQUIRED_ALERTS
    assert alerts["RQBacklogHigh"]["expr"] == "(sum(rq_queue_length)) > 100"
    assert alerts["RQNormalBacklogHigh"]["expr"] == '(sum(rq_queue_length{queue="normal"})) > 200'
    assert "< 0.95" in alerts["RQSuccessRateLow"]["expr"]
    assert alerts["RQBacklogHigh"]["labels"] == {"severity": "warning", "component": "queues", "rule": "backlog-high",
                                                 "notified_by": "portal"}
    watchers = {rule["alert"]: rule for rule in rules["groups"][2]["rules"]}
    assert watchers["RQWatchdog"]["expr"] == "vector(1)"
    assert watchers["RQPortalMonitoringDown"]["labels"]["notified_by"] == "alertmanager"
    assert alerts["RQBacklogHigh"]["annotations"]["runbook"].startswith("Scale the pools")
    assert "/admin/monitoring/alertrule/" in alerts["RQBacklogHigh"]["annotations"]["runbook_url"]
    for rule in rules["groups"][0]["rules"] + rules["groups"][1]["rules"] + rules["groups"][2]["rules"]:
        unknown = metric_names_in(rule["expr"]) - served_metric_names - recorded
        assert not unknown, (rule, unknown)
    output = tmp_path / "rules.yml"
    call_command("export_prometheus_rules", "--output", str(output))
    assert yaml.safe_load(output.read_text()) == rules


@pytest.mark.django_db
@pytest.mark.usefixtures("seeded_alert_rules")  # a transactional test before may have emptied them
def test_the_exported_rules_follow_the_rule_rows(capsys):
    from monitoring.models import AlertRule

    AlertRule.objects.filter(name="backlog-high").update(threshold=250, for_seconds=90)
    AlertRule.objects.filter(name="wait-long").update(enabled=False)
    call_command("export_prometheus_rules")
    alerts = {rule["alert"]: rule for rule in yaml.safe_load(capsys.readouterr().out)["groups"][1]["rules"]}
    assert alerts["RQBacklogHigh"]["expr"].endswith("> 250") and alerts["RQBacklogHigh"]["for"] == "90s"
    assert alerts["RQBacklogHigh"]["keep_firing_for"] == "1m", "the portal's clear time, so both resolve alike"
    assert "RQWaitLong" not in alerts
    call_command("export_prometheus_rules", "--max-for", "2")
    alerts = {rule["alert"]: rule for rule in yaml.safe_load(capsys.readouterr().out)["groups"][1]["rules"]}
    assert {rule.get("for") for rule in alerts.values()} == {None, "2s"}
    assert {rule.get("keep_firing_for") for rule in alerts.values()} == {"2s"}


@pytest.mark.django_db
@pytest.mark.usefixtures("seeded_alert_rules")  # a transactional test before may have emptied them
def test_promtool_accepts_the_rules(tmp_path):
    promtool = tool_or_skip("promtool", "prometheus")
    output = tmp_path / "rules.yml"
    call_command("export_prometheus_rules", "--output", str(output))
    result = subprocess.run([promtool, "check", "rules", str(output)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    from monitoring.metrics.exports import RECORDING_RULES
    from monitoring.models import AlertRule

    # The recording rules, one alerting rule per enabled rule row, the watchdog and RQPortalMonitoringDown.
    expected = len(RECORDING_RULES) + AlertRule.objects.filter(enabled=True).count() + 2
    assert f"SUCCESS: {expected} rules found" in result.stdout


@pytest.mark.django_db
def test_dashboard_structure_and_metrics(capsys, served_metric_names):
    call_command("export_grafana_dashboard")
    dashboard = json.loads(capsys.readouterr().out)
    assert dashboard["uid"] and dashboard["title"] == "RQ Ops Portal" and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    # Grafana's current panel types (no graph or singlestat, which Grafana 11 no longer draws).
    assert {panel["type"] for panel in panels} == {"timeseries", "stat", "gauge", "piechart"}
    assert len({panel["id"] for panel in panels}) == len(panels) and all(isinstance(panel["id"], int)
                                                                         for panel in panels)
    assert dashboard["time"] == {"from": "now-1h", "to": "now"}  # the documents' range
    # Provisioning reads the datasource variable each panel names; panels do not overlap on the 24-column grid.
    assert [variable["name"] for variable in dashboard["templating"]["list"]] == ["datasource"]
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        assert panel["datasource"]["uid"] == "${datasource}"
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"])
    by_title = {panel["title"]: panel for panel in panels}
    steps = by_title["Success rate (5 m)"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [(step["color"], step["value"]) for step in steps] == [("red", None), ("yellow", 0.9), ("green", 0.95)]
    assert by_title["System health"]["targets"][0]["expr"] == "rq_system_health"
    call_command("export_prometheus_rules")
    recorded = {rule["record"] for rule in yaml.safe_load(capsys.readouterr().out)["groups"][0]["rules"]}
    titles = " ".join(panel["title"] for panel in panels).lower()
    for topic in ("queue length", "processing", "wait", "throughput", "success", "workers", "busy", "dead letters",
                  "redis memory", "system health", "task status distribution", "p99", "worker cpu", "worker memory",
                  "active tasks"):
        assert topic in titles, topic
    for panel in panels:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["targets"]
        for target in panel["targets"]:
            assert not metric_names_in(target["expr"]) - served_metric_names - recorded, target


def test_export_to_an_unwritable_place_is_a_clear_error(tmp_path):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="Cannot write"):
        call_command("export_grafana_dashboard", "--output", str(tmp_path / "missing" / "dir" / "x.json"))
