from django.conf import settings
from django.db import models
from django.dispatch import Signal
from django.utils import timezone

from monitoring.matchers import LABEL_NAME, MatcherError, matchers_match, matchers_validate


class MetricSample(models.Model):
    """Figures of one queue (or of the fleet, queue "") over one minute, or one hour once downsampled.

    ``minutes`` is how much time the counts cover, the denominator of every rate read from samples: 1 for a minute
    sample, more for the sample a sampler writes after a gap (the deltas since its last sample), and for an hourly
    sample the sum over the minute samples folded into it (less than 60 when the sampler was down for part of it).
    """

    class Resolution(models.TextChoices):
        MINUTE = "1m", "minute"
        HOUR = "1h", "hour"

    at = models.DateTimeField(help_text="Start of the period.")
    resolution = models.CharField(max_length=2, choices=Resolution.choices, default=Resolution.MINUTE)
    minutes = models.PositiveIntegerField(default=1, help_text="Minutes the counts cover (rates divide by this).")
    queue = models.CharField(max_length=10, blank=True, help_text="Empty for fleet-wide figures.")
    depth = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    retried = models.PositiveIntegerField(default=0)
    processing_p50 = models.FloatField(null=True, blank=True)
    processing_p95 = models.FloatField(null=True, blank=True)
    processing_sum = models.FloatField(default=0)
    processing_count = models.PositiveIntegerField(
        default=0, help_text="Attempts timed in the period, whatever their outcome (the average's denominator).")
    wait_p50 = models.FloatField(null=True, blank=True)
    wait_p95 = models.FloatField(null=True, blank=True)
    workers = models.PositiveIntegerField(default=0)
    busy_ratio = models.FloatField(default=0)

    class Meta:
        ordering = ["at"]
        constraints = [models.UniqueConstraint(fields=["resolution", "queue", "at"], name="sample_unique_period")]
        indexes = [models.Index(fields=["queue", "at"], name="sample_queue_at_idx")]

    def __str__(self) -> str:
        return f"{self.queue or 'fleet'} {self.at:%Y-%m-%d %H:%M} ({self.resolution})"


# --- alerts -------------------------------------------------------------------------------------------------------
# How they fit together (monitoring/alerts/evaluate.py explains the evaluation, alerts/notify.py the delivery):
# an AlertRule is a condition on one signal; each condition that holds is one Alert (found again by its fingerprint)
# whose every state change, acknowledgement, notification and escalation is an AlertEvent. Silences and shelving
# stop notifications, never the history. Routes pick channels for an alert; each message sent is a Notification,
# each try to send it a DeliveryAttempt.


class Severity(models.TextChoices):
    CRITICAL = "critical", "critical"
    ERROR = "error", "error"
    WARNING = "warning", "warning"
    INFO = "info", "info"


SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2, Severity.CRITICAL: 3}


class AlertRule(models.Model):
    """One condition the portal evaluates itself, and exports as a Prometheus alerting rule (the same row)."""

    class Comparison(models.TextChoices):
        ABOVE = ">", "above"
        AT_LEAST = ">=", "at least"
        BELOW = "<", "below"
        AT_MOST = "<=", "at most"

    name = models.SlugField(max_length=60, unique=True, help_text="Stable identifier; the alert's 'alertname'.")
    title = models.CharField(max_length=200, help_text="What the alert says, e.g. 'Redis is unreachable'.")
    signal = models.CharField(max_length=40, help_text="The figure the rule watches (see monitoring/alerts/rules.py).")
    comparison = models.CharField(max_length=2, choices=Comparison.choices, default=Comparison.ABOVE)
    threshold = models.FloatField()
    for_seconds = models.PositiveIntegerField(
        "for (seconds)", default=0, help_text="How long the condition must hold before the alert fires (0: at once).")
    clear_seconds = models.PositiveIntegerField(
        "clear after (seconds)", default=60,
        help_text="How long the condition must stay false before a firing alert resolves; a condition that returns "
                  "within this time continues the same alert (flapping is counted, not re-notified).")
    severity = models.CharField(max_length=10, choices=Severity.choices, default=Severity.WARNING)
    component = models.CharField(max_length=20, help_text="What the alert concerns: redis, database, workers, "
                                                          "queues, tasks, health.")
    labels = models.JSONField(default=dict, blank=True,
                              help_text='Extra labels; "queue" scopes a per-queue signal, e.g. {"queue": "normal"}.')
    enabled = models.BooleanField(default=True)
    runbook = models.TextField(blank=True, help_text="What to do, shown on the alert.")
    runbook_url = models.URLField(blank=True)
    inhibited_by = models.ManyToManyField(
        "self", symmetrical=False, blank=True, related_name="inhibits",
        help_text="While an alert of one of these rules fires, this rule's alerts are marked as caused by it and "
                  "not notified separately.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        permissions = [("export_alert_rules", "Can export alerting rules and configuration")]

    def __str__(self) -> str:
        return self.title

    # Labels every alert of a rule carries from the rule's own fields; extra labels may not replace them (two rules
    # could otherwise share a fingerprint, or a warning rule call itself critical).
    RESERVED_LABELS = ("alertname", "severity", "component", "rule")

    def all_labels(self) -> dict[str, str]:
        """The labels an alert of this rule carries (its fingerprint is computed from them)."""
        extra = self.labels if isinstance(self.labels, dict) else {}
        return {**{str(key): str(value) for key, value in extra.items()},
                "alertname": self.name, "severity": self.severity, "component": self.component}

    def clean(self):
        from django.core.exceptions import ValidationError

        labels = self.labels
        if not isinstance(labels, dict) or not all(isinstance(key, str) and isinstance(value, str)
                                                   for key, value in labels.items()):
            raise ValidationError({"labels": 'Give an object of text labels, e.g. {"queue": "normal"}.'})
        reserved = sorted(set(labels) & set(self.RESERVED_LABELS))
        if reserved:
            raise ValidationError({"labels": f"{', '.join(reserved)} come from the rule's own fields (the exported "
                                             f"rules carry the rule's name as 'rule'); remove them."})
        if any(not LABEL_NAME.fullmatch(key) for key in labels):
            raise ValidationError({"labels": "Label names are ASCII letters, digits and underscores, not starting "
                                             "with a digit (as in Prometheus)."})
        if "queue" in labels:
            from queues.models import Priority

            if labels["queue"] not in Priority.values:
                raise ValidationError({"labels": f"queue must be one of {', '.join(Priority.values)}; "
                                                 f"{labels['queue']!r} is not a queue (its figure would read 0 and "
                                                 f"never fire)."})

    def breached(self, value: float) -> bool:
        return {">": value > self.threshold, ">=": value >= self.threshold, "<": value < self.threshold,
                "<=": value <= self.threshold}[self.comparison]


QUEUE_LABEL_MAX = 100


def queue_label(labels) -> str:
    """An alert's ``queue`` label as its indexed column holds it ("" without one, or one too long to index: the
    history's filter then reads the JSON)."""
    value = labels.get("queue") if isinstance(labels, dict) else None
    return value if isinstance(value, str) and len(value) <= QUEUE_LABEL_MAX else ""


class AlertQuerySet(models.QuerySet):
    def open(self):
        return self.filter(state__in=(Alert.State.PENDING, Alert.State.FIRING))

    def firing(self):
        return self.filter(state=Alert.State.FIRING)

    def open_from(self, source: str):
        """The open alerts of one source: a search of the state index, a handful of rows however long the history.
        Written as ``source != <the other>``, not ``source = <this one>``: SQLite (without ANALYZE figures) took the
        equality for the more selective term and walked the (source, started_at) index over every alert of that
        source ever written (76 ms of a 97 ms evaluator pass at 200,000 alerts); an inequality is never looked up
        in an index."""
        others = [value for value in Alert.Source.values if value != source]
        return self.open().exclude(source__in=others)


class Alert(models.Model):
    """One occurrence of a condition, from the first time it held to its resolution.

    ``open_key`` is the fingerprint while the alert is pending or firing and NULL once resolved: a unique column, so
    the database itself refuses a second open alert for one condition (MySQL has no conditional unique index)."""

    class State(models.TextChoices):
        PENDING = "pending", "pending"
        FIRING = "firing", "firing"
        RESOLVED = "resolved", "resolved"

    class Source(models.TextChoices):
        PORTAL = "portal", "portal"
        ALERTMANAGER = "alertmanager", "Prometheus Alertmanager"

    rule = models.ForeignKey(AlertRule, null=True, blank=True, on_delete=models.SET_NULL, related_name="alerts")
    source = models.CharField(max_length=12, choices=Source.choices, default=Source.PORTAL)
    name = models.CharField(max_length=200, help_text="The rule's name, or Prometheus' alertname.")
    fingerprint = models.CharField(max_length=64, db_index=True)
    open_key = models.CharField(max_length=64, null=True, blank=True, unique=True, editable=False)
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    severity = models.CharField(max_length=10, choices=Severity.choices, default=Severity.WARNING)
    component = models.CharField(max_length=40, blank=True)
    summary = models.CharField(max_length=500)
    labels = models.JSONField(default=dict, blank=True)
    queue = models.CharField(max_length=QUEUE_LABEL_MAX, blank=True, default="", editable=False, help_text=(
        "The labels' queue, copied on save: the history's ?label=queue= filter reads it through an index."))
    annotations = models.JSONField(default=dict, blank=True)
    value = models.FloatField(null=True, blank=True, help_text="The signal's value when last evaluated.")
    threshold = models.FloatField(null=True, blank=True)
    started_at = models.DateTimeField(db_index=True, help_text="When the condition first held.")
    holding_since = models.DateTimeField(help_text="Start of the current unbroken stretch of the condition (the "
                                                   "rule's 'for' counts from here).")
    fired_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    last_seen_at = models.DateTimeField(help_text="Last evaluation (or webhook) that saw the condition hold.")
    cleared_at = models.DateTimeField(null=True, blank=True,
                                      help_text="Since when the condition no longer holds (resolving after the "
                                                "rule's clear time).")
    flaps = models.PositiveIntegerField(default=0, help_text="Times the condition cleared and returned.")
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                        related_name="+")
    acknowledgement_note = models.CharField(max_length=500, blank=True)
    shelved_until = models.DateTimeField(null=True, blank=True)
    shelved_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    inhibited_by = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="caused",
                                     help_text="The firing alert that causes this one (not notified separately).")
    silenced_by = models.ForeignKey("Silence", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    escalation_level = models.PositiveSmallIntegerField(default=0, help_text="The highest level any policy reached.")
    escalated_at = models.DateTimeField(null=True, blank=True, help_text="When the last escalation level was told.")
    escalations = models.JSONField(default=dict, blank=True, help_text=(
        'Each escalation policy\'s own progress: {"<policy id>": {"level": 2, "at": "<ISO time>"}}.'))
    notified_at = models.DateTimeField(null=True, blank=True, help_text="Last firing notification sent.")
    resolved_notified = models.BooleanField(
        default=False, help_text="Its resolution has been sent, or there is none to send (nobody was told it fired).")
    generator_url = models.URLField(max_length=1000, blank=True)

    objects = AlertQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at", "-id"]
        permissions = [("acknowledge_alert", "Can acknowledge, silence and shelve alerts")]
        indexes = [
            models.Index(fields=["state", "-started_at"], name="alert_state_started_idx"),
            models.Index(fields=["rule", "-started_at"], name="alert_rule_started_idx"),
            models.Index(fields=["severity", "-started_at"], name="alert_severity_started_idx"),
            # The planner's resolutions still owed: a handful of rows, whatever the history holds.
            models.Index(fields=["resolved_notified", "state"], name="alert_pending_resolution_idx"),
            # The history's filters by component and by source, newest first.
            models.Index(fields=["component", "-started_at"], name="alert_component_started_idx"),
            models.Index(fields=["source", "-started_at"], name="alert_source_started_idx"),
            models.Index(fields=["queue", "-started_at"], name="alert_queue_started_idx"),
        ]
        constraints = [
            # One row per occurrence: two Alertmanager peers delivering the same alert at once (a first delivery
            # that is already resolved has no open_key to collide on) cannot both write it.
            models.UniqueConstraint(fields=["source", "fingerprint", "started_at"], name="alert_unique_occurrence"),
        ]

    def __str__(self) -> str:
        return f"{self.summary} ({self.state})"

    def save(self, *args, **kwargs):
        self.queue = queue_label(self.labels)
        update_fields = kwargs.get("update_fields")
        if update_fields is not None and "labels" in update_fields and "queue" not in update_fields:
            kwargs["update_fields"] = [*update_fields, "queue"]
        super().save(*args, **kwargs)

    @property
    def is_open(self) -> bool:
        return self.state != self.State.RESOLVED

    def is_shelved(self, now) -> bool:
        return self.shelved_until is not None and self.shelved_until > now

    @property
    def runbook_url(self) -> str:
        return (self.rule.runbook_url if self.rule_id and self.rule else "") or self.annotations.get("runbook_url", "")

    @property
    def time_to_acknowledge(self):
        start = self.fired_at or self.started_at
        return self.acknowledged_at - start if self.acknowledged_at and start else None

    @property
    def time_to_resolve(self):
        start = self.fired_at or self.started_at
        return self.resolved_at - start if self.resolved_at and start else None


# Sent with the rows an AlertEvent bulk_create() wrote: bulk_create sends no post_save, and the live dashboards
# (monitoring.live.events) listen for new timeline lines on both.
alert_events_created = Signal()


class AlertEventManager(models.Manager):
    def bulk_create(self, objs, *args, **kwargs):
        created = super().bulk_create(objs, *args, **kwargs)
        alert_events_created.send(sender=AlertEvent, rows=created)
        return created


class AlertEvent(models.Model):
    """One line of an alert's timeline."""

    class Kind(models.TextChoices):
        PENDING = "pending", "Pending"
        FIRING = "firing", "Firing"
        CLEARED = "cleared", "Condition cleared"
        RETURNED = "returned", "Condition returned"
        RESOLVED = "resolved", "Resolved"
        ACKNOWLEDGED = "acknowledged", "Acknowledged"
        UNACKNOWLEDGED = "unacknowledged", "Acknowledgement removed"
        SHELVED = "shelved", "Shelved"
        UNSHELVED = "unshelved", "Unshelved"
        SILENCED = "silenced", "Silenced"
        INHIBITED = "inhibited", "Caused by another alert"
        NOTIFIED = "notified", "Notified"
        NOTIFICATION_FAILED = "notification_failed", "Notification failed"
        ESCALATED = "escalated", "Escalated"
        UPDATED = "updated", "Updated by Alertmanager"
        EXPIRED = "expired", "Expired (no longer reported)"

    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(default=timezone.now)
    kind = models.CharField(max_length=20, choices=Kind.choices)
    message = models.CharField(max_length=500, blank=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="+")
    detail = models.JSONField(default=dict, blank=True)

    objects = AlertEventManager()

    class Meta:
        ordering = ["at", "id"]
        indexes = [models.Index(fields=["alert", "at"], name="alertevent_alert_at_idx"),
                   models.Index(fields=["kind", "at"], name="alertevent_kind_at_idx")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.message}".strip()


class Silence(models.Model):
    """Stops notifications for matching alerts between two times. Matching alerts still appear in the history."""

    matchers = models.JSONField(help_text='List of {"label", "op", "value"}; "alertname" is the rule. op is one '
                                          'of =, !=, =~ (regular expression), !~.')
    starts_at = models.DateTimeField(default=timezone.now)
    ends_at = models.DateTimeField()
    reason = models.CharField(max_length=500)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    expired_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+", help_text="Who ended it early.")

    class Meta:
        ordering = ["-starts_at", "-id"]
        indexes = [models.Index(fields=["ends_at"], name="silence_ends_at_idx")]

    def __str__(self) -> str:
        return ", ".join(f"{m.get('label')}{m.get('op', '=')}{m.get('value')}" for m in self.matchers or [])

    def is_active(self, now) -> bool:
        return self.starts_at <= now < self.ends_at

    def matches(self, labels: dict) -> bool:
        return matchers_match(self.matchers, labels)


class NotificationChannel(models.Model):
    """Where notifications go: an email list, a Slack incoming webhook, a JSON webhook, a PagerDuty service."""

    class Kind(models.TextChoices):
        EMAIL = "email", "Email"
        SLACK = "slack", "Slack incoming webhook"
        WEBHOOK = "webhook", "JSON webhook"
        PAGERDUTY = "pagerduty", "PagerDuty Events v2"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    config = models.JSONField(default=dict, help_text='email: {"to": [...]}; slack: {"url"}; webhook: {"url", '
                                                      '"token"?, "headers"?}; pagerduty: {"routing_key", "url"?}.')
    enabled = models.BooleanField(default=True)
    disabled_reason = models.CharField(max_length=500, blank=True)
    disabled_at = models.DateTimeField(null=True, blank=True)
    permanent_failures = models.PositiveIntegerField(
        default=0, help_text="Permanent failures in a row; the channel is disabled at DISABLE_AFTER.")
    created_at = models.DateTimeField(default=timezone.now)

    DISABLE_AFTER = 3

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.get_kind_display()})"



def severities_validate(value) -> None:
    from django.core.exceptions import ValidationError

    known = [choice for choice, _ in Severity.choices]
    if not isinstance(value, list) or not value or not all(item in known for item in value):
        raise ValidationError({"severities": f"Give a list of one or more of {', '.join(known)}, e.g. "
                                             f'["critical", "error"].'})


def _severities_default():
    return [Severity.CRITICAL, Severity.ERROR, Severity.WARNING]


class NotificationRoute(models.Model):
    """Which alerts go to which channels, grouped how, repeated how often (Alertmanager's route, as a row)."""

    name = models.CharField(max_length=100, unique=True)
    position = models.PositiveIntegerField(default=100, help_text="Routes are tried in this order.")
    severities = models.JSONField(default=_severities_default, help_text="Severities this route takes.")
    matchers = models.JSONField(default=list, blank=True, help_text='Label matchers, as on silences.')
    channels = models.ManyToManyField(NotificationChannel, related_name="routes")
    group_by = models.JSONField(default=list, blank=True,
                                help_text='Labels that split alerts into messages, e.g. ["alertname"]; empty: one '
                                          'message for everything that fires together.')
    group_wait_seconds = models.PositiveIntegerField(default=30, help_text="Wait this long for alerts that fire "
                                                                           "together before the first message.")
    repeat_interval_seconds = models.PositiveIntegerField(default=4 * 3600, help_text="Remind this often while an "
                                                                                       "alert fires unacknowledged.")
    send_resolved = models.BooleanField(default=True)
    continue_matching = models.BooleanField(default=False, help_text="Also try the routes after this one.")
    enabled = models.BooleanField(default=True)

    class Meta:
        ordering = ["position", "id"]

    def __str__(self) -> str:
        return self.name

    def clean(self):
        severities_validate(self.severities)
        from django.core.exceptions import ValidationError

        if self.matchers:
            try:
                matchers_validate(self.matchers)
            except MatcherError as error:
                raise ValidationError({"matchers": str(error)}) from None
        if not isinstance(self.group_by, list) or not all(isinstance(label, str) for label in self.group_by):
            raise ValidationError({"group_by": 'Give a list of label names, e.g. ["alertname"].'})

    def takes(self, alert: "Alert") -> bool:
        return self.enabled and isinstance(self.severities, list) and alert.severity in self.severities and \
            matchers_match(self.matchers, alert.labels)


class EscalationPolicy(models.Model):
    """If a firing alert of these severities is not acknowledged in time, the next level is notified."""

    name = models.CharField(max_length=100, unique=True)
    severities = models.JSONField(default=_severities_default)
    enabled = models.BooleanField(default=True)

    class Meta:
        verbose_name_plural = "escalation policies"

    def __str__(self) -> str:
        return self.name

    def clean(self):
        severities_validate(self.severities)


class EscalationStep(models.Model):
    policy = models.ForeignKey(EscalationPolicy, on_delete=models.CASCADE, related_name="steps")
    level = models.PositiveSmallIntegerField(help_text="1 is notified first (through the routes), then 2, ...")
    title = models.CharField(max_length=100, help_text="Who this level is, e.g. 'Database administrator'.")
    after_minutes = models.PositiveIntegerField(help_text="Minutes after firing, unacknowledged, to notify it.")
    channels = models.ManyToManyField(NotificationChannel, blank=True, related_name="escalation_steps")

    class Meta:
        ordering = ["policy", "level"]
        constraints = [models.UniqueConstraint(fields=["policy", "level"], name="escalation_step_unique_level")]

    def __str__(self) -> str:
        return f"{self.level}. {self.title} after {self.after_minutes} min"


class Notification(models.Model):
    """One message to one channel about a group of alerts; delivered by a worker, retried with backoff."""

    class Kind(models.TextChoices):
        FIRING = "firing", "Firing"
        REPEAT = "repeat", "Reminder"
        RESOLVED = "resolved", "Resolved"
        ESCALATION = "escalation", "Escalation"
        TEST = "test", "Test"

    class Status(models.TextChoices):
        PENDING = "pending", "Waiting to be sent"
        SENDING = "sending", "Sending"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Failed (permanent)"
        GAVE_UP = "gave_up", "Gave up after retries"

    channel = models.ForeignKey(NotificationChannel, on_delete=models.CASCADE, related_name="notifications")
    route = models.ForeignKey(NotificationRoute, null=True, blank=True, on_delete=models.SET_NULL)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    alerts = models.ManyToManyField(Alert, blank=True, related_name="notifications")
    group_key = models.CharField(max_length=300, blank=True)
    subject = models.CharField(max_length=300)
    body = models.JSONField(default=dict, help_text="The message as the transport receives it.")
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    claimed_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")

    MAX_ATTEMPTS = 6
    BACKOFF_SECONDS = (10, 30, 60, 300, 900)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="notification_due_idx")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} to {self.channel}: {self.subject}"


class DeliveryAttempt(models.Model):
    notification = models.ForeignKey(Notification, on_delete=models.CASCADE, related_name="delivery_attempts")
    channel = models.ForeignKey(NotificationChannel, on_delete=models.CASCADE, related_name="delivery_attempts")
    at = models.DateTimeField(default=timezone.now)

    class Outcome(models.TextChoices):
        DELIVERED = "delivered", "Delivered"
        TRANSIENT = "transient", "Transient failure"
        PERMANENT = "permanent", "Permanent failure"

    outcome = models.CharField(max_length=10, choices=Outcome.choices)
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True)
    duration_ms = models.PositiveIntegerField(default=0)
    worker = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.get_outcome_display()} {self.http_status or ''}".strip()


class Lease(models.Model):
    """A named lock with an expiry, in the database (it must work while Redis is down: the alert evaluator is what
    reports that). Taken and renewed by conditional update on the database's clock (monitoring.alerts.evaluate)."""

    name = models.CharField(max_length=50, unique=True)
    holder = models.CharField(max_length=200)
    expires_at = models.DateTimeField()

    class Meta:
        default_permissions = ()

    def __str__(self) -> str:
        return f"{self.name}: {self.holder} until {self.expires_at:%H:%M:%S}"


class MonitorPass(models.Model):
    """When each of the portal's own monitors last did its work: the sampler (per-minute samples) and the active alert
    evaluator. Written on the database's clock; read by the health report, /metrics and the monitoring-stale rule
    (monitoring.metrics.monitors)."""

    name = models.CharField(max_length=20, unique=True)
    holder = models.CharField(max_length=200, blank=True)
    at = models.DateTimeField()
    since = models.DateTimeField(null=True, help_text="When its present run of passes began (the first pass after it "
                                                      "had been silent): a monitor that never ran is judged by it.")
    interval_seconds = models.FloatField(help_text="How often it passes when it runs.")

    class Meta:
        default_permissions = ()

    def __str__(self) -> str:
        return f"{self.name}: {self.at:%H:%M:%S} ({self.holder})"
