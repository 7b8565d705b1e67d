"""Debian's Prometheus and Alertmanager against a live portal: Prometheus scrapes /metrics with the metrics token,
evaluates the exported rules, Alertmanager (with the exported config) posts to the portal's webhook with the webhook
token, and the alert lands in the history. No worker runs in the tests, so "no worker is alive" is true.

Prometheus and Alertmanager run with their shortest useful timings (1 s scrapes and evaluations, --max-for 1,
group_wait 0 s); the whole chain takes a few seconds after they have started.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from django.apps import apps
from django.core.management import call_command
from django.urls import reverse

from monitoring.alert_rules import rules_seed
from monitoring.models import Alert, AlertRule
from portal.embedded_redis import free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

PROMETHEUS = "/usr/bin/prometheus"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
METRICS_TOKEN = "metrics-token-0123456789"
WEBHOOK_TOKEN = "webhook-token-0123456789"
WAIT_SECONDS = 60


def binaries_or_skip() -> None:
    missing = [path for path in (PROMETHEUS, ALERTMANAGER) if not shutil.which(path)]
    if missing:
        message = f"{', '.join(missing)} missing (Debian packages prometheus and prometheus-alertmanager)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run Prometheus and Alertmanager end to end: {message}")
        pytest.skip(message)


class Processes:
    """The started tools, each logging to a file the failure message quotes; all stopped at teardown."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.started: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, command: list[str]) -> None:
        log = self.directory / f"{name}.log"
        with log.open("wb") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=self.directory)
        self.started.append((name, process, log))

    def check_running(self) -> None:
        for name, process, _log in self.started:
            assert process.poll() is None, f"{name} exited with {process.returncode}:\n{self.logs()}"

    def logs(self) -> str:
        tails = []
        for name, _process, log in self.started:
            lines = log.read_text(errors="replace").splitlines()[-30:]
            tails.append(f"--- {name} (last lines) ---\n" + "\n".join(lines))
        return "\n".join(tails)

    def stop(self) -> None:
        for _name, process, _log in self.started:
            process.terminate()
        for _name, process, _log in self.started:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture
def processes(tmp_path):
    started = Processes(tmp_path)
    yield started
    started.stop()


def test_an_alert_prometheus_raises_lands_in_the_portal_through_alertmanager(live_server, settings, redis, tmp_path,
                                                                             processes):
    binaries_or_skip()
    settings.METRICS_TOKEN, settings.ALERTS_WEBHOOK_TOKEN = METRICS_TOKEN, WEBHOOK_TOKEN
    settings.PORTAL_URL = live_server.url
    rules_seed(apps)  # transactional tests empty the tables, the seeded rules included
    rule = AlertRule.objects.get(name="no-active-workers")

    rules, alertmanager_config = tmp_path / "rules.yml", tmp_path / "alertmanager.yml"
    call_command("export_prometheus_rules", "--max-for", "1", "--output", str(rules))
    call_command("export_alertmanager_config", "--portal-url", live_server.url, "--max-group-wait", "0",
                 "--group-interval", "1", "--output", str(alertmanager_config))
    alertmanager_port, prometheus_port = free_port(), free_port()
    portal = live_server.url.removeprefix("http://")
    prometheus_config = tmp_path / "prometheus.yml"
    prometheus_config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]}]},
        "scrape_configs": [{"job_name": "rq-ops-portal", "metrics_path": reverse("metrics"),
                            "authorization": {"credentials": METRICS_TOKEN},
                            "static_configs": [{"targets": [portal]}]}],
    }))

    processes.start("alertmanager", [
        ALERTMANAGER, f"--config.file={alertmanager_config}", f"--storage.path={tmp_path / 'alertmanager-data'}",
        f"--web.listen-address=127.0.0.1:{alertmanager_port}", "--cluster.listen-address="])
    processes.start("prometheus", [
        PROMETHEUS, f"--config.file={prometheus_config}", f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}"])

    deadline = time.monotonic() + WAIT_SECONDS
    alert = None
    while alert is None and time.monotonic() < deadline:
        processes.check_running()
        time.sleep(0.5)
        alert = Alert.objects.filter(source=Alert.Source.ALERTMANAGER, name="RQNoActiveWorkers").first()
    assert alert is not None, f"no alert from Alertmanager within {WAIT_SECONDS} s\n{processes.logs()}"

    assert alert.state == Alert.State.FIRING and alert.rule == rule
    assert alert.severity == "critical" and alert.component == "workers"
    assert {key: alert.labels[key] for key in ("alertname", "rule", "severity", "component", "job")} == {
        "alertname": "RQNoActiveWorkers", "rule": "no-active-workers", "severity": "critical",
        "component": "workers", "job": "rq-ops-portal"}
    assert alert.summary == alert.annotations["summary"] == "No caption worker is alive"
    assert alert.annotations["runbook_url"] == live_server.url + reverse("admin:monitoring_alertrule_change",
                                                                         args=[rule.pk])
    assert "/graph?" in alert.generator_url and alert.fingerprint.startswith("am:")  # Prometheus linked back
