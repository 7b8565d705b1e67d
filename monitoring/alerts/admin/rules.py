"""Alert rules: Admins edit them, Operators tune thresholds and durations, Support reads them."""

from __future__ import annotations

from django import forms
from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html

from monitoring.alerts.admin.base import AuditedChangesMixin
from monitoring.alerts.rules import signal_choices
from monitoring.models import (
    AlertRule,
)


class AlertRuleForm(forms.ModelForm):
    signal = forms.ChoiceField(choices=signal_choices, help_text="The figure the rule watches "
                                                                 "(monitoring/alerts/rules.py).")
    runbook_url = forms.URLField(label="Runbook URL", required=False, assume_scheme="https", max_length=200)

    class Meta:
        model = AlertRule
        fields = "__all__"


@admin.register(AlertRule)
class AlertRuleAdmin(AuditedChangesMixin, admin.ModelAdmin):
    """Admins edit rules; Operators tune thresholds and durations (``monitoring.change_alertrule`` without being
    Admins: every other field is read-only for them); Support reads. Each change is an audit row with old and new
    values."""

    # What an Operator may change on a rule: when it fires, not what it is.
    TUNABLE = ("threshold", "for_seconds", "clear_seconds")

    audit_name = "alert_rule"
    form = AlertRuleForm
    list_display = ["name", "title", "signal", "comparison", "threshold", "for_seconds", "severity", "component",
                    "enabled", "updated_at"]
    list_filter = ["severity", "component", "enabled"]
    search_fields = ["name", "title"]
    filter_horizontal = ["inhibited_by"]
    readonly_fields = ["alerts_link", "updated_at"]
    fieldsets = [
        (None, {"fields": ["name", "title", "enabled", "alerts_link"]}),
        ("Condition", {"fields": ["signal", "comparison", "threshold", "for_seconds", "clear_seconds"]}),
        ("Alerts it raises", {"fields": ["severity", "component", "labels", "inhibited_by"]}),
        ("What to do", {"fields": ["runbook", "runbook_url"]}),
        (None, {"fields": ["updated_at"]}),
    ]

    def _may_edit_everything(self, request) -> bool:
        # Admins have every permission; Operators have change_alertrule but not add (nor delete). The user's
        # permissions are cached on it, so this costs no query on the admin's pages.
        return request.user.has_perm("monitoring.add_alertrule")

    def get_form(self, request, obj=None, **kwargs):
        form = super().get_form(request, obj, **kwargs)
        readonly = set(self.get_readonly_fields(request, obj))
        for name in [name for name in form.base_fields if name in readonly]:  # declared fields (signal) included
            del form.base_fields[name]
        return form

    def get_readonly_fields(self, request, obj=None):
        readonly = list(super().get_readonly_fields(request, obj))
        if obj is not None and self.has_change_permission(request, obj) and not self._may_edit_everything(request):
            every = [field for fieldset in self.fieldsets for field in fieldset[1]["fields"]]
            readonly += [field for field in every if field not in self.TUNABLE and field not in readonly]
        return readonly

    @admin.display(description="alerts")
    def alerts_link(self, rule):
        if rule.pk is None:
            return "–"
        return format_html('<a href="{}?rule__id__exact={}">Alerts of this rule</a>',
                           reverse("admin:monitoring_alert_changelist"), rule.pk)
