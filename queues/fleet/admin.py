"""Fleet pages inside the Django admin: pools (scale, restart), live workers (restart, stop job, suspend/resume),
fleet history and the audit log. State-changing actions are POST-only behind a confirmation page, need the
``queues.manage_fleet`` permission (checked on the server for GET and POST), and leave an audit row."""

from __future__ import annotations


from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from queues import broker
from queues.audit import audit
from queues.dispatch import get_policy
from queues.errors import BrokerUnavailable
from queues import control
from queues.fleet.services import (
    FleetError,
    fleet_workers,
    pool_restart,
    pool_scale,
    processing_set_suspended,
    worker_restart,
    worker_stop_job,
)
from portal.admin_pages import ReadOnlyAdmin, client_address, confirmation
from queues.models import ApiToken, AuditEntry, FleetEvent, LiveWorker, WorkerPool, job_id_for

MANAGE_FLEET = "queues.manage_fleet"


def require_fleet_permission(request) -> None:
    if not request.user.has_perm(MANAGE_FLEET):
        raise PermissionDenied("Managing the fleet needs the 'Can scale pools, restart and stop workers, suspend "
                               "processing' permission.")


def fleet_rows_or_message(request):
    try:
        return fleet_workers()
    except (BrokerUnavailable, *broker.UNAVAILABLE_ERRORS) as error:
        messages.error(request, f"Redis is unreachable, the live worker list cannot be read: {error}")
        return []


@admin.register(WorkerPool)
class WorkerPoolAdmin(admin.ModelAdmin):
    list_display = ["name", "queues", "desired", "minimum", "maximum", "slots", "running", "autoscale",
                    "last_scaled_at", "pool_actions"]
    readonly_fields = ["desired", "last_scaled_at", "updated_at"]
    fieldsets = [
        (None, {"fields": ["name", "queues", "desired", "minimum", "maximum", "slots"]}),
        ("Autoscaling", {"fields": ["autoscale", "scale_up_threshold", "scale_down_threshold", "scale_up_cooldown",
                                    "scale_down_cooldown", "last_scaled_at"]}),
    ]

    def changelist_view(self, request, extra_context=None):
        self._rows = fleet_rows_or_message(request)
        return super().changelist_view(request, extra_context)

    @admin.display(description="running")
    def running(self, pool):
        """Caption slots of the pool's live workers (processes × their slots), the unit of "desired"."""
        return sum(row.slots for row in getattr(self, "_rows", []) if row.pool == pool.name and row.alive)

    @admin.display(description="actions")
    def pool_actions(self, pool):
        return format_html('<a class="button" href="{}">Scale</a> <a class="button" href="{}">Restart</a>',
                           reverse("admin:queues_workerpool_scale", args=[pool.pk]),
                           reverse("admin:queues_workerpool_restart", args=[pool.pk]))

    def get_readonly_fields(self, request, obj=None):
        # Desired changes go through "Scale" (validated, recorded); a new pool sets its first count here.
        return ["last_scaled_at", "updated_at"] if obj is None else self.readonly_fields

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        audit(user=request.user, action="pool_update" if change else "pool_create", target=obj.name,
              detail={"changed": form.changed_data}, address=client_address(request))

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("<int:pool_id>/scale/", wrap(self.scale_view), name="queues_workerpool_scale"),
            path("<int:pool_id>/restart/", wrap(self.restart_view), name="queues_workerpool_restart"),
        ] + super().get_urls()

    def scale_view(self, request, pool_id):
        require_fleet_permission(request)
        pool = get_object_or_404(WorkerPool, pk=pool_id)
        cancel = reverse("admin:queues_workerpool_changelist")
        unit = "Workers" if pool.slots == 1 else f"Caption slots ({pool.slots} per process)"
        field = {"name": "desired", "label": f"{unit} ({pool.minimum} to {pool.maximum})", "value": pool.desired}
        if request.method == "POST":
            raw = request.POST.get("desired", "").strip()
            try:
                desired = int(raw)
                pool_scale(pool=pool, desired=desired, user=request.user, address=client_address(request),
                           reason=f"scaled by {request.user}")
            except ValueError:
                error = f"Workers: enter a whole number, not {raw!r}."
            except ValidationError as invalid:
                error = "Workers: " + " ".join(invalid.message_dict.get("desired", invalid.messages))
            else:
                messages.success(request, f"Pool {pool.name} scaled to {desired} worker(s); supervisors follow "
                                          "within a second or two.")
                return HttpResponseRedirect(cancel)
            field["value"] = raw
            return confirmation(request, self, title=f"Scale pool {pool.name}", action_label="Scale",
                                question=f"Pool {pool.name} wants {pool.desired} worker(s) now.", cancel_url=cancel,
                                field=field, error=error)
        return confirmation(request, self, title=f"Scale pool {pool.name}", action_label="Scale",
                            question=f"Pool {pool.name} wants {pool.desired} worker(s) now. How many should run?",
                            cancel_url=cancel, field=field)

    def restart_view(self, request, pool_id):
        require_fleet_permission(request)
        pool = get_object_or_404(WorkerPool, pk=pool_id)
        cancel = reverse("admin:queues_workerpool_changelist")
        if request.method == "POST":
            count = pool_restart(pool=pool, user=request.user, address=client_address(request))
            messages.success(request, f"Asked {count} worker(s) of pool {pool.name} to restart after their "
                                      "current task.")
            return HttpResponseRedirect(cancel)
        running = sum(1 for row in fleet_rows_or_message(request) if row.pool == pool.name and row.alive)
        return confirmation(request, self, title=f"Restart pool {pool.name}", action_label="Restart",
                            question=f"Restart the {running} running worker(s) of pool {pool.name}? Each finishes "
                                     "its current task first; its supervisor starts a fresh one.", cancel_url=cancel)


@admin.register(LiveWorker)
class LiveWorkerAdmin(ReadOnlyAdmin):
    """The live worker list (rq registrations and liveness keys), with per-worker and fleet-wide actions."""

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("", wrap(self.list_view), name="queues_liveworker_changelist"),
            path("<str:worker_name>/restart/", wrap(self.restart_view), name="queues_liveworker_restart"),
            path("<str:worker_name>/stop-job/", wrap(self.stop_job_view), name="queues_liveworker_stop_job"),
            path("suspend/", wrap(self.suspend_view), name="queues_liveworker_suspend"),
            path("resume/", wrap(self.resume_view), name="queues_liveworker_resume"),
        ]

    def list_view(self, request):
        if not self.has_view_permission(request):
            raise PermissionDenied
        rows = fleet_rows_or_message(request)
        try:
            suspended = control.processing_suspended()
        except (BrokerUnavailable, *broker.UNAVAILABLE_ERRORS):
            suspended = None
        # Each row with the job its Stop job button names: the one shown, whatever the worker runs by the time
        # the operator confirms.
        rows = [(row, job_id_for(row.task_id) if row.task_id else None) for row in rows]
        context = {**self.admin_site.each_context(request), "title": "Live workers", "rows": rows,
                   "suspended": suspended, "can_manage": request.user.has_perm(MANAGE_FLEET),
                   "pools": WorkerPool.objects.all(), "opts": self.model._meta,
                   "pollers": get_policy().pollers()}
        return TemplateResponse(request, "admin/queues/liveworker/list.html", context)

    def _worker_action(self, request, worker_name, *, title, question, label, act, done):
        require_fleet_permission(request)
        cancel = reverse("admin:queues_liveworker_changelist")
        if request.method == "POST":
            try:
                outcome = act()
            except FleetError as error:
                messages.error(request, str(error))
            else:
                messages.success(request, done(outcome))
            return HttpResponseRedirect(cancel)
        return confirmation(request, self, title=title, question=question, action_label=label, cancel_url=cancel)

    def restart_view(self, request, worker_name):
        return self._worker_action(
            request, worker_name, title=f"Restart worker {worker_name}", label="Restart",
            question=f"Restart worker {worker_name}? It finishes its current task, exits, and its supervisor "
                     "starts a fresh worker.",
            act=lambda: worker_restart(worker_name=worker_name, user=request.user, address=client_address(request)),
            done=lambda _: f"Worker {worker_name} will restart after its current task.")

    def stop_job_view(self, request, worker_name):
        """Stops the job the live worker list showed: its link carries ``job_id`` and the confirmation posts it
        back, so a worker that has moved on to another job in the meantime is refused, not interrupted."""
        require_fleet_permission(request)
        cancel = reverse("admin:queues_liveworker_changelist")
        job_id = (request.POST if request.method == "POST" else request.GET).get("job_id", "").strip()
        context = {**self.admin_site.each_context(request), "title": f"Stop the job of {worker_name}",
                   "worker_name": worker_name, "job_id": job_id, "cancel_url": cancel, "opts": self.model._meta}
        if not job_id:
            context["error"] = ("Say which job to stop: use Stop job on the live workers page, which names the job "
                                "the worker is running.")
            return TemplateResponse(request, "admin/queues/liveworker/confirm_stop_job.html", context, status=400)
        if request.method == "POST":
            try:
                worker_stop_job(worker_name=worker_name, job_id=job_id, user=request.user,
                                address=client_address(request))
            except FleetError as error:
                messages.error(request, str(error))
            else:
                messages.success(request, f"Asked worker {worker_name} to stop {job_id}.")
            return HttpResponseRedirect(cancel)
        return TemplateResponse(request, "admin/queues/liveworker/confirm_stop_job.html", context)

    def _suspension(self, request, suspended: bool):
        require_fleet_permission(request)
        cancel = reverse("admin:queues_liveworker_changelist")
        verb = "Suspend" if suspended else "Resume"
        if request.method == "POST":
            processing_set_suspended(suspended=suspended, user=request.user, address=client_address(request))
            messages.success(request, "Processing suspended: workers finish their current task and wait."
                             if suspended else "Processing resumed.")
            return HttpResponseRedirect(cancel)
        question = ("Suspend all processing? Workers finish the task in hand and take no new ones; tasks stay "
                    "queued." if suspended else "Resume processing on all queues?")
        return confirmation(request, self, title=f"{verb} processing", question=question, action_label=verb,
                            cancel_url=cancel, danger=suspended)

    def suspend_view(self, request):
        return self._suspension(request, True)

    def resume_view(self, request):
        return self._suspension(request, False)


@admin.register(FleetEvent)
class FleetEventAdmin(ReadOnlyAdmin):
    list_display = ["at", "kind", "pool", "worker_name", "host", "pid", "reason", "user", "figures"]
    list_filter = ["kind", "pool", "host"]
    search_fields = ["worker_name", "reason"]
    list_select_related = ["pool", "user"]
    show_full_result_count = False
    date_hierarchy = "at"


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = ["at", "user", "action", "target", "count", "address", "correlation_id", "detail"]
    list_filter = ["action", "user"]
    search_fields = ["target", "=correlation_id"]
    list_select_related = ["user"]
    show_full_result_count = False
    date_hierarchy = "at"


@admin.register(ApiToken)
class ApiTokenAdmin(ReadOnlyAdmin):
    """Tokens of the HTTP API (/api/v1/ and the fleet calls). They are issued by ``manage.py api_token create`` (the
    secret is printed once and never stored); here Admins see them and revoke them."""

    list_display = ["name", "user", "prefix", "rate_limit", "created_at", "last_used_at", "expires_at", "revoked_at"]
    list_select_related = ["user"]
    actions = ["revoke"]

    def get_actions(self, request):
        actions = super().get_actions(request)
        if not request.user.has_perm("queues.change_apitoken"):
            actions.pop("revoke", None)
        return actions

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request, queryset):
        if not request.user.has_perm("queues.change_apitoken"):
            raise PermissionDenied
        names = list(queryset.filter(revoked_at__isnull=True).values_list("name", flat=True))
        queryset.filter(name__in=names).update(revoked_at=timezone.now())
        for name in names:
            audit(user=request.user, action="api_token_revoke", target=name, address=client_address(request))
        messages.success(request, f"Revoked {len(names)} token(s); their calls are refused from now on.")
