"""Alerts over HTTP: the history with its filters, one alert with its timeline, acknowledge and shelve; silences
listed, created and expired. The same services and permissions as the admin's alert pages."""

from datetime import datetime, timedelta
from typing import Literal

from django.db.models import Q
from django.http import HttpResponse
from django.utils import timezone
from ninja import Field, Path, Query, Router, Schema, Status

from api.access import needs
from api.fields import Moment
from api.errors import ApiError, documented, not_found
from api.pages import DEFAULT, MOST, page
from monitoring.alerts.actions import (
    AlertError,
    alert_acknowledge,
    alert_shelve,
    alert_unacknowledge,
    silence_create,
    silence_expire,
)
from monitoring.alerts.selectors import alerts_labelled, label_pairs
from monitoring.matchers import MATCHER_OPS, MatcherError, matchers_validate
from monitoring.models import Alert, Severity, Silence
from portal.admin_pages import client_address

router = Router(tags=["alerts"])

ID = Path(..., ge=1, le=2 ** 63 - 1)
PERIODS = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
LONGEST = timedelta(days=365)  # the longest shelving or silence the API sets
ACKNOWLEDGE = "monitoring.acknowledge_alert"
TIMELINE_MOST = 300


def _user(user) -> str | None:
    return user.username if user is not None else None


class AlertOut(Schema):
    id: int
    name: str = Field(description="The rule's name, or Prometheus' alertname.")
    source: Alert.Source
    state: Alert.State
    severity: Severity
    component: str
    summary: str
    labels: dict[str, str]
    annotations: dict[str, str]
    value: float | None
    threshold: float | None
    started_at: datetime
    fired_at: datetime | None
    resolved_at: datetime | None
    last_seen_at: datetime
    flaps: int
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    acknowledgement_note: str
    shelved_until: datetime | None
    shelved_by: str | None
    silenced_by: int | None = Field(description="The silence that held its notifications back, if any.")
    escalation_level: int
    notified_at: datetime | None
    generator_url: str

    @staticmethod
    def resolve_acknowledged_by(alert) -> str | None:
        return _user(alert.acknowledged_by)

    @staticmethod
    def resolve_shelved_by(alert) -> str | None:
        return _user(alert.shelved_by)

    @staticmethod
    def resolve_silenced_by(alert) -> int | None:
        return alert.silenced_by_id

    @staticmethod
    def resolve_labels(alert) -> dict:
        return {str(key): str(value) for key, value in (alert.labels or {}).items()}

    @staticmethod
    def resolve_annotations(alert) -> dict:
        return {str(key): str(value) for key, value in (alert.annotations or {}).items()}


class AlertEventOut(Schema):
    at: datetime
    kind: str
    message: str
    user: str | None

    @staticmethod
    def resolve_user(event) -> str | None:
        return _user(event.user)


class AlertDetailOut(AlertOut):
    timeline: list[AlertEventOut] = Field(description=f"The newest {TIMELINE_MOST} events, oldest first.")

    @staticmethod
    def resolve_timeline(alert) -> list:
        # The newest TIMELINE_MOST, oldest first, as the alert's page shows them: a flapping alert has no bound.
        return list(alert.events.select_related("user").order_by("-at", "-id")[:TIMELINE_MOST])[::-1]


class AlertPage(Schema):
    results: list[AlertOut]
    next_cursor: str | None


class AlertFilters(Schema):
    state: Alert.State | None = None
    severity: Severity | None = None
    rule: str | None = Field(None, max_length=200, description="The rule's name (or Prometheus' alertname).")
    component: str | None = Field(None, max_length=40)
    source: Alert.Source | None = None
    period: Literal["24h", "7d", "30d"] | None = Field(None, description="Started within the last 24 h, 7 or 30 days.")
    started_after: Moment | None = None
    started_before: Moment | None = None
    label: str | None = Field(None, max_length=500, description="label=value, several separated by commas.")
    q: str | None = Field(None, max_length=200, description="Words of the summary, the name or the fingerprint.")
    cursor: str | None = Field(None, max_length=40, description="next_cursor of the previous page.")
    limit: int = Field(DEFAULT, ge=1, le=MOST)


class AcknowledgeIn(Schema):
    note: str = Field("", max_length=500)


class ShelveIn(Schema):
    until: Moment | None = Field(None, description="When notifications resume; or give duration_minutes.")
    duration_minutes: int | None = Field(None, ge=1, le=int(LONGEST.total_seconds() // 60))


class MatcherIn(Schema):
    label: str = Field(..., min_length=1, max_length=100)
    op: Literal[tuple(MATCHER_OPS)] = "="  # type: ignore[valid-type]
    value: str = Field("", max_length=1000)


class SilenceIn(Schema):
    matchers: list[MatcherIn] = Field(..., min_length=1, max_length=20)
    reason: str = Field(..., min_length=1, max_length=500)
    starts_at: Moment | None = Field(None, description="Omitted: now.")
    ends_at: Moment | None = Field(None, description="When it ends; or give duration_minutes.")
    duration_minutes: int | None = Field(None, ge=1, le=int(LONGEST.total_seconds() // 60))


class MatcherOut(Schema):
    label: str
    op: str
    value: str


class SilenceOut(Schema):
    id: int
    matchers: list[MatcherOut]
    reason: str
    starts_at: datetime
    ends_at: datetime
    state: Literal["pending", "active", "expired"]
    created_by: str | None
    created_at: datetime
    expired_by: str | None

    @staticmethod
    def resolve_state(silence) -> str:
        now = timezone.now()
        return "pending" if silence.starts_at > now else "active" if silence.ends_at > now else "expired"

    @staticmethod
    def resolve_created_by(silence) -> str | None:
        return _user(silence.created_by)

    @staticmethod
    def resolve_expired_by(silence) -> str | None:
        return _user(silence.expired_by)


class SilencePage(Schema):
    results: list[SilenceOut]
    next_cursor: str | None


class SilenceFilters(Schema):
    state: Literal["pending", "active", "expired"] | None = None
    cursor: str | None = Field(None, max_length=40, description="next_cursor of the previous page.")
    limit: int = Field(DEFAULT, ge=1, le=MOST)


def _alert(alert_id: int) -> Alert:
    alert = Alert.objects.select_related("acknowledged_by", "shelved_by").filter(pk=alert_id).first()
    if alert is None:
        raise not_found(f"alert {alert_id}")
    return alert


@router.get("/alerts", response={200: AlertPage, **documented()}, operation_id="alerts_list",
            summary="The alert history")
@needs("monitoring.view_alert")
def list_alerts(request, filters: Query[AlertFilters]):
    """Newest first, with the history page's filters."""
    alerts = Alert.objects.select_related("acknowledged_by", "shelved_by")
    exact = {"state": filters.state, "severity": filters.severity, "name": filters.rule,
             "component": filters.component, "source": filters.source,
             "started_at__gte": filters.started_after, "started_at__lt": filters.started_before}
    alerts = alerts.filter(**{name: value for name, value in exact.items() if value is not None})
    if filters.period:
        alerts = alerts.filter(started_at__gte=timezone.now() - PERIODS[filters.period])
    if filters.label:
        try:
            alerts = alerts_labelled(alerts, label_pairs(filters.label))
        except ValueError as error:
            raise ApiError(400, f"label: {error}", field="label") from None
    if filters.q:
        for word in filters.q.split():
            alerts = alerts.filter(Q(summary__icontains=word) | Q(name__icontains=word) |
                                   Q(fingerprint__icontains=word))
    return page(alerts, filters.cursor, filters.limit)


@router.get("/alerts/{alert_id}", response={200: AlertDetailOut, **documented(404)}, operation_id="alert_get",
            summary="An alert with its timeline")
@needs("monitoring.view_alert")
def get_alert(request, alert_id: int = ID):
    return _alert(alert_id)


@router.post("/alerts/{alert_id}/acknowledge", response={200: AlertOut, **documented(404, 409)},
             operation_id="alert_acknowledge", summary="Acknowledge an alert")
@needs(ACKNOWLEDGE)
def acknowledge(request, payload: AcknowledgeIn | None = None, alert_id: int = ID):
    """Reminders and escalation stop; the alert stays in the history and resolves as usual."""
    alert_acknowledge(alert=_alert(alert_id), user=request.auth.user, note=payload.note if payload else "",
                      address=client_address(request))
    return _alert(alert_id)


@router.post("/alerts/{alert_id}/unacknowledge", response={200: AlertOut, **documented(404, 409)},
             operation_id="alert_unacknowledge", summary="Remove an acknowledgement")
@needs(ACKNOWLEDGE)
def unacknowledge(request, alert_id: int = ID):
    alert_unacknowledge(alert=_alert(alert_id), user=request.auth.user, address=client_address(request))
    return _alert(alert_id)


@router.post("/alerts/{alert_id}/shelve", response={200: AlertOut, **documented(404, 409)},
             operation_id="alert_shelve", summary="Shelve an alert")
@needs(ACKNOWLEDGE)
def shelve(request, payload: ShelveIn, alert_id: int = ID):
    """No notifications for it until ``until`` (or for ``duration_minutes``); it stays in the history and on the
    banner. Alertmanager's alerts are silenced in Alertmanager, not here (409)."""
    now = timezone.now()
    if (payload.until is None) == (payload.duration_minutes is None):
        raise ApiError(400, "until: give either until or duration_minutes", field="until")
    until = payload.until or now + timedelta(minutes=payload.duration_minutes)
    if until <= now:
        raise ApiError(400, "until: must be in the future", field="until")
    if until > now + LONGEST:
        raise ApiError(400, "until: at most a year ahead", field="until")
    alert_shelve(alert=_alert(alert_id), user=request.auth.user, until=until, address=client_address(request))
    return _alert(alert_id)


@router.post("/alerts/{alert_id}/unshelve", response={200: AlertOut, **documented(404, 409)},
             operation_id="alert_unshelve", summary="Unshelve an alert")
@needs(ACKNOWLEDGE)
def unshelve(request, alert_id: int = ID):
    """An alert that is not shelved is refused (409) by the service itself."""
    alert_shelve(alert=_alert(alert_id), user=request.auth.user, until=None, address=client_address(request))
    return _alert(alert_id)


def _silence(silence_id: int) -> Silence:
    silence = Silence.objects.select_related("created_by", "expired_by").filter(pk=silence_id).first()
    if silence is None:
        raise not_found(f"silence {silence_id}")
    return silence


@router.get("/silences", response={200: SilencePage, **documented()}, operation_id="silences_list",
            summary="Silences")
@needs("monitoring.view_silence")
def list_silences(request, filters: Query[SilenceFilters]):
    """Newest first; ``state`` picks pending, active or expired ones."""
    silences = Silence.objects.select_related("created_by", "expired_by")
    now = timezone.now()
    if filters.state == "pending":
        silences = silences.filter(starts_at__gt=now)
    elif filters.state == "active":
        silences = silences.filter(starts_at__lte=now, ends_at__gt=now)
    elif filters.state == "expired":
        silences = silences.filter(ends_at__lte=now)
    return page(silences, filters.cursor, filters.limit)


@router.get("/silences/{silence_id}", response={200: SilenceOut, **documented(404)}, operation_id="silence_get",
            summary="A silence")
@needs("monitoring.view_silence")
def get_silence(request, silence_id: int = ID):
    return _silence(silence_id)


@router.post("/silences", response={201: SilenceOut, **documented()}, operation_id="silence_create",
             summary="Create a silence")
@needs("monitoring.add_silence")
def create_silence(request, payload: SilenceIn, response: HttpResponse):
    """Stops notifications of every alert its matchers match (``alertname`` is the rule's name; ops ``=``, ``!=``,
    ``=~``, ``!~`` in Alertmanager's syntax) from ``starts_at`` to ``ends_at`` (or for ``duration_minutes``).
    Matching alerts still show in the history."""
    now = timezone.now()
    starts_at = payload.starts_at or now
    if (payload.ends_at is None) == (payload.duration_minutes is None):
        raise ApiError(400, "ends_at: give either ends_at or duration_minutes", field="ends_at")
    if not now - LONGEST <= starts_at <= now + LONGEST:
        raise ApiError(400, "starts_at: within a year of now", field="starts_at")
    ends_at = payload.ends_at or starts_at + timedelta(minutes=payload.duration_minutes)
    if ends_at <= starts_at or ends_at <= now:
        raise ApiError(400, "ends_at: must be after the start and in the future", field="ends_at")
    if ends_at > starts_at + LONGEST:
        raise ApiError(400, "ends_at: a silence lasts at most a year", field="ends_at")
    if not payload.reason.strip():
        raise ApiError(400, "reason: say why notifications are silenced", field="reason")
    try:
        matchers = matchers_validate([matcher.dict() for matcher in payload.matchers])
    except MatcherError as error:
        raise ApiError(400, str(error), field="matchers") from None
    try:
        silence = silence_create(matchers=matchers, starts_at=starts_at, ends_at=ends_at, reason=payload.reason,
                                 user=request.auth.user, address=client_address(request))
    except AlertError as error:
        raise ApiError(400, str(error), field=error.field) from None
    response["Location"] = f"/api/v1/silences/{silence.pk}"
    return Status(201, _silence(silence.pk))


@router.post("/silences/{silence_id}/expire", response={200: SilenceOut, **documented(404, 409)},
             operation_id="silence_expire", summary="Expire a silence now")
@needs("monitoring.change_silence")
def expire_silence(request, silence_id: int = ID):
    silence_expire(silence=_silence(silence_id), user=request.auth.user, address=client_address(request))
    return _silence(silence_id)
