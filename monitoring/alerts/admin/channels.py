"""Where notifications go: channels (Admins only: their config holds URLs and keys), routes and escalation
policies."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from monitoring.alerts.admin.base import AuditedChangesMixin, badge
from monitoring.alerts.notify import channel_enable, channel_test
from monitoring.alerts.transports import TRANSPORTS
from monitoring.matchers import MatcherError, matchers_validate
from monitoring.models import (
    EscalationPolicy,
    EscalationStep,
    Notification,
    NotificationChannel,
    NotificationRoute,
    Severity,
)
from portal.admin_pages import client_address, confirmation


class NotificationChannelForm(forms.ModelForm):
    class Meta:
        model = NotificationChannel
        fields = "__all__"

    def clean(self):
        """The config, checked by the transport of the channel's kind; its errors name the config's fields."""
        data = super().clean()
        transport = TRANSPORTS.get(data.get("kind"))
        if transport is not None and "config" in data:
            errors = transport.config_errors(data["config"] or {})
            if errors:
                self.add_error("config", [f"{field}: {message}" for field, message in errors.items()])
        return data


@admin.register(NotificationChannel)
class NotificationChannelAdmin(AuditedChangesMixin, admin.ModelAdmin):
    """Admins only (Support and Operators have no permission on channels: configs hold secrets). The config is
    checked by the channel's transport (NotificationChannelForm). Changes are audited by field name only."""

    form = NotificationChannelForm
    audit_name = "channel"
    audit_values = False
    list_display = ["name", "kind", "status", "permanent_failures", "created_at", "channel_actions"]
    list_filter = ["kind", "enabled"]
    search_fields = ["name"]
    readonly_fields = ["status", "channel_actions", "disabled_at", "permanent_failures", "created_at"]
    fieldsets = [
        (None, {"fields": ["status", "channel_actions", "name", "kind", "config", "enabled"]}),
        ("Failures", {"fields": ["permanent_failures", "disabled_at"]}),
    ]

    @admin.display(description="status", ordering="enabled")
    def status(self, channel):
        if channel.enabled:
            return badge("enabled", "#2e7d32")
        since = f" (since {timezone.localtime(channel.disabled_at):%Y-%m-%d %H:%M})" if channel.disabled_at else ""
        return format_html('{} <strong style="color:#c62828">{}{}</strong>', badge("disabled", "#c62828"),
                           channel.disabled_reason or "disabled by hand", since)

    @admin.display(description="actions")
    def channel_actions(self, channel):
        if channel.pk is None:
            return "–"
        buttons = [("Send test notification", reverse("admin:monitoring_notificationchannel_test",
                                                      args=[channel.pk]))]
        if not channel.enabled:
            buttons.append(("Re-enable", reverse("admin:monitoring_notificationchannel_enable", args=[channel.pk])))
        return format_html_join(" ", '<a class="button" href="{1}">{0}</a>', buttons)

    def save_model(self, request, obj, form, change):
        # Ticking "enabled" does what Re-enable does; unticking it records who turned the channel off.
        if change and "enabled" in form.changed_data:
            if obj.enabled:
                obj.permanent_failures, obj.disabled_reason, obj.disabled_at = 0, "", None
            else:
                obj.disabled_reason, obj.disabled_at = f"disabled by {request.user.get_username()}", timezone.now()
        super().save_model(request, obj, form, change)

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("<int:channel_id>/test/", wrap(self.test_view), name="monitoring_notificationchannel_test"),
            path("<int:channel_id>/enable/", wrap(self.enable_view), name="monitoring_notificationchannel_enable"),
        ] + super().get_urls()

    def _channel_or_403(self, request, channel_id) -> NotificationChannel:
        channel = get_object_or_404(NotificationChannel, pk=channel_id)
        if not self.has_change_permission(request, channel):
            raise PermissionDenied
        return channel

    def test_view(self, request, channel_id):
        channel = self._channel_or_403(request, channel_id)
        back = reverse("admin:monitoring_notificationchannel_change", args=[channel.pk])
        if request.method == "POST":
            notification = channel_test(channel=channel, user=request.user, address=client_address(request))
            attempt = notification.delivery_attempts.first()
            answer = f" (HTTP {attempt.http_status})" if attempt and attempt.http_status else ""
            if notification.status == Notification.Status.DELIVERED:
                messages.success(request, f"Test notification delivered to {channel.name}{answer}.")
            else:
                messages.error(request, f"Test notification to {channel.name}: "
                                        f"{notification.get_status_display()}{answer}: {notification.last_error}")
            return HttpResponseRedirect(back)
        disabled = "" if channel.enabled else " The channel is disabled: the test will fail until it is re-enabled."
        return confirmation(request, self, title=f"Test channel {channel.name}", action_label="Send test",
                            cancel_url=back, question=f"Send a test notification to {channel} now?{disabled}")

    def enable_view(self, request, channel_id):
        channel = self._channel_or_403(request, channel_id)
        back = reverse("admin:monitoring_notificationchannel_change", args=[channel.pk])
        if request.method == "POST":
            channel_enable(channel=channel, user=request.user, address=client_address(request))
            messages.success(request, f"Channel {channel.name} re-enabled; its failure count starts again.")
            return HttpResponseRedirect(back)
        return confirmation(request, self, title=f"Re-enable channel {channel.name}", action_label="Re-enable",
                            cancel_url=back, question=f"Re-enable {channel}? It was disabled: "
                                                      f"{channel.disabled_reason or 'by hand'}. Send a test first "
                                                      "if the cause may still be there.")


def _json_list_of_strings(value, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise forms.ValidationError(f'Give a JSON list of strings, e.g. ["{name}"].')
    return value


class NotificationRouteForm(forms.ModelForm):
    class Meta:
        model = NotificationRoute
        fields = "__all__"

    def clean_severities(self):
        severities = _json_list_of_strings(self.cleaned_data.get("severities"), "critical")
        unknown = sorted(set(severities) - set(Severity.values))
        if unknown:
            raise forms.ValidationError(f"Unknown severity {', '.join(unknown)}; use {', '.join(Severity.values)}.")
        return severities

    def clean_matchers(self):
        matchers = self.cleaned_data.get("matchers") or []
        if not matchers:
            return []
        try:
            return matchers_validate(matchers)
        except MatcherError as error:
            raise forms.ValidationError(str(error).removeprefix("matchers: ")) from None

    def clean_group_by(self):
        return _json_list_of_strings(self.cleaned_data.get("group_by") or [], "alertname")


@admin.register(NotificationRoute)
class NotificationRouteAdmin(AuditedChangesMixin, admin.ModelAdmin):
    audit_name = "notification_route"
    form = NotificationRouteForm
    list_display = ["name", "position", "severities", "matchers_text", "channel_names", "group_by",
                    "repeat_interval_seconds", "send_resolved", "continue_matching", "enabled"]
    list_filter = ["enabled"]
    filter_horizontal = ["channels"]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("channels")

    @admin.display(description="matchers")
    def matchers_text(self, route):
        return ", ".join(f"{m.get('label')}{m.get('op', '=')}{m.get('value')}" for m in route.matchers or []) or "–"

    @admin.display(description="channels")
    def channel_names(self, route):
        return ", ".join(channel.name for channel in route.channels.all()) or "–"


class EscalationStepInline(admin.TabularInline):
    model = EscalationStep
    extra = 1
    fields = ["level", "title", "after_minutes", "channels"]


@admin.register(EscalationPolicy)
class EscalationPolicyAdmin(AuditedChangesMixin, admin.ModelAdmin):
    audit_name = "escalation_policy"
    list_display = ["name", "severities", "enabled", "levels"]
    inlines = [EscalationStepInline]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("steps")

    @admin.display(description="levels")
    def levels(self, policy):
        return "; ".join(str(step) for step in policy.steps.all()) or "–"
