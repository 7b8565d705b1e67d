"""Debian's Prometheus and Alertmanager against a live portal: Prometheus scrapes /metrics with the metrics token,
evaluates the exported rules, Alertmanager (with the exported config) posts to the portal's webhook with the webhook
token: what only Prometheus raises lands in the history, the twins of the portal's own rules go nowhere (the
portal pages for them), and the watchdog reaches the dead man's switch. No worker runs in the tests, so "no worker
is alive" is true.

Prometheus and Alertmanager run with their shortest useful timings (1 s scrapes and evaluations, --max-for 1,
group_wait 0 s); the whole chain takes a few seconds after they have started.
"""

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command
from django.urls import reverse

from monitoring.models import Alert
from portal.embedded_redis import free_port
from tests.conftest import alert_rules_seed, respond

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


def test_alertmanager_pages_what_only_prometheus_sees_and_leaves_the_portals_rules_to_the_portal(
        live_server, settings, redis, tmp_path, processes, http_server):
    """One notifier per condition, end to end: "no worker is alive" fires in Prometheus too (no worker runs here),
    but its twin goes nowhere, since the portal pages for it. RQPortalMonitoringDown (no sampler or evaluator has
    ever passed here, so their figures are absent) is Prometheus' alone: it lands in the portal's history through
    Alertmanager. The watchdog reaches the dead man's switch."""
    binaries_or_skip()
    settings.METRICS_TOKEN, settings.ALERTS_WEBHOOK_TOKEN = METRICS_TOKEN, WEBHOOK_TOKEN
    settings.PORTAL_URL = live_server.url
    alert_rules_seed()  # transactional tests empty the tables, the seeded rules included
    switch = http_server.route("/heartbeat", respond(200, b"ok"))

    rules, alertmanager_config = tmp_path / "rules.yml", tmp_path / "alertmanager.yml"
    call_command("export_prometheus_rules", "--max-for", "1", "--output", str(rules))
    call_command("export_alertmanager_config", "--portal-url", live_server.url, "--max-group-wait", "0",
                 "--group-interval", "1", "--watchdog-url", switch, "--output", str(alertmanager_config))
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
        # Firing alerts are sent again every second: the watchers fire at the first evaluation, which can come before
        # Alertmanager listens, and the default resend waits a minute.
        f"--web.listen-address=127.0.0.1:{prometheus_port}", "--rules.alert.resend-delay=1s"])

    deadline = time.monotonic() + WAIT_SECONDS
    alert = None
    while alert is None and time.monotonic() < deadline:
        processes.check_running()
        time.sleep(0.5)
        alert = Alert.objects.filter(source=Alert.Source.ALERTMANAGER, name="RQPortalMonitoringDown").first()
    if alert is None:
        seen = {name: urllib.request.urlopen(url, timeout=5).read().decode() for name, url in (
            ("Prometheus' alerts", f"http://127.0.0.1:{prometheus_port}/api/v1/alerts"),
            ("Alertmanager's alerts", f"http://127.0.0.1:{alertmanager_port}/api/v2/alerts"))}
        raise AssertionError(f"no alert from Alertmanager within {WAIT_SECONDS} s\n{seen}\n{processes.logs()}")
    assert alert.state == Alert.State.FIRING and alert.rule is None
    assert alert.severity == "critical" and alert.component == "monitoring"
    assert alert.labels["notified_by"] == "alertmanager"
    assert "/graph?" in alert.generator_url and alert.fingerprint.startswith("am:")  # Prometheus linked back

    # Prometheus fires the twin of no-active-workers as well (same 1 s "for"), and Alertmanager keeps it to itself.
    query = f"http://127.0.0.1:{prometheus_port}/api/v1/query?query=ALERTS%7Balertname%3D%22RQNoActiveWorkers%22%7D"
    deadline = time.monotonic() + WAIT_SECONDS
    firing = []
    while not firing and time.monotonic() < deadline:
        firing = json.loads(urllib.request.urlopen(query, timeout=5).read())["data"]["result"]
        time.sleep(0.5)
    assert firing and firing[0]["metric"]["notified_by"] == "portal", processes.logs()
    time.sleep(5)  # several of Alertmanager's 1 s group intervals
    assert not Alert.objects.filter(source=Alert.Source.ALERTMANAGER, name="RQNoActiveWorkers").exists()
    heartbeats = [json.loads(request["body"]) for request in http_server.requests if request["path"] == "/heartbeat"]
    assert heartbeats and heartbeats[0]["alerts"][0]["labels"]["alertname"] == "RQWatchdog", processes.logs()
