"""Prometheus' twin of the monitoring-stale rule, run by ``promtool test rules`` on the exported rules file: it
fires when a monitor never ran while the other has been passing (its series is absent, so the ratio of its age to
its interval says nothing), and not at a start or for a Prometheus that scrapes no portal."""

import subprocess

import pytest
import yaml
from django.core.management import call_command

from monitoring.alerts.exports import prometheus_alerting_rules
from tests.conftest import tool_or_skip

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("seeded_alert_rules")]

LAST_PASS = "rq_monitor_last_pass_timestamp_seconds"
INTERVAL = "rq_monitor_interval_seconds"


def passing(monitor: str, interval: float, *, from_minute: int = 0) -> list[dict]:
    """A monitor passing every minute from ``from_minute`` on: its last pass is always now (Unix time = test time)."""
    missing = "_ " * from_minute
    return [{"series": f'{LAST_PASS}{{monitor="{monitor}"}}', "values": f"{missing}{from_minute * 60}+60x20"},
            {"series": f'{INTERVAL}{{monitor="{monitor}"}}', "values": f"{missing}{interval:g}x20"}]


def test_the_twin_fires_when_a_monitor_never_ran_while_the_other_passes(settings, tmp_path):
    settings.ALERTS_EVALUATION_INTERVAL = 10.0
    promtool = tool_or_skip("promtool", "prometheus")
    rules = tmp_path / "rules.yml"
    call_command("export_prometheus_rules", "--output", str(rules))
    [twin] = [entry for entry in prometheus_alerting_rules() if entry["labels"]["rule"] == "monitoring-stale"]

    def fires(monitor: str) -> list[dict]:
        return [{"exp_labels": {**twin["labels"], "monitor": monitor}, "exp_annotations": twin["annotations"]}]

    def case(series: list[dict], expected: dict[str, list[dict]]) -> dict:
        return {"interval": "1m", "input_series": series,
                "alert_rule_test": [{"eval_time": at, "alertname": twin["alert"], "exp_alerts": alerts}
                                    for at, alerts in expected.items()]}

    tests = {"rule_files": [rules.name], "evaluation_interval": "1m", "tests": [
        # The sampler never ran: three of its one-minute intervals after the evaluator's series appeared.
        case(passing("evaluator", 10), {"2m": [], "4m": fires("sampler"), "10m": fires("sampler")}),
        # The evaluator never ran: three of its ten-second intervals after the sampler's series appeared.
        case(passing("sampler", 60), {"0m": [], "1m": fires("evaluator")}),
        # Both run (the sampler's first pass a minute after the evaluator's, as at a start): nothing.
        case(passing("evaluator", 10) + passing("sampler", 60, from_minute=1), {"0m": [], "2m": [], "10m": []}),
        # A Prometheus that scrapes no portal: neither series, and this rule says nothing (RQPortalMonitoringDown
        # does).
        case([{"series": "up", "values": "1x20"}], {"5m": [], "15m": []}),
    ]}
    unit = tmp_path / "monitoring-stale.test.yml"
    unit.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", str(unit)], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
