"""Silences: made from matcher text or from an alert, listed by state, expired early."""

from __future__ import annotations

from datetime import datetime, timedelta

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from monitoring.alerts.actions import (
    AlertError,
    silence_create,
    silence_expire,
    silence_stops_nothing,
)
from monitoring.alerts.admin.alerts import MatchersField
from monitoring.alerts.admin.base import EXPIRE_SILENCE, NoInput, badge, form_page, selection_hidden
from monitoring.models import (
    Alert,
    Silence,
)
from portal.admin_pages import client_address, confirmation


class SilenceStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("active", "active"), ("upcoming", "upcoming"), ("expired", "expired")]

    def queryset(self, request, queryset):
        now = timezone.now()
        return {"active": lambda: queryset.filter(starts_at__lte=now, ends_at__gt=now),
                "upcoming": lambda: queryset.filter(starts_at__gt=now),
                "expired": lambda: queryset.filter(ends_at__lte=now)}.get(self.value(), lambda: queryset)()


class SilenceForm(forms.ModelForm):
    matchers = MatchersField()

    class Meta:
        model = Silence
        fields = ["matchers", "starts_at", "ends_at", "reason"]

    def clean(self):
        data = super().clean()
        if data.get("starts_at") and data.get("ends_at") and data["ends_at"] <= data["starts_at"]:
            self.add_error("ends_at", "The end must be after the start.")
        refused = silence_stops_nothing(data["matchers"]) if data.get("matchers") else None
        if refused:
            self.add_error("matchers", refused)
        return data


def silence_state(silence: Silence, now: datetime) -> str:
    if silence.ends_at <= now:
        return "expired"
    return "active" if silence.starts_at <= now else "upcoming"


@admin.register(Silence)
class SilenceAdmin(admin.ModelAdmin):
    """Silences are created here (or from an alert) through silence_create and ended early through silence_expire,
    both audited. A saved silence is not edited or deleted: what was silenced when stays in the history."""

    form = SilenceForm
    list_display = ["matchers_display", "state_badge", "starts_at", "ends_at", "reason", "created_by", "expired_by"]
    list_display_links = ["matchers_display"]
    list_filter = [SilenceStateFilter]
    search_fields = ["reason"]
    list_select_related = ["created_by", "expired_by"]
    show_full_result_count = False
    actions = ["expire_selected"]
    view_fields = ["matchers_display", "state_badge", "starts_at", "ends_at", "reason", "created_by", "created_at",
                   "expired_by", "silence_actions", "matching_alerts"]

    @admin.display(description="matchers")
    def matchers_display(self, silence):
        return str(silence)

    @admin.display(description="state")
    def state_badge(self, silence):
        state = silence_state(silence, timezone.now())
        return badge(state, {"active": "#b26a00", "upcoming": "#1565c0", "expired": "#777"}[state])

    @admin.display(description="actions")
    def silence_actions(self, silence):
        if silence.ends_at <= timezone.now():
            return "–"
        return format_html('<a class="button" href="{}">Expire now</a>',
                           reverse("admin:monitoring_silence_expire", args=[silence.pk]))

    @admin.display(description="open alerts it matches")
    def matching_alerts(self, silence):
        matching = [alert for alert in Alert.objects.open().order_by().only("pk", "summary", "labels")[:500]
                    if silence.matches(alert.labels)]
        return format_html_join(", ", '<a href="{}">{}</a>', [
            (reverse("admin:monitoring_alert_change", args=[alert.pk]), alert.summary) for alert in matching]) or "–"

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_expire_permission(self, request):
        return request.user.has_perm(EXPIRE_SILENCE)

    def get_fieldsets(self, request, obj=None):
        if obj is None:
            return [(None, {"fields": ["matchers", "starts_at", "ends_at", "reason"]})]
        fields = self.view_fields if self.has_expire_permission(request) else \
            [name for name in self.view_fields if name != "silence_actions"]
        return [(None, {"fields": fields})]

    def get_readonly_fields(self, request, obj=None):
        return [] if obj is None else self.view_fields

    def get_changeform_initial_data(self, request):
        now = timezone.now().replace(second=0, microsecond=0)
        return {"starts_at": now, "ends_at": now + timedelta(hours=2), **super().get_changeform_initial_data(request)}

    def save_model(self, request, obj, form, change):
        if change:  # never reached: saved silences have no change form
            raise PermissionDenied
        silence = silence_create(matchers=form.cleaned_data["matchers"], starts_at=obj.starts_at,
                                 ends_at=obj.ends_at, reason=obj.reason, user=request.user,
                                 address=client_address(request))
        obj.pk = silence.pk
        obj._state.adding = False
        obj.refresh_from_db()

    def changelist_view(self, request, extra_context=None):
        if request.method == "POST" and "expire_selected" in request.POST.getlist("action") and \
                not self.has_expire_permission(request):
            raise PermissionDenied
        return super().changelist_view(request, extra_context)

    def get_urls(self):
        return [path("<int:silence_id>/expire/", self.admin_site.admin_view(self.expire_view),
                     name="monitoring_silence_expire")] + super().get_urls()

    def expire_view(self, request, silence_id):
        if not self.has_expire_permission(request):
            raise PermissionDenied
        silence = get_object_or_404(Silence, pk=silence_id)
        back = reverse("admin:monitoring_silence_change", args=[silence.pk])
        if request.method == "POST":
            try:
                silence_expire(silence=silence, user=request.user, address=client_address(request))
            except AlertError as error:
                messages.error(request, str(error))
            else:
                messages.success(request, f"Silence ended: {silence}. Matching alerts are notified again.")
            return HttpResponseRedirect(back)
        return confirmation(request, self, title="Expire silence", action_label="Expire now", cancel_url=back,
                            question=f"End the silence {silence} now? Matching firing alerts are notified on the "
                                     "next evaluation.")

    @admin.action(description="Expire selected silences now", permissions=["expire"])
    def expire_selected(self, request, queryset):
        running = queryset.filter(ends_at__gt=timezone.now())
        if request.POST.get("confirm") == "yes":
            done = 0
            for silence in running.iterator():
                try:
                    silence_expire(silence=silence, user=request.user, address=client_address(request))
                    done += 1
                except AlertError:  # ended by itself since the confirmation was shown
                    pass
            messages.success(request, f"Expired {done} silence(s).")
            return None
        total, count = queryset.count(), running.count()
        return form_page(request, self, title="Expire silences", form=NoInput(), action_label=f"Expire {count}",
                         question=f"End {count} of the {total} selected silence(s) now? The others have ended "
                                  "already.", cancel_url=request.get_full_path(), hidden=selection_hidden(request))
