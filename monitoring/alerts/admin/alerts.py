"""The alert history: the list with its filters, each alert's page with its timeline, the operator's actions
(acknowledge, shelve, silence alerts like this one), a summary of a period and the CSV export."""

from __future__ import annotations

import csv
import json
from datetime import date, datetime, time, timedelta

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.exceptions import PermissionDenied
from django.db.models import Prefetch
from django.http import HttpResponseBadRequest, HttpResponseRedirect, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import formats, timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.text import capfirst

from monitoring.alerts.actions import (
    ALERTMANAGER_NOTIFIES,
    AlertError,
    alert_acknowledge,
    alert_shelve,
    alert_unacknowledge,
    silence_create,
)
from monitoring.alerts.admin.base import (
    ACKNOWLEDGE,
    DEAD_LETTER_LEAD,
    SEVERITY_COLOURS,
    STATE_COLOURS,
    TIMELINE_ROWS,
    NoInput,
    badge,
    duration_text,
    error_field,
    form_page,
    matchers_text,
    require_acknowledge,
    safe_link,
    selection_hidden,
)
from monitoring.alerts.exports import prometheus_alert_name
from monitoring.alerts.notify import notified_by_alertmanager
from monitoring.alerts.selectors import alerts_labelled, alerts_summary, label_pairs
from monitoring.matchers import MatcherError, matchers_parse
from monitoring.models import (
    Alert,
    AlertRule,
    DeliveryAttempt,
)
from portal.admin_pages import ReadOnlyAdmin, client_address
from queues.models import Priority
from queues.operations.admin import CappedCountPaginator


def _rule_facets(request) -> list[tuple[str, dict]]:
    """(component, labels) of every rule, read once per request for the component and label filters."""
    if not hasattr(request, "_alert_rule_facets"):
        request._alert_rule_facets = list(AlertRule.objects.order_by().values_list("component", "labels"))
    return request._alert_rule_facets


class PeriodFilter(admin.SimpleListFilter):
    title = "time range (started)"
    parameter_name = "period"
    PERIODS = {"24h": ("last 24 h", timedelta(hours=24)), "7d": ("last 7 days", timedelta(days=7)),
               "30d": ("last 30 days", timedelta(days=30))}

    def lookups(self, request, model_admin):
        return [(key, label) for key, (label, _) in self.PERIODS.items()]

    def queryset(self, request, queryset):
        if self.value() not in self.PERIODS:
            return queryset
        return queryset.filter(started_at__gte=timezone.now() - self.PERIODS[self.value()][1])


class ComponentFilter(admin.SimpleListFilter):
    """Components of the rules (a small table), not a DISTINCT over the whole alert history; any value works in
    the URL (Alertmanager's alerts carry their own)."""

    title = "component"
    parameter_name = "component"

    def lookups(self, request, model_admin):
        components = {component for component, _ in _rule_facets(request) if component}
        if self.value():
            components.add(self.value())
        return [(component, component) for component in sorted(components)]

    def queryset(self, request, queryset):
        return queryset.filter(component=self.value()) if self.value() else queryset


class LabelFilter(admin.SimpleListFilter):
    """``?label=queue=normal``: alerts whose label has that value. ``queue`` reads the indexed column the alert
    copies it to; any other label a JSON key (``labels__team="db"`` as an expression, so that no label name is read
    as a lookup), which SQLite and MySQL/MariaDB both support; ``labels__contains`` does not work on SQLite."""

    title = "label"
    parameter_name = "label"

    def lookups(self, request, model_admin):
        offered = {f"{key}={value}" for _, labels in _rule_facets(request) for key, value in (labels or {}).items()}
        if self.value():
            offered.add(self.value())
        return [(pair, pair) for pair in sorted(offered)]

    def queryset(self, request, queryset):
        if not self.value():
            return queryset
        try:
            return alerts_labelled(queryset, label_pairs(self.value()))
        except ValueError as error:  # the changelist then says the filter is invalid instead of failing
            raise IncorrectLookupParameters(str(error)) from None


def bounded_date_hierarchy(changelist, field: str) -> dict:
    """Django's date drill-down (``<field>__year/__month/__day`` in the address) without its SELECT DISTINCT over
    every row of the filtered list (0.6 s at 100,000 alerts on SQLite, a full scan on any database): the choices
    are the periods between the first and the last row, read with two index lookups (ORDER BY ... LIMIT 1). A
    period without alerts between them can be offered; it shows an empty list. Rendered by
    templates/admin/monitoring/alert/change_list.html in place of Django's."""
    def number(key):
        value = changelist.params.get(f"{field}__{key}")
        value = value[-1] if isinstance(value, list) else value
        return int(value) if value else None

    def link(**lookups):
        return changelist.get_query_string({f"{field}__{key}": value for key, value in lookups.items()},
                                           [f"{field}__"])

    def title(day: date, form: str) -> str:
        return capfirst(formats.date_format(day, form))

    try:
        year, month, day = number("year"), number("month"), number("day")
        if year and month and day:
            return {"show": True, "back": {"link": link(year=year, month=month),
                                           "title": title(date(year, month, day), "YEAR_MONTH_FORMAT")},
                    "choices": [{"title": title(date(year, month, day), "MONTH_DAY_FORMAT")}]}
        queryset = changelist.queryset
        first = queryset.order_by(field).values_list(field, flat=True).first()
        last = queryset.order_by(f"-{field}").values_list(field, flat=True).first()
        if first is None or last is None:
            return {"show": False}
        first, last = timezone.localtime(first), timezone.localtime(last)
        if not year and first.year == last.year:  # as Django: rows of one year open at that year (or month)
            year = first.year
            if first.month == last.month:
                month = first.month
        if year and month:
            days = [date(year, month, 1) + timedelta(days=offset) for offset in range(31)]
            days = [shown for shown in days if shown.month == month
                    and (first.year, first.month, first.day) <= (year, month, shown.day) <= (last.year, last.month,
                                                                                            last.day)]
            return {"show": True, "back": {"link": link(year=year), "title": str(year)},
                    "choices": [{"link": link(year=year, month=month, day=shown.day),
                                 "title": title(shown, "MONTH_DAY_FORMAT")} for shown in days]}
        if year:
            months = range(first.month if first.year == year else 1, (last.month if last.year == year else 12) + 1)
            return {"show": True, "back": {"link": link(), "title": "All dates"},
                    "choices": [{"link": link(year=year, month=shown),
                                 "title": title(date(year, shown, 1), "YEAR_MONTH_FORMAT")} for shown in months]}
        return {"show": True, "back": None,
                "choices": [{"link": link(year=shown), "title": str(shown)}
                            for shown in range(first.year, last.year + 1)]}
    except (ValueError, OverflowError):  # a year or day out of range in the address: no drill-down, the list stays
        return {"show": False}


# --- alerts: forms of the actions -------------------------------------------------------------------------------

class AcknowledgeForm(forms.Form):
    note = forms.CharField(max_length=500, required=False, widget=forms.Textarea(attrs={"rows": 3, "cols": 70}),
                           help_text="What you are doing about it; shown on the timeline.")


SHELVE_HOURS = {"1h": 1, "4h": 4, "24h": 24}


class ShelveForm(forms.Form):
    shelve_for = forms.ChoiceField(label="Shelve for", initial="1h", widget=forms.RadioSelect, choices=[
        ("1h", "1 hour"), ("4h", "4 hours"), ("24h", "24 hours"), ("until", "until a chosen time")])
    until = forms.DateTimeField(required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"},
                                                                           format="%Y-%m-%dT%H:%M"))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["until"].help_text = (f"With 'until a chosen time'; time zone "
                                          f"{timezone.get_current_timezone_name()}.")

    def clean(self):
        data = super().clean()
        choice = data.get("shelve_for")
        if choice == "until":
            if data.get("until") is None:
                self.add_error("until", "Give the time the shelving ends.")
            elif data["until"] <= timezone.now():
                self.add_error("until", "The time must be in the future.")
        elif choice in SHELVE_HOURS:
            data["until"] = timezone.now() + timedelta(hours=SHELVE_HOURS[choice])
        return data


class MatchersField(forms.CharField):
    """Matchers as text, ``alertname=redis-unreachable, queue=~normal|high``, parsed by monitoring.alerts."""

    def __init__(self, **kwargs):
        kwargs.setdefault("help_text", "Comma-separated: label=value, label!=value, label=~regex, label!~regex. "
                                       "All must match.")
        kwargs.setdefault("widget", forms.TextInput(attrs={"size": 90}))
        super().__init__(**kwargs)

    def clean(self, value):
        text = super().clean(value)
        try:
            return matchers_parse(text)
        except MatcherError as error:
            raise forms.ValidationError(str(error).removeprefix("matchers: ")) from None


class SilenceLikeForm(forms.Form):
    matchers = MatchersField()
    hours = forms.TypedChoiceField(label="Silence for", coerce=int, initial=4, choices=[
        (1, "1 hour"), (2, "2 hours"), (4, "4 hours"), (12, "12 hours"), (24, "24 hours"), (72, "3 days"),
        (168, "7 days")])
    reason = forms.CharField(max_length=500, widget=forms.Textarea(attrs={"rows": 3, "cols": 70}),
                             help_text="Why notifications stop (kept with the silence and in the audit log).")


# --- alerts -----------------------------------------------------------------------------------------------------

@admin.register(Alert)
class AlertAdmin(ReadOnlyAdmin):
    """The alert history. Read-only: each alert changes only through the actions below (services of
    monitoring.alerts.actions), and its page shows its timeline, notifications and what it concerns."""

    list_display = ["state_badge", "severity_badge", "summary", "rule_or_name", "component", "started_at",
                    "fired_at", "resolved_at", "duration", "acknowledged_by", "flaps", "source"]
    list_display_links = ["summary"]
    list_filter = ["severity", "state", "rule", ComponentFilter, "source", PeriodFilter, LabelFilter]
    search_fields = ["summary", "name", "fingerprint"]
    list_select_related = ["rule", "acknowledged_by"]
    date_hierarchy = "started_at"
    show_full_result_count = False
    paginator = CappedCountPaginator
    list_per_page = 50
    actions = ["acknowledge_selected"]
    fieldsets = [
        (None, {"fields": ["summary", "state_badge", "severity_badge", "name", "rule", "component", "source",
                           "labels_text", "value", "threshold"]}),
        ("Times", {"fields": ["started_at", "holding_since", "fired_at", "resolved_at", "cleared_at",
                              "last_seen_at", "duration", "flaps"]}),
        ("Handling", {"fields": ["acknowledged_at", "acknowledged_by", "acknowledgement_note", "shelved_until",
                                 "shelved_by", "silenced_by", "escalation_level", "notified_at"]}),
        ("Source", {"fields": ["fingerprint", "annotations_text", "generator_link"]}),
    ]
    readonly_fields = [field for _, options in fieldsets for field in options["fields"]]

    # -- list columns

    @admin.display(description="state", ordering="state")
    def state_badge(self, alert):
        shown = badge(alert.state, STATE_COLOURS.get(alert.state, "#555"))
        if alert.is_open and alert.is_shelved(timezone.now()):
            return format_html("{} <small>shelved</small>", shown)
        return shown

    @admin.display(description="severity", ordering="severity")
    def severity_badge(self, alert):
        return badge(alert.severity, SEVERITY_COLOURS.get(alert.severity, "#555"))

    @admin.display(description="rule / name", ordering="name")
    def rule_or_name(self, alert):
        if alert.rule_id and alert.rule:
            return format_html('<a href="{}">{}</a>', reverse("admin:monitoring_alertrule_change",
                                                              args=[alert.rule_id]), alert.name)
        return alert.name

    @admin.display(description="duration")
    def duration(self, alert):
        return duration_text((alert.resolved_at or timezone.now()) - alert.started_at)

    @admin.display(description="labels")
    def labels_text(self, alert):
        return format_html_join(", ", "<code>{}={}</code>", sorted(alert.labels.items())) or "–"

    @admin.display(description="annotations")
    def annotations_text(self, alert):
        return format_html_join("", "<div><strong>{}</strong>: {}</div>", sorted(alert.annotations.items())) or "–"

    @admin.display(description="generator URL")
    def generator_link(self, alert):
        """A link only to an http(s) address (a row stored before the webhook checked it may hold anything)."""
        url = safe_link(alert.generator_url)
        if url:
            return format_html('<a href="{}" rel="noopener noreferrer">{}</a>', url, url)
        return alert.generator_url or "–"

    # -- pages

    def get_object(self, request, object_id, from_field=None):
        queryset = self.get_queryset(request).select_related("rule", "acknowledged_by", "shelved_by",
                                                             "inhibited_by", "silenced_by")
        try:
            return queryset.get(pk=int(object_id))
        except (Alert.DoesNotExist, ValueError):
            return None

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context.update(self.alert_page_context(request, obj))
        return super().render_change_form(request, context, add=add, change=change, form_url=form_url, obj=obj)

    def alert_page_context(self, request, alert: Alert) -> dict:
        """The alert page's timeline, notifications, related pages and the actions this user may take."""
        # The newest TIMELINE_ROWS of each, oldest first: a flapping or long-reminded alert has no bound otherwise.
        events = list(alert.events.select_related("user").order_by("-at", "-id")[:TIMELINE_ROWS + 1])[::-1]
        notifications = list(alert.notifications.select_related("channel").order_by("-created_at", "-id")
                             .prefetch_related(Prefetch("delivery_attempts", queryset=DeliveryAttempt.objects
                                                        .select_related("channel").order_by("at", "id")))
                             [:TIMELINE_ROWS + 1])[::-1]
        older = {"events": len(events) > TIMELINE_ROWS, "notifications": len(notifications) > TIMELINE_ROWS}
        events, notifications = events[-TIMELINE_ROWS:], notifications[-TIMELINE_ROWS:]
        now = timezone.now()
        actions = []
        # Alertmanager pages for its alerts, and for the portal's alerts of rules whose twin it pages: a silence or
        # a shelving here would stop nothing. Acknowledging still records who handles it (the history's time to
        # acknowledge).
        alertmanager_pages = notified_by_alertmanager(alert)
        from_alertmanager = alert.source == Alert.Source.ALERTMANAGER
        if request.user.has_perm(ACKNOWLEDGE):
            possible = [("acknowledge", "Acknowledge", alert.is_open and not alert.acknowledged_at),
                        ("unacknowledge", "Remove acknowledgement", bool(alert.acknowledged_at)),
                        ("shelve", "Shelve", alert.is_open and not alertmanager_pages),
                        ("unshelve", "Unshelve", alert.is_shelved(now)),
                        ("silence", "Silence alerts like this", not alertmanager_pages)]
            actions = [(reverse(f"admin:monitoring_alert_{name}", args=[alert.pk]), label)
                       for name, label, shown in possible if shown]
        rule = alert.rule if alert.rule_id else None
        return {
            "timeline": events, "alert_notifications": notifications, "alert_actions": actions, "older": older,
            "timeline_rows": TIMELINE_ROWS,
            "notified_by": "alertmanager" if alertmanager_pages else "portal",
            # The name Alertmanager knows the alert by: its own, or the Prometheus twin's of the portal's rule.
            "alertmanager_alertname": alert.name if from_alertmanager else prometheus_alert_name(alert.name),
            "twin_paged": alertmanager_pages and not from_alertmanager,
            "related_links": self.related_links(alert),
            "runbook": (rule.runbook if rule else "") or alert.annotations.get("runbook", ""),
            "runbook_url": safe_link(alert.runbook_url), "cause": alert.inhibited_by if alert.inhibited_by_id else None,
            "caused": list(alert.caused.order_by("-started_at").only("pk", "summary", "state", "started_at")[:50]),
        }

    @staticmethod
    def related_links(alert: Alert) -> list[tuple[str, str]]:
        """Pages about what the alert concerns, for the time it lasted: its dead letters, the queue, the fleet."""
        since = alert.started_at - DEAD_LETTER_LEAD
        window = {"finished_at__gte": since.isoformat()}
        fleet_window = {"at__gte": since.isoformat()}
        if alert.resolved_at:
            window["finished_at__lte"] = alert.resolved_at.isoformat()
            fleet_window["at__lte"] = alert.resolved_at.isoformat()
        queue = alert.labels.get("queue")
        dead = {"status__exact": "FAILED", **window}
        if queue in Priority.values:
            dead["priority__exact"] = queue
        tasks = reverse("admin:queues_captiontask_changelist")
        links = [("Dead letters of this time" + (f" (queue {queue})" if "priority__exact" in dead else ""),
                  f"{tasks}?{urlencode(dead)}"),
                 ("Queues overview", reverse("admin:queues_queueoverview_changelist")),
                 ("Dead letters by error class", reverse("admin:queues_queueoverview_dead_letters")),
                 ("Fleet events of this time", f"{reverse('admin:queues_fleetevent_changelist')}?"
                                               f"{urlencode(fleet_window)}")]
        if queue in Priority.values:
            links.insert(1, (f"Tasks waiting in queue {queue}",
                             f"{tasks}?{urlencode({'status__exact': 'QUEUED', 'priority__exact': queue})}"))
        if alert.component in ("workers", "redis"):
            links.append(("Live workers", reverse("admin:queues_liveworker_changelist")))
        if alert.rule_id:
            links.append((f"Alerts of rule {alert.name}",
                          f"{reverse('admin:monitoring_alert_changelist')}?rule__id__exact={alert.rule_id}"))
        return links

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("summary/", wrap(self.summary_view), name="monitoring_alert_summary"),
            path("export.csv", wrap(self.export_view), name="monitoring_alert_export"),
            path("<int:alert_id>/acknowledge/", wrap(self.acknowledge_view), name="monitoring_alert_acknowledge"),
            path("<int:alert_id>/unacknowledge/", wrap(self.unacknowledge_view),
                 name="monitoring_alert_unacknowledge"),
            path("<int:alert_id>/shelve/", wrap(self.shelve_view), name="monitoring_alert_shelve"),
            path("<int:alert_id>/unshelve/", wrap(self.unshelve_view), name="monitoring_alert_unshelve"),
            path("<int:alert_id>/silence/", wrap(self.silence_view), name="monitoring_alert_silence"),
        ] + super().get_urls()

    # -- actions on one alert

    def _alert_action(self, request, alert_id, *, title, question, action_label, act, done, form_class=NoInput,
                      initial=None):
        """GET: the confirmation (with the action's form); POST: the service, a message, back to the alert."""
        require_acknowledge(request)
        alert = get_object_or_404(Alert, pk=alert_id)
        back = reverse("admin:monitoring_alert_change", args=[alert.pk])
        form = form_class(request.POST if request.method == "POST" else None, initial=initial)
        if request.method == "POST" and form.is_valid():
            try:
                outcome = act(alert, form.cleaned_data)
            except AlertError as error:
                field, text = error_field(error, form)
                if field is None:
                    messages.error(request, text)
                    return HttpResponseRedirect(back)
                form.add_error(field, text)
            else:
                messages.success(request, done(outcome))
                return HttpResponseRedirect(back)
        return form_page(request, self, title=title, question=question.format(alert=alert.summary), form=form,
                         action_label=action_label, cancel_url=back, crumbs=[(str(alert), back)])

    def acknowledge_view(self, request, alert_id):
        return self._alert_action(
            request, alert_id, title="Acknowledge alert", action_label="Acknowledge", form_class=AcknowledgeForm,
            question="Acknowledge “{alert}”? Reminders and escalation stop; the alert stays in the history and "
                     "resolves as usual.",
            act=lambda alert, data: alert_acknowledge(alert=alert, user=request.user, note=data["note"],
                                                      address=client_address(request)),
            done=lambda alert: f"Acknowledged: {alert.summary}.")

    def unacknowledge_view(self, request, alert_id):
        return self._alert_action(
            request, alert_id, title="Remove the acknowledgement", action_label="Remove acknowledgement",
            question="Remove the acknowledgement of “{alert}”? Reminders and escalation resume while it fires.",
            act=lambda alert, data: alert_unacknowledge(alert=alert, user=request.user,
                                                        address=client_address(request)),
            done=lambda alert: f"Acknowledgement removed: {alert.summary}.")

    def shelve_view(self, request, alert_id):
        return self._alert_action(
            request, alert_id, title="Shelve alert", action_label="Shelve", form_class=ShelveForm,
            question="Shelve “{alert}”? No notifications are sent for it until the time chosen; it stays in the "
                     "history and on the banner.",
            act=lambda alert, data: alert_shelve(alert=alert, user=request.user, until=data["until"],
                                                 address=client_address(request)),
            done=lambda alert: f"Shelved until {timezone.localtime(alert.shelved_until):%Y-%m-%d %H:%M %Z}: "
                               f"{alert.summary}.")

    def unshelve_view(self, request, alert_id):
        def unshelve(alert, data):
            # alert_shelve(until=None) would record an "unshelved" event for an alert that is not shelved.
            if not alert.is_shelved(timezone.now()):
                raise AlertError("This alert is not shelved.")
            return alert_shelve(alert=alert, user=request.user, until=None, address=client_address(request))

        return self._alert_action(
            request, alert_id, title="Unshelve alert", action_label="Unshelve", act=unshelve,
            question="Unshelve “{alert}”? Its notifications resume.",
            done=lambda alert: f"Unshelved: {alert.summary}.")

    def silence_view(self, request, alert_id):
        alert = get_object_or_404(Alert, pk=alert_id)

        def create(alert, data):
            if notified_by_alertmanager(alert):
                raise AlertError(ALERTMANAGER_NOTIFIES)
            return silence_create(matchers=data["matchers"], ends_at=timezone.now() + timedelta(hours=data["hours"]),
                                  reason=data["reason"], user=request.user, address=client_address(request))

        return self._alert_action(
            request, alert_id, title="Silence alerts like this", action_label="Create silence",
            form_class=SilenceLikeForm, initial={"matchers": matchers_text(alert.labels)},
            question="Stop notifications for every alert that matches (this one and any that starts while the "
                     "silence lasts). Matching alerts still show in the history and on the banner.",
            act=create,
            done=lambda silence: format_html('Silence created until {}: <a href="{}">{}</a>.',
                                             f"{timezone.localtime(silence.ends_at):%Y-%m-%d %H:%M %Z}",
                                             reverse("admin:monitoring_silence_change", args=[silence.pk]),
                                             str(silence)))

    # -- bulk acknowledge

    def has_acknowledge_permission(self, request):
        return request.user.has_perm(ACKNOWLEDGE)

    def changelist_view(self, request, extra_context=None):
        # Without the permission the action is not offered, and Django would answer a crafted POST of it with
        # "no action selected"; refuse it as plainly as the other actions' URLs do.
        if request.method == "POST" and "acknowledge_selected" in request.POST.getlist("action") and \
                not self.has_acknowledge_permission(request):
            raise PermissionDenied
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None) or {}
        if "cl" in context:
            context["started_date_hierarchy"] = bounded_date_hierarchy(context["cl"], "started_at")
        return response

    @admin.action(description="Acknowledge selected alerts", permissions=["acknowledge"])
    def acknowledge_selected(self, request, queryset):
        eligible = queryset.filter(acknowledged_at__isnull=True).exclude(state=Alert.State.RESOLVED)
        form = AcknowledgeForm(request.POST if request.POST.get("confirm") == "yes" else None)
        if request.POST.get("confirm") == "yes" and form.is_valid():
            done = 0
            for alert in eligible.order_by("pk").iterator():
                try:
                    alert_acknowledge(alert=alert, user=request.user, note=form.cleaned_data["note"],
                                      address=client_address(request))
                    done += 1
                except AlertError:  # acknowledged or resolved since the confirmation was shown
                    pass
            skipped = queryset.count() - done
            (messages.success if done else messages.warning)(
                request, f"Acknowledged {done} alert(s)." + (f" {skipped} were resolved or already acknowledged."
                                                             if skipped else ""))
            return None
        total, count = queryset.count(), eligible.count()
        return form_page(request, self, title="Acknowledge alerts", form=form, action_label=f"Acknowledge {count}",
                         question=f"Acknowledge {count} of the {total} selected alert(s)? "
                                  f"{total - count} are resolved or already acknowledged and stay as they are.",
                         cancel_url=request.get_full_path(), hidden=selection_hidden(request))

    # -- CSV export and summary

    EXPORT_COLUMNS = ["id", "state", "severity", "name", "summary", "component", "labels", "started_at", "fired_at",
                      "acknowledged_at", "acknowledged_by", "resolved_at", "flaps", "source"]

    def export_view(self, request):
        """The changelist's rows as CSV, with its current filters, search and ordering (same query string)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        try:
            queryset = self.get_changelist_instance(request).queryset
        except IncorrectLookupParameters:
            return HttpResponseBadRequest("The filter in the address is not valid.")

        class Echo:
            def write(self, value):
                return value

        writer = csv.writer(Echo())

        def when(value):
            return value.isoformat() if value else ""

        def text(value: str) -> str:
            # Summaries and labels can come from Alertmanager: a cell starting like a formula is opened by
            # spreadsheets as one, so it is quoted.
            return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value

        def rows():
            yield writer.writerow(self.EXPORT_COLUMNS)
            for alert in queryset.select_related("acknowledged_by").iterator(chunk_size=1000):
                yield writer.writerow([
                    alert.pk, alert.state, alert.severity, text(alert.name), text(alert.summary),
                    text(alert.component), json.dumps(alert.labels, sort_keys=True), when(alert.started_at), when(alert.fired_at),
                    when(alert.acknowledged_at), text(alert.acknowledged_by.get_username()) if alert.acknowledged_by
                    else "",
                    when(alert.resolved_at), alert.flaps, alert.source])

        response = StreamingHttpResponse(rows(), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="alerts-{timezone.now():%Y%m%d-%H%M}.csv"'
        return response

    def summary_view(self, request):
        if not self.has_view_permission(request):
            raise PermissionDenied
        form = SummaryPeriodForm(request.GET or None)
        context = {**self.admin_site.each_context(request), "title": "Alert summary", "opts": self.model._meta,
                   "form": form}
        if request.GET and not form.is_valid():
            context["field_errors"] = [(form.fields[name].label if name in form.fields else "", error)
                                       for name, errors in form.errors.items() for error in errors]
            return TemplateResponse(request, "admin/monitoring/alert/summary.html", context, status=400)
        since, until = form.period() if request.GET else SummaryPeriodForm.default_period()
        summary = summary_with_texts(since=since, until=until)
        changelist = reverse("admin:monitoring_alert_changelist")
        period_query = urlencode({"started_at__gte": since.isoformat(), "started_at__lt": until.isoformat()})
        for row in summary["rules"]:
            row["alerts_url"] = f"{changelist}?{period_query}&" + (
                urlencode({"rule__id__exact": row["rule"]}) if row["rule"] else urlencode({"q": row["name"]}))
        context.update(summary=summary, since=since, until=until, alerts_url=f"{changelist}?{period_query}")
        return TemplateResponse(request, "admin/monitoring/alert/summary.html", context)


class SummaryPeriodForm(forms.Form):
    days = forms.IntegerField(required=False, min_value=1, max_value=366, label="Last days")
    since = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, label="To (inclusive)", widget=forms.DateInput(attrs={"type": "date"}))

    DEFAULT_DAYS = 7

    @classmethod
    def default_period(cls) -> tuple[datetime, datetime]:
        now = timezone.now()
        return now - timedelta(days=cls.DEFAULT_DAYS), now

    def clean(self):
        data = super().clean()
        if (data.get("since") is None) != (data.get("until") is None):
            self.add_error("since" if data.get("since") is None else "until", "Give both dates, or neither.")
        elif data.get("since") and data["since"] > data["until"]:
            self.add_error("until", "The end is before the start.")
        for name in ("since", "until"):
            if data.get(name) and not date(2000, 1, 1) <= data[name] <= date(9000, 12, 31):
                self.add_error(name, "Give a date between 2000 and 9000.")
        return data

    def period(self) -> tuple[datetime, datetime]:
        data = self.cleaned_data
        if data.get("since"):
            start = timezone.make_aware(datetime.combine(data["since"], time.min))
            return start, timezone.make_aware(datetime.combine(data["until"] + timedelta(days=1), time.min))
        now = timezone.now()
        return now - timedelta(days=data.get("days") or self.DEFAULT_DAYS), now


def summary_with_texts(*, since: datetime, until: datetime) -> dict:
    """The selector's figures plus their durations as text, for the summary page."""
    summary = alerts_summary(since=since, until=until)
    for row in (summary["totals"], *summary["rules"]):
        row["mtta_text"], row["mttr_text"] = duration_text(row["mtta"]), duration_text(row["mttr"])
    return summary
