"""deploy/: what can be checked on this machine. The Procfile runs under honcho and a task submitted to it
completes; systemd verifies the units; the compose file and the Kubernetes manifests parse and carry what matters
(health checks, grace periods long enough for a task, the autoscaler's metrics)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.core.management import call_command

from portal.embedded_redis import free_port
from queues.models import CaptionTask, TaskStatus
from queues.services import task_submit
from tests.conftest import subprocess_env, tool_or_skip

DEPLOY = Path(settings.BASE_DIR) / "deploy"
# The supervisor's own stop timeout: it waits this long for the tasks in hand before it gives up on them.
SUPERVISOR_STOP_SECONDS = settings.RQ_DEFAULT_TIMEOUT + 40


def seconds(text: str) -> int:
    match = re.fullmatch(r"(\d+)(s|m)?", str(text))
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def procfile() -> dict[str, str]:
    lines = [line for line in (DEPLOY / "Procfile").read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split(": ", 1) for line in lines)


def test_the_procfile_names_every_process_of_a_host():
    processes = procfile()
    assert set(processes) == {"web", "ws", "workers", "sampler", "alerts"}
    assert processes["web"].startswith("gunicorn -c python:portal.gunicorn_config portal.wsgi")
    assert processes["ws"].startswith("uvicorn portal.asgi:application")
    assert processes["workers"] == "python manage.py runworkers"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_procfile_under_honcho_serves_pages_and_websockets_and_runs_a_task(redis, media_image):
    from queues.models import WorkerPool

    WorkerPool.objects.update_or_create(name="default", defaults={  # a transactional test before may have emptied it
        "queues": "urgent high normal low", "desired": 1, "minimum": 1, "maximum": 4})
    honcho = shutil.which("honcho", path=str(Path(sys.executable).parent))
    assert honcho, "honcho is in requirements.txt"
    base = free_port()
    environment = subprocess_env(BIND_HOST="127.0.0.1", WEB_CONCURRENCY="1", PYTHONUNBUFFERED="1", LOG_FORMAT="json")
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"  # the venv's python
    log = open(Path(settings.MEDIA_ROOT).parent / f"honcho-{base}.log", "w+b")
    process = subprocess.Popen([honcho, "-f", str(DEPLOY / "Procfile"), "-d", str(settings.BASE_DIR), "start",
                                "--port", str(base), "web", "ws", "workers", "sampler"],
                               env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for port in (base, base + 100):  # honcho's ports: web, then ws
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, "honcho exited early"
                try:
                    request = urllib.request.Request(f"http://127.0.0.1:{port}/healthz",
                                                     headers={"X-Correlation-ID": f"probe-{port}"})
                    with urllib.request.urlopen(request, timeout=2) as answer:
                        assert answer.status == 200
                        break
                except OSError:
                    assert time.monotonic() < deadline, f"nothing answered on port {port}"
                    time.sleep(0.2)
        task = task_submit(image_ref=media_image())
        deadline = time.monotonic() + 60
        while CaptionTask.objects.get(pk=task.pk).status != TaskStatus.COMPLETED:
            assert time.monotonic() < deadline, "the task did not complete under honcho"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # honcho passes it on to every process, which stop gracefully
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.seek(0)
        output = log.read().decode(errors="replace")
        print(output[-4000:])
        log.close()
    assert CaptionTask.objects.get(pk=task.pk).status == TaskStatus.COMPLETED
    # LOG_FORMAT=json: every line every process wrote (gunicorn's own, uvicorn's, the supervisor's, the workers',
    # the sampler's) is one JSON object; honcho puts "time name | " in front and adds its own "system" lines.
    lines = [line.split(" | ", 1) for line in output.splitlines() if " | " in line]
    ours = [(name.split()[-1], text) for name, text in lines if name.split()[-1] != "system" and text.strip()]
    assert {name.split(".")[0] for name, _ in ours} >= {"web", "ws", "workers", "sampler"}
    records = []
    for name, text in ours:
        try:
            records.append((name, json.loads(text)))
        except ValueError:
            raise AssertionError(f"{name} wrote a line that is not JSON: {text!r}") from None
    assert all({"timestamp", "level", "logger", "message", "correlation_id", "task_id", "worker", "queue"}
               <= set(record) and "context" not in record for _, record in records), records[:3]
    access = [record for name, record in records if name.startswith("web") and "/healthz" in record["message"]]
    assert access and access[0]["logger"] == "gunicorn.access" and access[0]["correlation_id"] == f"probe-{base}"


def units() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted((DEPLOY / "systemd").glob("*.service"))}


def unit_value(text: str, key: str) -> str:
    return re.search(rf"^{key}=(.*)$", text, re.M).group(1)


def test_the_systemd_units_stop_the_supervisor_gracefully_and_restart_on_failure():
    found = units()
    long_running = {f"rq-ops-{name}.service" for name in ("web", "ws", "workers", "sampler", "alerts")}
    assert set(found) == long_running | {"rq-ops-capacity-report.service"}
    report = found.pop("rq-ops-capacity-report.service")  # a oneshot its timer starts every week
    assert unit_value(report, "Type") == "oneshot"
    assert unit_value(report, "ExecStart").endswith("manage.py capacity_report --days 7 --json")
    timer = (DEPLOY / "systemd" / "rq-ops-capacity-report.timer").read_text()
    assert unit_value(timer, "OnCalendar") == "Mon *-*-* 06:00:00" and unit_value(timer, "Persistent") == "true"
    for name, text in found.items():
        assert unit_value(text, "KillMode") == "mixed", name
        assert unit_value(text, "Restart") == "on-failure", name
        assert unit_value(text, "EnvironmentFile") == "/etc/rq-ops-portal/env", name
    workers = found["rq-ops-workers.service"]
    assert unit_value(workers, "KillSignal") == "SIGTERM"
    assert seconds(unit_value(workers, "TimeoutStopSec")) > SUPERVISOR_STOP_SECONDS
    assert "manage.py runworkers" in unit_value(workers, "ExecStart")


def test_systemd_analyze_verifies_the_units(tmp_path):
    analyze = tool_or_skip("systemd-analyze", "systemd")
    # The units name the installed layout; here the checkout and its .venv stand in for /opt/rq-ops-portal.
    environment_file = tmp_path / "env"
    environment_file.write_text((DEPLOY / "systemd" / "rq-ops.env.example").read_text())
    venv = Path(sys.executable).parent.parent
    for name, text in units().items():
        text = text.replace("/opt/rq-ops-portal/.venv", str(venv)).replace("/opt/rq-ops-portal",
                                                                            str(settings.BASE_DIR))
        text = text.replace("/etc/rq-ops-portal/env", str(environment_file))
        text = re.sub(r"^(User|Group)=rqops$", r"\1=root", text, flags=re.M)
        (tmp_path / name).write_text(text)
    timer = DEPLOY / "systemd" / "rq-ops-capacity-report.timer"
    (tmp_path / timer.name).write_text(timer.read_text())
    paths = sorted(str(path) for pattern in ("*.service", "*.timer") for path in tmp_path.glob(pattern))
    result = subprocess.run([analyze, "verify", "--man=no", *paths], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr  # warnings count too


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_the_compose_file_runs_every_part_with_health_checks():
    services = compose()["services"]
    assert {"redis", "mariadb", "migrate", "web", "ws", "workers", "sampler", "alerts"} <= set(services)
    for name in ("redis", "mariadb", "web", "ws", "workers"):
        assert services[name]["healthcheck"]["test"], name
    for name in ("web", "ws", "workers", "sampler", "alerts"):
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["mariadb"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["environment"]["DATABASE_URL"].startswith("mysql://")
    assert " ".join(services["workers"]["command"]) == procfile()["workers"]
    assert seconds(services["workers"]["stop_grace_period"]) > SUPERVISOR_STOP_SECONDS
    assert "noeviction" in services["redis"]["command"]  # rq's keys must never be evicted
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "requirements-mysql.lock" in dockerfile and "collectstatic" in dockerfile


def manifests() -> dict[tuple[str, str], dict]:
    found = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[(document["kind"], document["metadata"]["name"])] = document
    return found


def containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def test_the_kubernetes_manifests_give_workers_time_to_finish_and_scale_on_our_metrics():
    found = manifests()
    deployments = {name: document for (kind, name), document in found.items() if kind == "Deployment"}
    assert set(deployments) == {"rq-ops-web", "rq-ops-ws", "rq-ops-workers", "rq-ops-duties", "rq-ops-sampler",
                                "rq-ops-alerts", "rq-ops-metrics"}
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        assert {source.get("secretRef", {}).get("name") for source in containers(deployment)[0]["envFrom"]} >= {
            "rq-ops-portal"}, name
    workers = deployments["rq-ops-workers"]
    grace = workers["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.RQ_DEFAULT_TIMEOUT + 30  # rq's hard limit on a job: the task in hand always fits
    assert containers(workers)[0]["command"][:3] == ["python", "manage.py", "rqworker"]
    assert containers(deployments["rq-ops-duties"])[0]["command"] == ["python", "manage.py", "runworkers",
                                                                       "--no-workers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert containers(deployments["rq-ops-web"])[0][probe]["httpGet"]["path"] in ("/readyz", "/healthz")

    hpa = found[("HorizontalPodAutoscaler", "rq-ops-workers")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rq-ops-workers"}
    assert {metric["external"]["metric"]["name"] for metric in hpa["spec"]["metrics"]} == {
        "rq_pool_desired_processes", "rq_pool_backlog"}
    adapter = yaml.safe_load(found[("ConfigMap", "prometheus-adapter-rq-ops")]["data"]["config.yaml"])
    assert {rule["name"]["as"] for rule in adapter["externalRules"]} == {"rq_pool_desired_processes", "rq_pool_backlog"}
    keda = found[("ScaledObject", "rq-ops-workers")]
    assert keda["spec"]["scaleTargetRef"]["name"] == "rq-ops-workers"
    queries = " ".join(trigger["metadata"]["query"] for trigger in keda["spec"]["triggers"])
    assert "rq_pool_desired_processes" in queries and "rq_pool_backlog" in queries
    ingress = found[("Ingress", "rq-ops-portal")]
    paths = {path["path"]: path["backend"]["service"]["name"]
             for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]}
    assert paths == {"/ws/": "rq-ops-ws", "/": "rq-ops-web"}


@pytest.mark.django_db
def test_the_scrape_has_the_metrics_the_cluster_scales_on(client, admin_user, redis):
    from prometheus_client.parser import text_string_to_metric_families

    from queues.models import WorkerPool

    WorkerPool.objects.update_or_create(name="default", defaults={"queues": "urgent high normal low", "desired": 3,
                                                                  "minimum": 1, "maximum": 6})
    WorkerPool.objects.update_or_create(name="bulk", defaults={"queues": "low", "desired": 1, "minimum": 1,
                                                               "maximum": 2})
    for index in range(4):
        redis.rpush("rq:queue:low", f"job-{index}")
    redis.rpush("rq:queue:urgent", "job-u")
    client.force_login(admin_user)
    values = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
              for family in text_string_to_metric_families(client.get("/metrics").content.decode())
              for sample in family.samples}
    assert values[("rq_pool_desired_workers", (("pool", "default"),))] == 3
    assert values[("rq_pool_desired_workers", (("pool", "bulk"),))] == 1
    assert values[("rq_pool_backlog", (("pool", "default"),))] == 5
    assert values[("rq_pool_backlog", (("pool", "bulk"),))] == 4


def test_the_migrations_backups_live_on_a_volume_that_outlives_the_containers():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    web = compose["services"]["web"]
    backups = web["environment"]["MIGRATION_BACKUP_DIR"]
    assert any(mount.split(":")[1] == backups and mount.split(":")[0] in compose["volumes"]
               for mount in web["volumes"]), "a named volume, not the container's own disk"

    documents = [document for document in yaml.safe_load_all((DEPLOY / "kubernetes" / "portal.yaml").read_text())
                 if document]
    config = next(document for document in documents if document["kind"] == "ConfigMap")["data"]
    claims = {document["metadata"]["name"]: document for document in documents
              if document["kind"] == "PersistentVolumeClaim"}
    web = next(document for document in documents if document["kind"] == "Deployment"
               and document["metadata"]["name"] == "rq-ops-web")
    volumes = {volume["name"]: volume for volume in web["spec"]["template"]["spec"]["volumes"]}
    [mount] = [mount for mount in containers(web)[0]["volumeMounts"]
               if mount["mountPath"] == config["MIGRATION_BACKUP_DIR"]]
    claim = claims[volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # every web replica may start a run


def test_prometheus_scrapes_one_pod_with_the_metrics_token():
    found = manifests()
    monitor = found[("ServiceMonitor", "rq-ops-portal")]
    service = found[("Service", "rq-ops-metrics")]
    # One target: every portal process serves the same fleet-wide series, so a second one would double every sum.
    target = found[("Deployment", "rq-ops-metrics")]
    assert target["spec"]["replicas"] == 1
    assert service["spec"]["selector"].items() <= target["spec"]["template"]["metadata"]["labels"].items()
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= found[("Service", "rq-ops-web")][
        "metadata"]["labels"].items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["type"] == "Bearer"
    secret = endpoint["authorization"]["credentials"]
    assert secret["key"] in found[("Secret", secret["name"])]["stringData"] and secret["key"] == "METRICS_TOKEN"
    # Prometheus (and the kubelet's probes) reach a pod by its IP: the pods must accept it as a host.
    for name in ("rq-ops-web", "rq-ops-ws", "rq-ops-metrics"):
        env = {entry["name"]: entry for entry in containers(found[("Deployment", name)])[0]["env"]}
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", name
        assert env["ALLOWED_HOSTS"]["value"].split(",")[-1] == "$(POD_IP)", name
        assert list(env).index("POD_IP") < list(env).index("ALLOWED_HOSTS"), name  # defined before it is used


@pytest.mark.django_db
def test_the_prometheusrule_is_the_export_of_a_fresh_install_and_promtool_accepts_it(tmp_path, settings):
    from tests.conftest import alert_rules_seed

    alert_rules_seed()  # a transactional test before may have emptied the rows
    settings.PORTAL_URL = "https://ops.example.org"  # the manifests' address
    committed = yaml.safe_load((DEPLOY / "kubernetes" / "prometheusrule.yaml").read_text())
    output = tmp_path / "prometheusrule.yaml"
    call_command("export_prometheus_rules", "--format", "prometheusrule", "--output", str(output))
    exported = yaml.safe_load(output.read_text())

    def comparable(resource):  # the runbook links name rule rows by id, which differ from one database to another
        for group in resource["spec"]["groups"]:
            for rule in group["rules"]:
                rule.get("annotations", {}).pop("runbook_url", None)
        return resource

    assert comparable(committed) == comparable(exported), (
        "deploy/kubernetes/prometheusrule.yaml is not what a fresh install exports: run `manage.py "
        "export_prometheus_rules --format prometheusrule --output deploy/kubernetes/prometheusrule.yaml` on a fresh "
        "database with PORTAL_URL=https://ops.example.org")
    assert committed["kind"] == "PrometheusRule" and committed["apiVersion"] == "monitoring.coreos.com/v1"
    promtool = tool_or_skip("promtool", "prometheus")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": committed["spec"]["groups"]}))
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.django_db
def test_the_weekly_report_job_runs_a_real_command(capsys):
    job = manifests()[("CronJob", "rq-ops-capacity-report")]
    (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["python", "manage.py"] and job["spec"]["concurrencyPolicy"] == "Forbid"
    call_command(*container["command"][2:])
    report = json.loads(capsys.readouterr().out)
    assert report["days"] == 7 and "advice" in report


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions with In / NotIn) against a pod's labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        value = labels.get(expression["key"])
        if expression["operator"] == "In" and value not in expression["values"]:
            return False
        if expression["operator"] == "NotIn" and value in expression["values"]:
            return False
    return True


def _allowed(policies: list[dict], source: dict, target: dict, port: int) -> bool:
    """Whether NetworkPolicies let ``source`` connect to ``target`` on ``port``, as Kubernetes reads them: pods no
    policy selects take everything; a selected pod takes what one of its policies' ingress rules allows. A rule
    without ``from`` takes every source; a ``podSelector`` peer, pods of the policy's namespace; a
    ``namespaceSelector`` peer, pods of the namespaces it selects ({} every namespace), never a source outside the
    cluster (``namespace`` None)."""
    selecting = [policy for policy in policies if policy["metadata"].get("namespace", "portal") == target["namespace"]
                 and _selects(policy["spec"]["podSelector"], target["labels"])]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            if rule.get("ports") and port not in {entry["port"] for entry in rule["ports"]}:
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                if source["namespace"] is None:
                    continue
                if "namespaceSelector" in peer:
                    if _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source["namespace"]}):
                        return True
                elif "podSelector" in peer and source["namespace"] == target["namespace"] \
                        and _selects(peer["podSelector"], source["labels"]):
                    return True
    return False


def test_only_the_portals_pods_reach_the_datastores_and_only_web_and_ws_are_reachable_from_outside():
    found = manifests()
    policies = [document for (kind, _), document in found.items() if kind == "NetworkPolicy"]
    pods = {}  # every pod template of the manifests, by its workload
    for (kind, name), document in found.items():
        if kind in ("Deployment", "Job"):
            pods[name] = document["spec"]["template"]["metadata"]["labels"]
        elif kind == "CronJob":
            pods[name] = document["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert {"rq-ops-web", "rq-ops-ws", "rq-ops-workers", "rq-ops-migrate", "rq-ops-capacity-report"} <= set(pods)
    redis = {"namespace": "portal", "labels": {"app.kubernetes.io/name": "redis"}}
    mariadb = {"namespace": "portal", "labels": {"app.kubernetes.io/name": "mariadb"}}
    for name, labels in pods.items():  # every one of them needs the database and Redis (migrate, reports too)
        pod = {"namespace": "portal", "labels": labels}
        assert _allowed(policies, pod, redis, 6379) and _allowed(policies, pod, mariadb, 3306), name
    stranger = {"namespace": "portal", "labels": {"app.kubernetes.io/name": "something-else"}}
    outside = {"namespace": "ingress-nginx", "labels": {"app.kubernetes.io/name": "ingress-nginx"}}
    internet = {"namespace": None, "labels": {}}  # a load balancer keeping the client's address
    for visitor in (stranger, outside, internet):
        assert not _allowed(policies, visitor, redis, 6379) and not _allowed(policies, visitor, mariadb, 3306)
    # The datastores among themselves: replication, the sentinels.
    assert _allowed(policies, redis, redis, 6379) and _allowed(policies, redis, redis, 26379)
    assert _allowed(policies, mariadb, mariadb, 3306)
    prometheus = {"namespace": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus"}}
    assert _allowed(policies, prometheus, redis, 9121) and not _allowed(policies, prometheus, redis, 6379)
    for visitor in (outside, internet, prometheus):
        assert _allowed(policies, visitor, {"namespace": "portal", "labels": pods["rq-ops-web"]}, 8000)
        assert _allowed(policies, visitor, {"namespace": "portal", "labels": pods["rq-ops-metrics"]}, 8000)
        assert _allowed(policies, visitor, {"namespace": "portal", "labels": pods["rq-ops-ws"]}, 8001)
        for name in ("rq-ops-workers", "rq-ops-duties", "rq-ops-sampler", "rq-ops-alerts", "rq-ops-migrate"):
            assert not _allowed(policies, visitor, {"namespace": "portal", "labels": pods[name]}, 8000), name
