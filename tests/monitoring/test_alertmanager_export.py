"""The exported Alertmanager configuration: the portal's routes and channels as receivers and routes, every alert
to the portal's webhook first, and a file Alertmanager's own amtool accepts and routes as the portal does."""

import subprocess

import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import CommandError

from monitoring.alerts.notify import _routes_for
from monitoring.models import Alert, AlertRule, NotificationChannel, NotificationRoute
from tests.conftest import tool_or_skip

TOKEN = "am-webhook-token-0123456789"


def amtool_or_skip() -> str:
    return tool_or_skip("amtool", "prometheus-alertmanager")


@pytest.fixture(autouse=True)
def only_the_tests_own_routes(db):
    """The two routes a fresh install starts with (seed 004's, migration 0014) are left out of these tests; the last
    test writes them again and checks them."""
    NotificationRoute.objects.all().delete()


@pytest.fixture
def routes(db, settings):
    settings.ALERTS_WEBHOOK_TOKEN = TOKEN
    settings.PORTAL_URL = "https://portal.example.com"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_USE_TLS = "smtp.example.com", 587, True
    settings.EMAIL_HOST_USER, settings.EMAIL_HOST_PASSWORD = "mailer", "mail-password"
    settings.DEFAULT_FROM_EMAIL = "alerts@example.com"
    email = NotificationChannel.objects.create(name="Ops mail", kind="email",
                                               config={"to": ["ops@example.com", "dba@example.com"]})
    slack = NotificationChannel.objects.create(name="Ops Slack", kind="slack",
                                               config={"url": "https://hooks.slack.com/services/T0/B0/secret"})
    webhook = NotificationChannel.objects.create(name="Ticketing", kind="webhook",
                                                 config={"url": "https://tickets.example.com/in", "token": "tkt-1"})
    pagerduty = NotificationChannel.objects.create(
        name="On call", kind="pagerduty",
        config={"routing_key": "R0123456789abcdef", "url": "https://events.eu.pagerduty.com/v2/enqueue"})
    disabled = NotificationChannel.objects.create(name="Old Slack", kind="slack", enabled=False,
                                                  config={"url": "https://hooks.slack.com/services/T0/B0/old"})
    redis_pages = NotificationRoute.objects.create(
        name="Redis pages", position=10, severities=["critical"], group_by=["alertname", "component"],
        matchers=[{"label": "component", "op": "=", "value": "redis"},
                  {"label": "queue", "op": "!~", "value": 'batch|say "hi"'}],
        group_wait_seconds=10, repeat_interval_seconds=3600, continue_matching=True)
    redis_pages.channels.set([email, slack, pagerduty, disabled])
    everything = NotificationRoute.objects.create(name="Everything else", position=20,
                                                  severities=["critical", "error", "warning"], send_resolved=False)
    everything.channels.set([webhook])
    # Created first but placed between the two: the export follows position, not creation order.
    quiet = NotificationRoute.objects.create(name="Quiet workers", position=15, severities=["warning"],
                                             matchers=[{"label": "component", "op": "=", "value": "workers"}])
    quiet.channels.set([disabled])
    NotificationRoute.objects.create(name="Switched off", position=1, enabled=False)
    NotificationRoute.objects.create(name="Takes nothing", position=2, severities=[])
    return {"redis_pages": redis_pages, "everything": everything, "quiet": quiet}


def export(tmp_path, *args) -> dict:
    output = tmp_path / "alertmanager.yml"
    call_command("export_alertmanager_config", "--output", str(output), *args)
    return yaml.safe_load(output.read_text())


def test_receivers_and_routes_mirror_the_routes_and_channels(routes, tmp_path):
    config = export(tmp_path)

    assert config["global"] == {"resolve_timeout": "5m",
                                "smtp_smarthost": "smtp.example.com:587", "smtp_from": "alerts@example.com",
                                "smtp_require_tls": True, "smtp_auth_username": "mailer",
                                "smtp_auth_password": "mail-password"}
    root = config["route"]
    assert root["receiver"] == "rq-ops-portal" and root["group_by"] == [] and "matchers" not in root
    watchdog, notified_by_portal, portal, *children = root["routes"]
    assert watchdog == {"receiver": "watchdog", "matchers": ['alertname="RQWatchdog"'], "group_by": [],
                        "group_wait": "0s", "group_interval": "1m", "repeat_interval": "1m"}
    assert notified_by_portal == {"receiver": "notified-by-portal", "matchers": ['notified_by="portal"'],
                                  "group_by": [], "group_wait": "0s"}  # and no "continue": the portal pages
    assert portal == {"receiver": "rq-ops-portal", "group_by": ["..."], "group_wait": "0s", "continue": True}
    assert [child["receiver"] for child in children] == ["redis-pages", "quiet-workers", "everything-else"]
    redis_route, quiet_route, everything_route = children
    assert redis_route == {"receiver": "redis-pages",
                           "matchers": ['severity=~"critical"', 'component="redis"', r'queue!~"batch|say \"hi\""'],
                           "group_by": ["alertname", "component"], "group_wait": "10s", "repeat_interval": "1h",
                           "continue": True}
    assert everything_route["matchers"] == ['severity=~"critical|error|warning"']
    assert everything_route["group_by"] == [] and everything_route["continue"] is False
    assert (everything_route["group_wait"], everything_route["repeat_interval"]) == ("30s", "4h")

    receivers = {receiver["name"]: receiver for receiver in config["receivers"]}
    assert list(receivers) == ["watchdog", "notified-by-portal", "rq-ops-portal", "redis-pages", "quiet-workers",
                               "everything-else"]
    assert receivers["notified-by-portal"] == {"name": "notified-by-portal"}  # sends nothing
    assert receivers["watchdog"] == {"name": "watchdog"}  # no --watchdog-url given
    assert receivers["rq-ops-portal"]["webhook_configs"] == [{
        "url": "https://portal.example.com/api/alerts/alertmanager", "send_resolved": True,
        "http_config": {"authorization": {"type": "Bearer", "credentials": TOKEN}}}]
    assert receivers["redis-pages"] == {
        "name": "redis-pages",
        "email_configs": [{"to": "ops@example.com, dba@example.com", "send_resolved": True}],
        "slack_configs": [{"api_url": "https://hooks.slack.com/services/T0/B0/secret", "send_resolved": True}],
        "pagerduty_configs": [{"routing_key": "R0123456789abcdef", "send_resolved": True,
                               "url": "https://events.eu.pagerduty.com/v2/enqueue",
                               "severity": "{{ if .CommonLabels.severity }}{{ .CommonLabels.severity }}"
                                           "{{ else }}warning{{ end }}"}],
    }  # the disabled channel is not there
    assert receivers["quiet-workers"] == {"name": "quiet-workers"}  # takes the alerts and sends nothing, as here
    assert receivers["everything-else"]["webhook_configs"] == [{
        "url": "https://tickets.example.com/in", "send_resolved": False,
        "http_config": {"authorization": {"type": "Bearer", "credentials": "tkt-1"}}}]


def test_receiver_names_stay_unique_and_the_portal_url_can_be_given(db, settings, tmp_path):
    settings.ALERTS_WEBHOOK_TOKEN = TOKEN
    NotificationRoute.objects.create(name="Ops team", position=1)
    NotificationRoute.objects.create(name="ops-team", position=2)
    NotificationRoute.objects.create(name="RQ Ops Portal", position=3)
    config = export(tmp_path, "--portal-url", "http://10.0.0.5:8000/")
    assert [receiver["name"] for receiver in config["receivers"]] == [
        "watchdog", "notified-by-portal", "rq-ops-portal", "ops-team", "ops-team-2", "rq-ops-portal-2"]
    assert config["global"] == {"resolve_timeout": "5m"}  # no email channel: no SMTP settings (nor password)
    assert config["receivers"][2]["webhook_configs"][0]["url"] == "http://10.0.0.5:8000/api/alerts/alertmanager"


def test_drill_options_shorten_the_waits(routes, tmp_path):
    config = export(tmp_path, "--max-group-wait", "0", "--group-interval", "1")
    assert config["route"]["group_interval"] == "1s"
    assert {child["group_wait"] for child in config["route"]["routes"]} == {"0s"}
    assert export(tmp_path)["route"]["group_interval"] == "10s"  # the monitoring guide's
    with pytest.raises(CommandError, match="--group-interval"):
        call_command("export_alertmanager_config", "--group-interval", "0")
    with pytest.raises(CommandError, match="--max-group-wait"):
        call_command("export_alertmanager_config", "--max-group-wait", "-1")
    with pytest.raises(CommandError, match="--portal-url"):
        call_command("export_alertmanager_config", "--portal-url", "portal.example.com")


def test_amtool_accepts_the_config_and_routes_as_the_portal_does(routes, tmp_path):
    amtool = amtool_or_skip()
    output = tmp_path / "alertmanager.yml"
    call_command("export_alertmanager_config", "--output", str(output))
    result = subprocess.run([amtool, "check-config", str(output)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "6 receivers" in result.stdout

    enabled = list(NotificationRoute.objects.filter(enabled=True).order_by("position", "id"))
    receiver_of = {route.pk: name for route, name in zip(routes.values(), ("redis-pages", "everything-else",
                                                                           "quiet-workers"))}
    label_sets = [{"severity": "critical", "component": "redis"},
                  {"severity": "critical", "component": "redis", "queue": "batch"},
                  {"severity": "critical", "component": "redis", "queue": 'say "hi"'},
                  {"severity": "warning", "component": "workers"},
                  {"severity": "warning", "component": "queues"},
                  {"severity": "info", "component": "redis"}]
    for labels in label_sets:
        alert = Alert(severity=labels["severity"], labels={"alertname": "RQTest", **labels})
        expected = ["rq-ops-portal"] + [receiver_of[route.pk] for route in _routes_for(alert, enabled)]
        # amtool parses its label arguments as matchers: quote the values the same way.
        quoted = [label + '="' + value.replace('"', '\\"') + '"' for label, value in labels.items()]
        result = subprocess.run([amtool, "config", "routes", "test", f"--config.file={output}", "alertname=RQTest",
                                 *quoted],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip().split(",") == expected, labels


def test_without_the_webhook_token_the_config_reads_a_token_file_and_says_so(db, settings, tmp_path, capsys):
    settings.ALERTS_WEBHOOK_TOKEN = None
    config = export(tmp_path)
    authorization = config["receivers"][2]["webhook_configs"][0]["http_config"]["authorization"]
    assert authorization == {"type": "Bearer", "credentials_file": "/etc/prometheus/rq-ops-portal-alerts-token"}
    assert "ALERTS_WEBHOOK_TOKEN is not set" in capsys.readouterr().err
    amtool = amtool_or_skip()
    result = subprocess.run([amtool, "check-config", str(tmp_path / "alertmanager.yml")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_channels_alertmanager_cannot_use_are_left_out_with_a_warning(db, settings, tmp_path, capsys):
    settings.ALERTS_WEBHOOK_TOKEN = TOKEN
    broken = NotificationChannel.objects.create(name="Broken Slack", kind="slack", config={"url": "not a url"})
    headers = NotificationChannel.objects.create(
        name="Team hook", kind="webhook", config={"url": "https://team.example.com/", "headers": {"X-Team": "a"}})
    route = NotificationRoute.objects.create(name="Team")
    route.channels.set([broken, headers])
    config = export(tmp_path)
    team = config["receivers"][3]
    assert team["name"] == "team" and "slack_configs" not in team
    assert team["webhook_configs"] == [{"url": "https://team.example.com/", "send_resolved": True}]
    err = capsys.readouterr().err
    assert "'Broken Slack' left out of route 'Team'" in err and "url:" in err
    assert "'Team hook'" in err and "headers" in err and "version 4" in err


def test_a_matcher_alertmanager_cannot_express_is_a_clear_error(db, settings):
    NotificationRoute.objects.create(name="Odd", matchers=[{"label": "bad-label", "op": "=", "value": "x"}])
    with pytest.raises(CommandError, match="route 'Odd'.*bad-label"):
        call_command("export_alertmanager_config")


def test_export_to_an_unwritable_place_is_a_clear_error(db, tmp_path):
    with pytest.raises(CommandError, match="Cannot write"):
        call_command("export_alertmanager_config", "--output", str(tmp_path / "missing" / "dir" / "am.yml"))


def test_the_written_config_is_readable_by_its_owner_only(routes, tmp_path):
    output = tmp_path / "alertmanager.yml"
    output.write_text("old")
    output.chmod(0o644)
    call_command("export_alertmanager_config", "--output", str(output))
    assert output.stat().st_mode & 0o777 == 0o600, "it holds the webhook token and the channels' secrets"
    assert "receivers" in yaml.safe_load(output.read_text())


@pytest.mark.usefixtures("db", "seeded_alert_rules")  # a transactional test before may have emptied them
def test_each_condition_has_one_notifier_in_amtool(routes, tmp_path, capsys):
    """Every seeded rule's Prometheus twin goes nowhere in Alertmanager (the portal pages for it; both paged, to
    different incidents, and a route on the portal's alertname matched only the portal's copy), except the
    database's, which only Prometheus can page while it holds; the watchdog goes to the dead man's switch; what only
    Prometheus raises goes to the portal's history and the routes."""
    from monitoring.alerts.exports import prometheus_alerting_rules, watcher_rules

    amtool = amtool_or_skip()
    NotificationRoute.objects.create(name="redis by name", position=5, severities=["critical"],
                                     matchers=[{"label": "alertname", "op": "=", "value": "redis-unreachable"}]) \
        .channels.set(NotificationChannel.objects.filter(name="On call"))
    output = tmp_path / "alertmanager.yml"
    call_command("export_alertmanager_config", "--output", str(output), "--watchdog-url",
                 "https://heartbeat.example.com/ping/abc")
    config = yaml.safe_load(output.read_text())
    assert config["receivers"][0] == {"name": "watchdog", "webhook_configs": [
        {"url": "https://heartbeat.example.com/ping/abc", "send_resolved": False}]}

    def receivers_for(labels: dict) -> list[str]:
        quoted = [label + '="' + value.replace('"', '\\"') + '"' for label, value in labels.items()]
        result = subprocess.run([amtool, "config", "routes", "test", f"--config.file={output}", *quoted],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.strip().split(",")

    twins = prometheus_alerting_rules()
    assert len(twins) == AlertRule.objects.filter(enabled=True).count() >= 19  # the seeded rules
    for twin in twins:
        if twin["alert"] == "RQDatabaseUnreachable":
            # The portal writes nothing while the database is down: Prometheus' twin is the live page.
            assert twin["labels"]["notified_by"] == "alertmanager"
            assert receivers_for({"alertname": twin["alert"], **twin["labels"]}) == ["rq-ops-portal",
                                                                                     "everything-else"]
            continue
        assert receivers_for({"alertname": twin["alert"], **twin["labels"]}) == ["notified-by-portal"], twin["alert"]
    watchdog, down = watcher_rules()
    assert receivers_for({"alertname": watchdog["alert"], **watchdog["labels"]}) == ["watchdog"]
    assert receivers_for({"alertname": down["alert"], **down["labels"]}) == ["rq-ops-portal", "everything-else"]


@pytest.mark.django_db
def test_a_fresh_install_routes_as_the_monitoring_guide_once_its_channels_exist(settings, tmp_path):
    """Seed 004's Alertmanager routing: critical alerts to PagerDuty and on (continue), everything to Slack, grouped
    by alertname, cluster and service, 10 s group wait and interval, reminders every 12 h. The routes come with the
    install (migration 0014); an Admin adds the two channels."""
    import importlib

    from django.apps import apps

    importlib.import_module("monitoring.migrations.0014_seed_document_routes").seed(apps, None)  # if a test emptied
    settings.ALERTS_WEBHOOK_TOKEN = TOKEN
    pager = NotificationChannel.objects.create(name="PagerDuty", kind="pagerduty",
                                               config={"routing_key": "R0123456789abcdef"})
    chat = NotificationChannel.objects.create(name="Slack", kind="slack",
                                              config={"url": "https://hooks.slack.com/services/T0/B0/secret"})
    NotificationRoute.objects.get(name="critical to PagerDuty").channels.add(pager)
    NotificationRoute.objects.get(name="everything to Slack").channels.add(chat)
    config = export(tmp_path)

    assert config["global"] == {"resolve_timeout": "5m"} and config["route"]["group_interval"] == "10s"
    *_, critical, everything = config["route"]["routes"]
    timings = {"group_by": ["alertname", "cluster", "service"], "group_wait": "10s", "repeat_interval": "12h"}
    assert critical == {"receiver": "critical-to-pagerduty", "matchers": ['severity=~"critical"'], **timings,
                        "continue": True}
    # Every severity: no severity matcher, so an alert with none or another one reaches Slack too (seed 004).
    assert everything == {"receiver": "everything-to-slack", "matchers": [], **timings, "continue": False}
    receivers = {receiver["name"]: receiver for receiver in config["receivers"]}
    assert [entry["routing_key"] for entry in receivers["critical-to-pagerduty"]["pagerduty_configs"]] == [
        "R0123456789abcdef"]
    assert [entry["api_url"] for entry in receivers["everything-to-slack"]["slack_configs"]] == [
        "https://hooks.slack.com/services/T0/B0/secret"]
    # The portal routes the same way: a critical alert to both, a warning to Slack only.
    critical_alert = Alert(name="x", labels={"alertname": "x", "severity": "critical"}, severity="critical")
    warning_alert = Alert(name="y", labels={"alertname": "y", "severity": "warning"}, severity="warning")
    routes = list(NotificationRoute.objects.filter(enabled=True).order_by("position", "id"))
    assert [route.name for route in _routes_for(critical_alert, routes)] == ["critical to PagerDuty",
                                                                             "everything to Slack"]
    assert [route.name for route in _routes_for(warning_alert, routes)] == ["everything to Slack"]

    amtool = amtool_or_skip()
    result = subprocess.run([amtool, "check-config", str(tmp_path / "alertmanager.yml")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

    def receivers_for(*labels: str) -> str:
        result = subprocess.run([amtool, "config", "routes", "test",
                                 f"--config.file={tmp_path / 'alertmanager.yml'}", *labels],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.strip()

    # What only Prometheus raises may carry no severity, or one of its own: Slack hears of it all the same.
    assert receivers_for("alertname=NoSeverity") == "rq-ops-portal,everything-to-slack"
    assert receivers_for("alertname=OwnSeverity", "severity=page") == "rq-ops-portal,everything-to-slack"
    assert receivers_for("alertname=Critical", "severity=critical") == \
        "rq-ops-portal,critical-to-pagerduty,everything-to-slack"


@pytest.mark.usefixtures("db", "seeded_alert_rules")  # a transactional test before may have emptied them
@pytest.mark.parametrize("op, value", [
    ("=", "database-unreachable"), ("!=", "database-unreachable"), ("=~", "database-.*|redis-.*"),
    ("!~", "database-.*"), ("=", "redis-unreachable"), ("!=", "redis-unreachable"), ("=~", "redis-.*"),
    ("!~", "redis-.*")])
def test_a_route_on_alertname_takes_the_twin_alertmanager_pages_as_the_portal_takes_its_alert(
        routes, tmp_path, op, value):
    """database-unreachable's twin is paged by Alertmanager (the portal cannot write while its database is down);
    a portal route on alertname=database-unreachable let it through to the catch-all routes, because Prometheus
    names it RQDatabaseUnreachable. Alertmanager now routes the twin where the portal routes its own alert, for
    equality, regex and negative matchers alike."""
    from django.utils.text import slugify

    from monitoring.alerts.exports import prometheus_alerting_rules

    amtool = amtool_or_skip()
    by_name = NotificationRoute.objects.create(name="By name", position=5, severities=["critical"],
                                               matchers=[{"label": "alertname", "op": op, "value": value}])
    by_name.channels.set(NotificationChannel.objects.filter(name="On call"))
    output = tmp_path / "alertmanager.yml"
    call_command("export_alertmanager_config", "--output", str(output))
    result = subprocess.run([amtool, "check-config", str(output)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

    rule = AlertRule.objects.get(name="database-unreachable")
    [twin] = [entry for entry in prometheus_alerting_rules() if entry["labels"]["rule"] == rule.name]
    assert twin["alert"] == "RQDatabaseUnreachable" and twin["labels"]["notified_by"] == "alertmanager"
    portal_alert = Alert(name=rule.name, severity=rule.severity, labels=rule.all_labels())
    enabled = list(NotificationRoute.objects.filter(enabled=True).order_by("position", "id"))
    expected = ["rq-ops-portal"] + [slugify(route.name) for route in _routes_for(portal_alert, enabled)]
    labels = {"alertname": twin["alert"], **twin["labels"]}
    quoted = [label + '="' + text.replace('"', '\\"') + '"' for label, text in labels.items()]
    result = subprocess.run([amtool, "config", "routes", "test", f"--config.file={output}", *quoted],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().split(",") == expected
    # An alert only Prometheus raises keeps its own name: the route reads it as written.
    other = subprocess.run([amtool, "config", "routes", "test", f"--config.file={output}",
                            "alertname=redis-unreachable", "severity=critical"],
                           capture_output=True, text=True, timeout=60)
    takes_other = _routes_for(Alert(name="redis-unreachable", severity="critical",
                                    labels={"alertname": "redis-unreachable", "severity": "critical"}), enabled)
    assert other.stdout.strip().split(",") == ["rq-ops-portal"] + [slugify(route.name) for route in takes_other]


@pytest.mark.usefixtures("db", "seeded_alert_rules")
def test_an_alertname_matcher_that_names_a_twin_but_not_its_rule_is_kept_with_a_warning(settings, tmp_path, capsys):
    settings.ALERTS_WEBHOOK_TOKEN = TOKEN
    NotificationRoute.objects.create(name="Not Prometheus", severities=["critical"],
                                     matchers=[{"label": "alertname", "op": "!~", "value": "RQ.*"}])
    NotificationRoute.objects.create(name="Database", severities=["critical"],
                                     matchers=[{"label": "alertname", "op": "=", "value": "database-unreachable"}])
    config = export(tmp_path)
    not_prometheus, database = config["route"]["routes"][3:]
    assert not_prometheus["matchers"] == ['severity=~"critical"', 'alertname!~"RQ.*"']
    assert database["matchers"] == ['severity=~"critical"', 'alertname=~"database-unreachable|RQDatabaseUnreachable"']
    err = capsys.readouterr().err
    assert "'Not Prometheus': alertname!~RQ.* names Prometheus' RQDatabaseUnreachable" in err
