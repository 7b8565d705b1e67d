"""The notifications sent, with their delivery attempts."""

from __future__ import annotations

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from monitoring.models import (
    DeliveryAttempt,
    Notification,
)
from portal.admin_pages import ReadOnlyAdmin


class DeliveryAttemptInline(admin.TabularInline):
    model = DeliveryAttempt
    fields = ["at", "channel", "outcome", "http_status", "error", "duration_ms", "worker"]
    readonly_fields = fields
    ordering = ["at", "id"]
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("channel")


@admin.register(Notification)
class NotificationAdmin(ReadOnlyAdmin):
    """What was sent where, and each try to send it (written by monitoring.alerts.notify)."""

    list_display = ["created_at", "kind", "status", "channel", "subject", "attempts", "delivered_at", "last_error"]
    list_filter = ["status", "kind", "channel"]
    search_fields = ["subject"]
    list_select_related = ["channel"]
    show_full_result_count = False
    inlines = [DeliveryAttemptInline]
    fields = ["kind", "status", "channel", "route", "alert_links", "subject", "group_key", "attempts",
              "next_attempt_at", "last_error", "created_at", "created_by", "delivered_at", "body_text"]
    readonly_fields = fields

    @admin.display(description="alerts")
    def alert_links(self, notification):
        return format_html_join(", ", '<a href="{}">{}</a>', [
            (reverse("admin:monitoring_alert_change", args=[alert.pk]), alert.summary)
            for alert in notification.alerts.only("pk", "summary")]) or "–"

    @admin.display(description="message")
    def body_text(self, notification):
        return format_html("<pre>{}</pre>", notification.body.get("text", ""))
