"""Configuration for the tools beside the portal, from the alert rule, route and channel rows: Prometheus' rules
file (the metrics wing's recording rules, the alerting rules, the watchers' rules) and an Alertmanager
configuration (with the portal's own webhook as first receiver).

The test suite checks the rules with ``promtool check rules``, the Alertmanager configuration with ``amtool
check-config``, and both end to end with Prometheus and Alertmanager running.
"""

from __future__ import annotations

import math
import re

import yaml

from monitoring.alerts.notify import PAGED_BY_ALERTMANAGER
from monitoring.matchers import matchers_match
from monitoring.metrics.exports import RECORDING_RULES
from monitoring.metrics.monitors import EVALUATOR, SAMPLER, expected_interval


def prometheus_alert_name(rule_name: str) -> str:
    """Prometheus wants alert names shaped like metric names: "redis-unreachable" becomes "RQRedisUnreachable"."""
    return "RQ" + "".join(part[:1].upper() + part[1:] for part in rule_name.replace("_", "-").split("-") if part)


def _duration(seconds: int) -> str:
    if seconds and seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def prometheus_alerting_rules(*, max_for_seconds: int | None = None) -> list[dict]:
    """The enabled alert rule rows as Prometheus alerting rules: the same signal, comparison, threshold and
    duration the portal's evaluator uses (monitoring.alerts.rules), with the rule's labels and runbook."""
    from django.conf import settings
    from django.urls import reverse

    from monitoring.alerts.rules import SIGNALS
    from monitoring.models import AlertRule

    rules = []
    for rule in AlertRule.objects.filter(enabled=True).order_by("name"):
        signal = SIGNALS.get(rule.signal)
        if signal is None:
            continue
        seconds = rule.for_seconds if max_for_seconds is None else min(rule.for_seconds, max_for_seconds)
        runbook_url = rule.runbook_url or settings.PORTAL_URL + reverse("admin:monitoring_alertrule_change",
                                                                        args=[rule.pk])
        entry = {"alert": prometheus_alert_name(rule.name), "expr": signal.condition(rule)}
        if rule.signal == "monitoring_silent" and rule.comparison in (">", ">="):
            entry["expr"] = f"({entry['expr']}) or on() {monitor_never_ran(rule)}"
        if seconds:
            entry["for"] = _duration(seconds)
        # The portal's clear time: a firing alert resolves only after its condition has stayed away this long.
        clear = rule.clear_seconds if max_for_seconds is None else min(rule.clear_seconds, max_for_seconds)
        if clear:
            entry["keep_firing_for"] = _duration(clear)
        # notified_by: the portal's evaluator pages for its rules and the exported Alertmanager configuration sends
        # these twins nowhere, so one condition is never paged twice (alertmanager_config). Except where the portal
        # cannot page while the condition holds: with the database down it writes nothing (it records the outage
        # once the database answers, and notifies nothing about it), so Prometheus' twin is the live page.
        notifier = "alertmanager" if rule.signal in PAGED_BY_ALERTMANAGER else "portal"
        entry["labels"] = {**{str(key): str(value) for key, value in (rule.labels or {}).items()},
                           "severity": rule.severity, "component": rule.component, "rule": rule.name,
                           NOTIFIED_BY: notifier}
        entry["annotations"] = {"summary": rule.title, "description": signal.label, "runbook": rule.runbook,
                                "runbook_url": runbook_url}
        rules.append(entry)
    return rules


NOTIFIED_BY = "notified_by"  # the label saying who pages for an exported alert: "portal" or "alertmanager"
WATCHDOG = "RQWatchdog"
MONITORING_DOWN = "RQPortalMonitoringDown"
MONITOR_LAST_PASS = "rq_monitor_last_pass_timestamp_seconds"


def monitor_never_ran(rule) -> str:
    """PromQL for the monitoring-stale twin's other case: one monitor never passed, so its series is absent and the
    signal's ratio has nothing to say about it, while the other's series was already there as many of the first
    one's intervals ago as the rule's threshold: it had its chance (as the portal's rule counts a monitor that never
    ran from the other's start). A start whose sampler has not finished its first minute, or a Prometheus that
    scrapes no portal at all, does not fire it. A monitor that ran once keeps its series (its last pass only ages,
    and the ratio judges it)."""
    cases = []
    for silent, other in ((SAMPLER, EVALUATOR), (EVALUATOR, SAMPLER)):
        grace = _duration(math.ceil(max(rule.threshold, 1) * expected_interval(silent)))
        cases.append(f'(absent({MONITOR_LAST_PASS}{{monitor="{silent}"}}) '
                     f'and on() {MONITOR_LAST_PASS}{{monitor="{other}"}} offset {grace})')
    return " or on() ".join(cases)


def watcher_rules(*, max_for_seconds: int | None = None) -> list[dict]:
    """The Prometheus-only alerts, which Alertmanager pages for: what the portal cannot say about itself.

    - RQWatchdog always fires. Alertmanager sends it to an outside dead man's switch every minute (the receiver the
      operator names); when the messages stop, Prometheus, its rules or Alertmanager stopped.
    - RQPortalMonitoringDown: both of the portal's monitors (the sampler and the alert evaluator) have been silent
      for three of their intervals, or Prometheus cannot read them at all. Either one alone is the portal's own
      monitoring-stale rule, which the other pages for; with both silent nothing in the portal can page."""
    silent = ("min((time() - rq_monitor_last_pass_timestamp_seconds) / (rq_monitor_interval_seconds > 0)) >= 3 "
              "or absent(rq_monitor_last_pass_timestamp_seconds)")
    wait = 300 if max_for_seconds is None else min(300, max_for_seconds)
    return [
        {"alert": WATCHDOG, "expr": "vector(1)",
         "labels": {"severity": "none", "component": "monitoring", NOTIFIED_BY: "alertmanager"},
         "annotations": {"summary": "Always firing: Prometheus and Alertmanager work (a dead man's switch expects it "
                                    "every minute)"}},
        {"alert": MONITORING_DOWN, "expr": silent, **({"for": _duration(wait)} if wait else {}),
         "labels": {"severity": "critical", "component": "monitoring", NOTIFIED_BY: "alertmanager"},
         "annotations": {"summary": "The portal's sampler and alert evaluator are both silent: nothing in the portal "
                                    "can page",
                         "runbook": "Start `manage.py evaluate_alerts` and `manage.py run_sampler` (or the portal's "
                                    "runner); /api/rq/health names both, with the age of their last pass."}},
    ]


def prometheus_rules(*, max_for_seconds: int | None = None) -> str:
    return yaml.safe_dump({"groups": _rule_groups(max_for_seconds=max_for_seconds)}, sort_keys=False, width=120)


def prometheus_rule_resource(*, name: str = "rq-ops-portal", max_for_seconds: int | None = None) -> str:
    """The same groups as a PrometheusRule for the Prometheus Operator (its ruleSelector must match the labels)."""
    resource = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "rq-ops-portal",
                                                      "app.kubernetes.io/component": "alerts",
                                                      # kube-prometheus-stack's rule selector (its release name)
                                                      "release": "prometheus"}},
                "spec": {"groups": _rule_groups(max_for_seconds=max_for_seconds)}}
    header = ("# Generated by `manage.py export_prometheus_rules --format prometheusrule` from the alert rule "
              "rows.\n# Export again after changing rules in the admin; kubectl apply -f this file.\n")
    return header + yaml.safe_dump(resource, sort_keys=False, width=120)


def _rule_groups(*, max_for_seconds: int | None = None) -> list[dict]:
    groups = [
        {"name": "rq-ops-portal.recording", "interval": "30s",
         "rules": [{"record": name, "expr": expr} for name, expr in RECORDING_RULES]},
        {"name": "rq-ops-portal.alerts", "rules": prometheus_alerting_rules(max_for_seconds=max_for_seconds)},
        {"name": "rq-ops-portal.watchers", "rules": watcher_rules(max_for_seconds=max_for_seconds)},
    ]
    return groups


ALERTMANAGER_PORTAL_RECEIVER = "rq-ops-portal"
WATCHDOG_RECEIVER = "watchdog"
PORTAL_NOTIFIES_RECEIVER = "notified-by-portal"  # sends nothing: the portal pages for these
# Where the config tells Alertmanager to read the webhook token when ALERTS_WEBHOOK_TOKEN is not set here.
ALERTMANAGER_TOKEN_FILE = "/etc/prometheus/rq-ops-portal-alerts-token"


def _am_quote(value: str) -> str:
    """A matcher value in Alertmanager's quoting (its labels.ParseMatcher): backslash, double quote, line feed."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _am_regex_literal(value: str) -> str:
    """``value`` as a pattern matching itself only, in RE2's syntax (Alertmanager's): its metacharacters escaped."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", value)


def _am_alertname(route, op: str, value: str, twins: dict[str, str], warn) -> tuple[str, str]:
    """An ``alertname`` matcher's operator and value for Alertmanager, meaning what it means to the portal.

    The portal's alert of a rule is named for the rule ("database-unreachable"); Prometheus' twin of it is
    "RQDatabaseUnreachable". For the rules whose twin Alertmanager pages (``twins``: rule name to twin name) the
    matcher also takes, or also refuses, the twin when it takes, or refuses, the rule's name in the portal (the
    portal's own matching decides: RE2, anchored): ``alertname=database-unreachable`` becomes
    ``alertname=~"database-unreachable|RQDatabaseUnreachable"``, ``alertname!=database-unreachable`` becomes
    ``alertname!~...``, and a pattern gets the twins of the rule names it matches as alternatives. Any other alert
    carries its own name in both, so the matcher is kept as it is when no such rule name matches. A matcher that
    names a twin itself but not its rule (``alertname!~"RQ.*"``) is kept as written, with a warning: Alertmanager
    reads it by the twin's name, the portal by the rule's."""
    positive = {"=": "=", "!=": "=", "=~": "=~", "!~": "=~"}[op]

    def takes(name: str) -> bool:
        return matchers_match([{"label": "alertname", "op": positive, "value": value}], {"alertname": name})

    taken = [twin for name, twin in sorted(twins.items()) if takes(name)]
    for name, twin in sorted(twins.items()):
        if twin not in taken and takes(twin):
            warn(f"Route {route.name!r}: alertname{op}{value} names Prometheus' {twin} but not the portal's rule "
                 f"{name}: Alertmanager reads it by the first name, the portal by the second.")
    if not taken:
        return op, value
    pattern = f"(?:{value})" if positive == "=~" else _am_regex_literal(value)
    return ("=~" if positive == op else "!~"), "|".join([pattern, *map(_am_regex_literal, taken)])


def _am_matchers(route, twins: dict[str, str], warn) -> list[str]:
    """The route's severities and label matchers as Alertmanager matchers. A route that takes every severity has no
    severity matcher: every portal alert has one of the four, but an alert only Prometheus raises may have none or
    another ("everything to Slack" must take it too). ``twins``: see _am_alertname."""
    from monitoring.models import Severity

    matchers = [] if set(route.severities) >= set(Severity.values) else \
        [f"severity=~{_am_quote('|'.join(route.severities))}"]
    for matcher in route.matchers or []:
        label, op, value = str(matcher.get("label", "")), matcher.get("op", "="), str(matcher.get("value", ""))
        if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", label) or op not in ("=", "!=", "=~", "!~"):
            raise ValueError(f"route {route.name!r}: the matcher {label}{op}{value} is not one Alertmanager takes "
                             f"(a label name of letters, digits and _, and one of =, !=, =~, !~)")
        if label == "alertname":
            op, value = _am_alertname(route, op, value, twins, warn)
        matchers.append(f"{label}{op}{_am_quote(value)}")
    return matchers


def _am_receiver_configs(route, warn) -> dict[str, list[dict]]:
    """Alertmanager's configs for the route's enabled channels, keyed email_configs, slack_configs, ..."""
    from monitoring.alerts.transports import TRANSPORTS

    configs: dict[str, list[dict]] = {}
    for channel in route.channels.all():
        if not channel.enabled:
            continue
        config = channel.config or {}
        transport = TRANSPORTS.get(channel.kind)
        errors = transport.config_errors(config) if transport else {"kind": f"unknown kind {channel.kind!r}"}
        if errors:
            warn(f"Channel {channel.name!r} left out of route {route.name!r}: "
                 + "; ".join(f"{field}: {problem}" for field, problem in errors.items()))
            continue
        resolved = {"send_resolved": route.send_resolved}
        if channel.kind == "email":
            configs.setdefault("email_configs", []).append({"to": ", ".join(config["to"]), **resolved})
        elif channel.kind == "slack":
            configs.setdefault("slack_configs", []).append({"api_url": config["url"], **resolved})
        elif channel.kind == "webhook":
            entry = {"url": config["url"], **resolved}
            if config.get("token"):
                entry["http_config"] = {"authorization": {"type": "Bearer", "credentials": config["token"]}}
            configs.setdefault("webhook_configs", []).append(entry)
            warn(f"Webhook channel {channel.name!r}: Alertmanager posts its own JSON (payload version 4), not the "
                 f"portal's (version 1)" + (", and without the channel's extra headers (Alertmanager 0.25 cannot "
                                            "send them)" if config.get("headers") else ""))
        elif channel.kind == "pagerduty":
            # Our severities are PagerDuty's; a group of mixed severities falls back as the portal's transport does.
            entry = {"routing_key": config["routing_key"],
                     "severity": "{{ if .CommonLabels.severity }}{{ .CommonLabels.severity }}{{ else }}warning"
                                 "{{ end }}", **resolved}
            if config.get("url"):
                entry["url"] = config["url"]
            configs.setdefault("pagerduty_configs", []).append(entry)
    return configs


def alertmanager_config(*, portal_url: str | None = None, max_group_wait_seconds: int | None = None,
                        group_interval_seconds: int = 10, watchdog_url: str | None = None,
                        warn=lambda message: None) -> str:
    """A Prometheus Alertmanager configuration (YAML) built from the same rows the portal notifies through.

    One notifier per condition. The root route's children, in order:
    1. RQWatchdog (always firing) goes to the receiver "watchdog": ``watchdog_url``, an outside dead man's switch,
       every minute; nowhere (with a warning) when none is named.
    2. Alerts labelled notified_by="portal" (the twins of the portal's own rules) go to the receiver
       "notified-by-portal", which sends nothing: the portal's evaluator pages for them, with its silences,
       acknowledgements, inhibition and escalation. Paging from here too sent every condition twice, to different
       incidents.
    3. Every other alert goes to the portal's webhook (receiver "rq-ops-portal", grouped by all labels since the
       portal records each alert itself) and continues, so the history holds every alert Prometheus raises and the
       portal does not judge itself.
    Then come the enabled NotificationRoutes in position order, each its own receiver with its enabled channels,
    matching on its severities (none when it takes all four: then also alerts with no severity or another one) and
    label matchers (an ``alertname`` one also takes the twins Alertmanager pages for the rule names it takes:
    _am_alertname), with its group_by, group_wait, repeat_interval and "continue". A route that takes no severity
    is left out (it takes nothing). A route without enabled channels stays, with a receiver that sends nothing: as
    in the portal, the alerts it takes do not reach the routes after it unless it continues. An empty group_by
    means one group for everything (Alertmanager 0.25 reads an empty list as "inherit the parent's", and the root
    groups by nothing).

    The rules' inhibitions (AlertRule.inhibited_by) are not exported: Alertmanager's inhibition mutes an alert
    for every receiver, the portal's webhook included, and the history must hold it.

    ``warn`` receives one sentence per thing the operator should know (a channel left out, a missing token).
    Raises ValueError for a route matcher Alertmanager cannot express.
    """
    from django.conf import settings
    from django.urls import reverse
    from django.utils.text import slugify

    from monitoring.models import AlertRule, NotificationRoute

    portal_url = (portal_url or settings.PORTAL_URL).rstrip("/")
    token = settings.ALERTS_WEBHOOK_TOKEN
    if token:
        authorization = {"type": "Bearer", "credentials": token}
    else:
        authorization = {"type": "Bearer", "credentials_file": ALERTMANAGER_TOKEN_FILE}
        warn(f"ALERTS_WEBHOOK_TOKEN is not set, so the portal refuses Alertmanager's webhook (403). The config "
             f"reads the token from {ALERTMANAGER_TOKEN_FILE}: set ALERTS_WEBHOOK_TOKEN on the portal and write the "
             f"same value to that file, or export again once it is set.")
    watchdog = {"name": WATCHDOG_RECEIVER}
    if watchdog_url:
        watchdog["webhook_configs"] = [{"url": watchdog_url, "send_resolved": False}]
    else:
        warn(f"No --watchdog-url: {WATCHDOG} (always firing) goes nowhere. Name your dead man's switch (a "
             f"heartbeat URL that pages when the messages stop) so a stopped Prometheus or Alertmanager is noticed.")
    receivers = [watchdog, {"name": PORTAL_NOTIFIES_RECEIVER},
                 {"name": ALERTMANAGER_PORTAL_RECEIVER, "webhook_configs": [{
                     "url": portal_url + reverse("alertmanager-webhook"), "send_resolved": True,
                     "http_config": {"authorization": authorization}}]}]
    routes = [{"receiver": WATCHDOG_RECEIVER, "matchers": [f"alertname={_am_quote(WATCHDOG)}"], "group_by": [],
               "group_wait": "0s", "group_interval": "1m", "repeat_interval": "1m"},
              {"receiver": PORTAL_NOTIFIES_RECEIVER, "matchers": [f'{NOTIFIED_BY}="portal"'], "group_by": [],
               "group_wait": "0s"},
              {"receiver": ALERTMANAGER_PORTAL_RECEIVER, "group_by": ["..."], "group_wait": "0s", "continue": True}]

    names = {ALERTMANAGER_PORTAL_RECEIVER, WATCHDOG_RECEIVER, PORTAL_NOTIFIES_RECEIVER}
    twins = {rule.name: prometheus_alert_name(rule.name)
             for rule in AlertRule.objects.filter(enabled=True, signal__in=PAGED_BY_ALERTMANAGER)}
    enabled_routes = NotificationRoute.objects.filter(enabled=True).order_by("position", "id")
    for route in enabled_routes.prefetch_related("channels"):
        if not route.severities:
            warn(f"Route {route.name!r} left out: it takes no severity.")
            continue
        base = name = slugify(route.name) or "route"
        number = 1
        while name in names:
            number += 1
            name = f"{base}-{number}"
        names.add(name)
        configs = _am_receiver_configs(route, warn)
        receivers.append({"name": name, **configs})
        group_wait = route.group_wait_seconds if max_group_wait_seconds is None else \
            min(route.group_wait_seconds, max_group_wait_seconds)
        routes.append({"receiver": name, "matchers": _am_matchers(route, twins, warn),
                       "group_by": list(route.group_by or []),
                       "group_wait": _duration(group_wait),
                       # Alertmanager refuses 0; the portal reminds at every pass then, the nearest is 1 s.
                       "repeat_interval": _duration(max(route.repeat_interval_seconds, 1)),
                       "continue": route.continue_matching})

    config = {"global": {"resolve_timeout": "5m"}}  # the monitoring guide's (and Alertmanager's default)
    if any("email_configs" in receiver for receiver in receivers):
        config["global"] = {**config["global"], "smtp_smarthost": f"{settings.EMAIL_HOST}:{settings.EMAIL_PORT}",
                            "smtp_from": settings.DEFAULT_FROM_EMAIL,
                            # Alertmanager requires STARTTLS unless told not to; Django uses it only when asked.
                            "smtp_require_tls": bool(settings.EMAIL_USE_TLS)}
        if settings.EMAIL_HOST_USER:
            config["global"]["smtp_auth_username"] = settings.EMAIL_HOST_USER
            config["global"]["smtp_auth_password"] = settings.EMAIL_HOST_PASSWORD
        if getattr(settings, "EMAIL_USE_SSL", False) and int(settings.EMAIL_PORT) != 465:
            warn(f"EMAIL_USE_SSL is set but EMAIL_PORT is {settings.EMAIL_PORT}: Alertmanager uses implicit TLS "
                 f"only on port 465, so its email will not be encrypted.")
    config["route"] = {"receiver": ALERTMANAGER_PORTAL_RECEIVER, "group_by": [],
                       "group_interval": _duration(group_interval_seconds), "routes": routes}
    config["receivers"] = receivers
    header = ("# Generated by `manage.py export_alertmanager_config` from the portal's notification routes and "
              "channels.\n# Edit those in the admin and export again rather than editing this file.\n")
    return header + yaml.safe_dump(config, sort_keys=False, width=120)
