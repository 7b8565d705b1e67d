"""Pieces every app's admin pages share: the address an audit entry records for a request, the confirmation page
of an action, and the read-only model admin of pages that show what the system holds."""

from __future__ import annotations

import ipaddress

from django.conf import settings
from django.contrib import admin
from django.template.response import TemplateResponse


def client_address(request) -> str | None:
    """The address an audit entry records for this request (every admin action of the fleet and operations pages).

    REMOTE_ADDR, the peer of the connection, unless settings.TRUSTED_PROXY_HEADER names the header our proxies
    append to (X-Forwarded-For): then the entry the outermost trusted proxy added, TRUSTED_PROXY_COUNT from the
    right. Entries further left come from the client and can say anything; a header with fewer entries than trusted
    hops, or an entry that is not an IP address, falls back to REMOTE_ADDR."""
    remote = request.META.get("REMOTE_ADDR")
    header = settings.TRUSTED_PROXY_HEADER
    if not header:
        return remote
    entries = [entry.strip() for entry in request.META.get(header, "").split(",")]
    if len(entries) < settings.TRUSTED_PROXY_COUNT:
        return remote
    try:
        return str(ipaddress.ip_address(entries[-settings.TRUSTED_PROXY_COUNT]))
    except ValueError:
        return remote


def confirmation(request, admin_instance, *, title: str, question: str, action_label: str, cancel_url: str,
                 field: dict | None = None, fields: list[dict] | None = None, error: str = "", danger: bool = False):
    """A confirmation page; ``field``/``fields``: inputs ({name, label, type, value, optional, help}) it asks for."""
    context = {
        **admin_instance.admin_site.each_context(request), "title": title, "question": question,
        "action_label": action_label, "cancel_url": cancel_url, "fields": fields or ([field] if field else []),
        "error": error, "danger": danger,
        "opts": admin_instance.model._meta,
    }
    return TemplateResponse(request, "admin/queues/confirm_action.html", context, status=400 if error else 200)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Pages that show what the system holds; changes go through their own actions, never the add/change forms."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
