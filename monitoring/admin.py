"""Alert pages in the admin (the helper's full version replaces this skeleton)."""

from django.contrib import admin

from monitoring.models import (
    Alert,
    AlertRule,
    EscalationPolicy,
    Notification,
    NotificationChannel,
    NotificationRoute,
    Silence,
)

for model in (Alert, AlertRule, EscalationPolicy, Notification, NotificationChannel, NotificationRoute, Silence):
    admin.site.register(model)
