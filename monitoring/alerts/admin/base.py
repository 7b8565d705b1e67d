"""What every alert page in the admin shares: permissions, badges, durations, the confirmation form page, and
the audit of changes made through a form."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal

from django import forms
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.exceptions import PermissionDenied
from django.db import models
from django.template.response import TemplateResponse
from django.utils.html import format_html

from monitoring.alerts.actions import (
    AlertError,
)
from monitoring.alerts.ingest import http_url
from queues.audit import audit
from portal.admin_pages import client_address

ACKNOWLEDGE = "monitoring.acknowledge_alert"
EXPIRE_SILENCE = "monitoring.change_silence"

STATE_COLOURS = {"pending": "#b26a00", "firing": "#c62828", "resolved": "#2e7d32"}
SEVERITY_COLOURS = {"critical": "#8e0000", "error": "#c62828", "warning": "#b26a00", "info": "#1565c0"}
# Dead letters that belong to an alert: the tasks that failed from a little before it started until it resolved.
DEAD_LETTER_LEAD = timedelta(minutes=5)


def require_acknowledge(request) -> None:
    if not request.user.has_perm(ACKNOWLEDGE):
        raise PermissionDenied("Acknowledging, shelving and silencing alerts needs the 'Can acknowledge, silence "
                               "and shelve alerts' permission.")


def duration_text(value: timedelta | None) -> str:
    """'42 s', '7 min 5 s', '3 h 20 min', '2 d 4 h': the alert list, the alert page and the summary."""
    if value is None:
        return "–"
    seconds = max(0, int(value.total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


TIMELINE_ROWS = 300  # an alert page shows at most this many timeline rows and notifications (the newest)


def safe_link(url: str) -> str:
    """``url`` if it is an http(s) URL, else "": an Alertmanager annotation must not become a javascript: link."""
    return url if http_url(url) else ""


def badge(text: str, colour: str):
    return format_html('<span style="color:#fff;background:{};padding:1px 6px;border-radius:3px;font-weight:bold;'
                       'white-space:nowrap">{}</span>', colour, text)


def matchers_text(labels: dict) -> str:
    """An alert's labels as silence matchers, alertname first (the form's pre-filled text). A value with a comma
    cannot be written in the comma-separated text and is left out; the operator can add a regular expression."""
    ordered = sorted(labels.items(), key=lambda item: (item[0] != "alertname", item[0]))
    return ", ".join(f"{key}={value}" for key, value in ordered if "," not in str(value))


def error_field(error: AlertError, form: forms.Form) -> tuple[str | None, str]:
    """The services name the field they refuse first ("reason: say why ..."): that error belongs on the form."""
    text = str(error)
    name, _, rest = text.partition(": ")
    return (name, rest) if rest and name in form.fields else (None, text)


def form_page(request, model_admin, *, title: str, question: str, form: forms.Form, action_label: str,
              cancel_url: str, crumbs: list[tuple[str, str]] = (), hidden: list[tuple[str, str]] = (),
              danger: bool = False):
    """The confirmation page of an action that takes input (a note, a duration, matchers): 400 with every error
    named by its field when the form was refused."""
    errors = [(form.fields[name].label or name.replace("_", " ").capitalize() if name in form.fields else "", error)
              for name, field_errors in form.errors.items() for error in field_errors]
    context = {**model_admin.admin_site.each_context(request), "title": title, "question": question, "form": form,
               "action_label": action_label, "cancel_url": cancel_url, "crumbs": crumbs, "hidden": hidden,
               "danger": danger, "field_errors": errors, "opts": model_admin.model._meta}
    return TemplateResponse(request, "admin/monitoring/action_form.html", context, status=400 if errors else 200)


def selection_hidden(request) -> list[tuple[str, str]]:
    """What a changelist action's confirmation posts back: the selection, the action and the confirmation."""
    return [(ACTION_CHECKBOX_NAME, pk) for pk in request.POST.getlist(ACTION_CHECKBOX_NAME)] + [
        ("action", request.POST.get("action", "")), ("select_across", request.POST.get("select_across", "0")),
        ("confirm", "yes")]


class NoInput(forms.Form):
    """Actions that only need a yes."""


def _plain(value):
    """A form value as JSON for the audit row: rows by name, dates as ISO text."""
    if isinstance(value, models.Model):
        return str(getattr(value, "name", "") or value)
    if isinstance(value, models.QuerySet) or (isinstance(value, (list, tuple)) and value
                                              and all(isinstance(item, models.Model) for item in value)):
        return sorted(_plain(item) for item in value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


class AuditedChangesMixin:
    """Every add, change and delete through these admin forms is an audit row: ``<audit_name>_create``,
    ``_change`` (with ``{"changed": {field: [old, new]}}``) and ``_delete``. With ``audit_values = False`` only the
    changed fields' names are kept (channel configs hold secrets that must not be copied into the audit log)."""

    audit_name = ""
    audit_values = True

    def _audit_target(self, obj) -> str:
        return f"{self.model._meta.verbose_name} {obj.pk}: {getattr(obj, 'name', '') or obj}"

    def save_related(self, request, form, formsets, change):
        # After save_related the row, its many-to-many fields and its inlines are all saved: one row says it all.
        super().save_related(request, form, formsets, change)
        if self.audit_values:
            changed = {name: [_plain(form.initial.get(name)) if change else None, _plain(form.cleaned_data.get(name))]
                       for name in form.changed_data}
        else:
            changed = list(form.changed_data)
        detail = {"changed": changed}
        for formset in formsets:
            inline = {"added": [str(obj) for obj in getattr(formset, "new_objects", [])],
                      "changed": {str(obj): fields for obj, fields in getattr(formset, "changed_objects", [])},
                      "deleted": [str(obj) for obj in getattr(formset, "deleted_objects", [])]}
            if any(inline.values()):
                detail[str(formset.model._meta.verbose_name_plural)] = inline
        if change and len(detail) == 1 and not changed:
            return  # saved without a change: nothing happened
        audit(user=request.user, action=f"{self.audit_name}_{'change' if change else 'create'}",
              target=self._audit_target(form.instance), count=1, detail=detail, address=client_address(request))

    def delete_model(self, request, obj):
        target = self._audit_target(obj)
        super().delete_model(request, obj)
        audit(user=request.user, action=f"{self.audit_name}_delete", target=target, count=1,
              address=client_address(request))

    def delete_queryset(self, request, queryset):
        targets = [self._audit_target(obj) for obj in queryset]
        super().delete_queryset(request, queryset)
        audit(user=request.user, action=f"{self.audit_name}_delete", target=", ".join(targets), count=len(targets),
              address=client_address(request))
