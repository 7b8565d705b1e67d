"""The migration console in the admin: runs (timeline, progress, preflight, logs, start/advance/resume/roll back),
the dispatch mode (Admins change it), submission pauses, the database pollers and the dispatch history.

Starting, advancing, resuming and rolling back need ``migration.run_migration`` (Admins); each asks for confirmation,
is audited, and hands the run to a ``manage.py migrate_to_rq`` process of its own (a phase can take minutes: the
request returns at once and the page follows the run's rows). Support and Operators read everything.
"""

from __future__ import annotations

import subprocess
import sys

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from migration import dispatch, runs, state
from migration.models import LegacyWorker, MigrationEvent, MigrationRun, SystemMode
from migration.preflight import preflight_report
from queues.audit import audit
from portal.admin_pages import ReadOnlyAdmin, client_address, confirmation
from queues.models import CaptionTask, Dispatch, TaskStatus

RUN_MIGRATION = "migration.run_migration"
PAUSE_SUBMISSION = "migration.pause_submission"


def _require(request, permission: str, what: str) -> None:
    if not request.user.has_perm(permission):
        raise PermissionDenied(f"{what} needs the '{permission.split('.')[1].replace('_', ' ')}' permission.")


def run_in_background(run: MigrationRun, *, user, one_phase: bool = False) -> None:
    """Executes the run in a ``manage.py migrate_to_rq`` process of its own, logging to var/log/."""
    log_dir = settings.VAR_DIR / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(settings.BASE_DIR / "manage.py"), "migrate_to_rq",
               "advance" if one_phase else "resume", "--run", str(run.pk), "--no-progress"]
    if getattr(user, "pk", None):
        command += ["--actor", user.get_username()]
    with open(log_dir / f"migration-run-{run.pk}.log", "ab") as log:
        subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, cwd=settings.BASE_DIR)


@admin.register(MigrationRun)
class MigrationRunAdmin(ReadOnlyAdmin):
    list_display = ["__str__", "state", "current_phase", "created_at", "finished_at", "started_by"]
    list_filter = ["kind", "state"]
    change_list_template = "admin/migration/migrationrun/change_list.html"

    def current_phase(self, run):
        phase = run.phases.exclude(state__in=("done", "skipped")).order_by("order").first()
        return runs.PHASE_TITLES.get(phase.name, phase.name) if phase else "-"

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("preflight/", wrap(self.preflight_view), name="migration_preflight"),
            path("start/", wrap(self.start_view), name="migration_start"),
            path("rollback/", wrap(self.rollback_view), name="migration_rollback"),
            path("<int:run_id>/act/<str:act>/", wrap(self.act_view), name="migration_act"),
            *super().get_urls(),
        ]

    def changelist_view(self, request, extra_context=None):
        extra = {"open_run": state.open_run(), "can_run": request.user.has_perm(RUN_MIGRATION),
                 "mode": state.system_mode()}
        return super().changelist_view(request, {**(extra_context or {}), **extra})

    def change_view(self, request, object_id, form_url="", extra_context=None):
        if not self.has_view_permission(request):
            raise PermissionDenied
        run = get_object_or_404(MigrationRun, pk=object_id)
        phases = list(run.phases.order_by("order"))
        for phase in phases:
            phase.title = runs.PHASE_TITLES.get(phase.name, phase.name)
        lines = list(run.log_lines.select_related("phase").order_by("-at", "-id")[:300])
        heartbeat_age = runs.lease_age(run)
        held = runs._lease_held(run)
        context = {
            **self.admin_site.each_context(request), "title": str(run), "run": run, "phases": phases,
            "log_lines": lines, "opts": self.model._meta, "can_run": request.user.has_perm(RUN_MIGRATION),
            # Live only while its executor's lease runs: a process killed without a word leaves RUNNING behind.
            "live": run.state == MigrationRun.State.RUNNING and held,
            "gone": run.state == MigrationRun.State.RUNNING and not held,
            "heartbeat_age": heartbeat_age, "lease_seconds": settings.MIGRATION_RUN_LEASE_SECONDS,
            "mode": state.system_mode(),
            "preflight": run.preflight.get("checks", []) if run.preflight else [],
            "verification": run.verification or None,
        }
        return TemplateResponse(request, "admin/migration/migrationrun/detail.html", context)

    def preflight_view(self, request):
        """GET shows the last report a run recorded (a page must not cost more with more tasks); POST, for those who
        may run migrations, runs the checks now (they count the tasks per status)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        report, checked_at = None, None
        if request.method == "POST":
            _require(request, RUN_MIGRATION, "Running the preflight checks")
            report = preflight_report().as_dict()
        else:
            latest = MigrationRun.objects.exclude(preflight={}).order_by("-pk").first()
            if latest is not None:
                report, checked_at = latest.preflight, latest.created_at
        context = {**self.admin_site.each_context(request), "title": "Preflight checks", "report": report,
                   "checked_at": checked_at, "fresh": request.method == "POST",
                   "can_run": request.user.has_perm(RUN_MIGRATION), "opts": self.model._meta}
        return TemplateResponse(request, "admin/migration/migrationrun/preflight.html", context)

    def _changelist(self):
        return reverse("admin:migration_migrationrun_changelist")

    def start_view(self, request):
        _require(request, RUN_MIGRATION, "Starting a migration")
        question = ("Start the migration to RQ? It checks the system, writes a backup, pauses submission, stops the "
                    "database pollers, moves every queued database task to RQ, verifies, cuts over and resumes "
                    "submission. Soak in hybrid mode for this many seconds first (0: none):")
        field = {"name": "soak_seconds", "label": "Hybrid soak (seconds)", "value": request.POST.get(
            "soak_seconds", "0")}
        if request.method != "POST":
            return confirmation(request, self, title="Start the migration", question=question,
                                action_label="Start the migration", cancel_url=self._changelist(), field=field)
        try:
            soak = int(request.POST.get("soak_seconds", "0"))
            run = runs.run_create(user=request.user, options={"soak_seconds": soak})
        except (ValueError, runs.RunError) as error:
            message = "soak_seconds: give a whole number of seconds" if isinstance(error, ValueError) else str(error)
            return confirmation(request, self, title="Start the migration", question=question,
                                action_label="Start the migration", cancel_url=self._changelist(), field=field,
                                error=message)
        run_in_background(run, user=request.user)
        messages.success(request, f"{run} started; this page follows it.")
        return HttpResponseRedirect(reverse("admin:migration_migrationrun_change", args=[run.pk]))

    def rollback_view(self, request):
        _require(request, RUN_MIGRATION, "Rolling back")
        open_run = state.open_run()
        question = ("Roll back to the database poller? The mode becomes legacy and every task not yet completed "
                    "goes back to the database poller; its job is removed from Redis. The rollback is a run of its "
                    "own" + (f" and ends {open_run}." if open_run else ".")
                    + (f" {open_run} is marked running, but its process has not been heard from for over "
                       f"{settings.MIGRATION_RUN_LEASE_SECONDS} s: the rollback takes the run from it, and if it is "
                       "only stalled it stops without writing when it wakes." if open_run and
                       open_run.state == MigrationRun.State.RUNNING else ""))
        if request.method != "POST":
            return confirmation(request, self, title="Roll back", question=question, action_label="Roll back",
                                cancel_url=self._changelist(), danger=True)
        try:
            run = runs.rollback_create(user=request.user,
                                       of=open_run if open_run and open_run.kind == "migration" else None)
        except runs.RunError as error:
            return confirmation(request, self, title="Roll back", question=question, action_label="Roll back",
                                cancel_url=self._changelist(), danger=True, error=str(error))
        run_in_background(run, user=request.user)
        messages.success(request, f"{run} started.")
        return HttpResponseRedirect(reverse("admin:migration_migrationrun_change", args=[run.pk]))

    def act_view(self, request, run_id: int, act: str):
        _require(request, RUN_MIGRATION, "Running a migration")
        if act not in ("advance", "resume"):
            raise PermissionDenied("Unknown action.")
        run = get_object_or_404(MigrationRun, pk=run_id)
        back = reverse("admin:migration_migrationrun_change", args=[run.pk])
        question = (f"Execute the next phase of {run}?" if act == "advance" else
                    f"Resume {run} from its checkpoint and execute its remaining phases?")
        if request.method != "POST":
            return confirmation(request, self, title=act.capitalize(), question=question,
                                action_label=act.capitalize(), cancel_url=back)
        if not run.is_open and run.state != MigrationRun.State.FAILED:
            return confirmation(request, self, title=act.capitalize(), question=question,
                                action_label=act.capitalize(), cancel_url=back,
                                error=f"{run} has {run.get_state_display().lower()}: nothing to {act}.")
        rollback = run.rollbacks.exclude(state=MigrationRun.State.SUCCEEDED).first()
        if rollback is not None:
            return confirmation(request, self, title=act.capitalize(), question=question,
                                action_label=act.capitalize(), cancel_url=back,
                                error=f"{run} is being rolled back by {rollback}: {act} the rollback instead.")
        if runs._lease_held(run):
            return confirmation(request, self, title=act.capitalize(), question=question,
                                action_label=act.capitalize(), cancel_url=back,
                                error=f"{run} is being executed by {run.executor}.")
        audit(user=request.user, action=f"migration_run_{act}", target=str(run), address=client_address(request))
        run_in_background(run, user=request.user, one_phase=act == "advance")
        messages.success(request, f"{run}: {act} started.")
        return HttpResponseRedirect(back)


class SystemModeForm(forms.ModelForm):
    class Meta:
        model = SystemMode
        fields = ["mode", "hybrid_rq_percent", "fallback_enabled", "fallback_timeout"]

    def clean(self):
        cleaned = super().clean()
        if {"mode", "hybrid_rq_percent"} & set(self.changed_data):
            dispatch.refuse_during_run("sets the mode", "mode")  # a field error on the form, not a failed save
        return cleaned


@admin.register(SystemMode)
class SystemModeAdmin(admin.ModelAdmin):
    form = SystemModeForm
    fields = ["mode", "hybrid_rq_percent", "fallback_enabled", "fallback_timeout"]
    change_form_template = "admin/migration/systemmode/change_form.html"

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def changelist_view(self, request, extra_context=None):
        return HttpResponseRedirect(reverse("admin:migration_systemmode_change", args=[1]))

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [path("pause/", wrap(self.pause_view), name="migration_pause"),
                path("resume/", wrap(self.resume_view), name="migration_resume"), *super().get_urls()]

    def change_view(self, request, object_id, form_url="", extra_context=None):
        state.system_mode_ensure()  # written at install (migration 0003); again if a test emptied the table
        row = state.system_mode()
        extra = {"row": row, "can_pause": request.user.has_perm(PAUSE_SUBMISSION),
                 "events": MigrationEvent.objects.select_related("user")[:20],
                 "pollers": dispatch.legacy_workers_alive()}
        return super().change_view(request, str(row.pk), form_url, {**(extra_context or {}), **extra})

    def save_model(self, request, obj, form, change):
        """Through the service, so that the change is an event and an audit entry like the command's."""
        if {"mode", "hybrid_rq_percent"} & set(form.changed_data):
            dispatch.mode_set(mode=obj.mode, user=request.user, hybrid_rq_percent=obj.hybrid_rq_percent,
                              address=client_address(request))
        changed = {name: form.cleaned_data[name] for name in ("fallback_enabled", "fallback_timeout")
                   if name in form.changed_data}
        if changed:
            SystemMode.objects.filter(pk=1).update(**changed)
            audit(user=request.user, action="dispatch_fallback", detail=changed, address=client_address(request))

    def _back(self):
        return reverse("admin:migration_systemmode_change", args=[1])

    def pause_view(self, request):
        _require(request, PAUSE_SUBMISSION, "Pausing submission")
        fields = [{"name": "reason", "label": "Reason (shown in the admin and /api/rq/health)", "type": "text",
                   "value": request.POST.get("reason", "")},
                  {"name": "duration", "label": "For", "type": "text", "value": request.POST.get("duration", ""),
                   "optional": True, "help": "90s, 30m, 2h or 1d; empty: until resumed by hand."}]
        question = ("Pause submission? New tasks are still accepted and committed, but held: no worker runs them "
                    "until submission resumes.")

        def ask(error: str = ""):
            return confirmation(request, self, title="Pause submission", question=question,
                                action_label="Pause submission", cancel_url=self._back(), fields=fields, error=error)

        if request.method != "POST":
            return ask()
        text = request.POST.get("duration", "").strip()
        try:
            duration = dispatch.duration_parse(text) if text else None
        except ValueError as error:
            return ask(f"For: {error}.")
        try:
            row = dispatch.submission_pause(reason=request.POST.get("reason", ""), user=request.user,
                                            duration=duration, address=client_address(request))
        except ValidationError as error:
            return ask(" ".join(error.message_dict.get("reason", error.messages)))
        until = f" until {row.paused_until:%Y-%m-%d %H:%M:%S} UTC" if row.paused_until else " until resumed"
        messages.success(request, f"Submission paused{until}: new tasks are held.")
        return HttpResponseRedirect(self._back())

    def resume_view(self, request):
        _require(request, PAUSE_SUBMISSION, "Resuming submission")
        held = CaptionTask.objects.filter(dispatch=Dispatch.HELD, status=TaskStatus.QUEUED).count()
        if request.method != "POST":
            return confirmation(request, self, title="Resume submission",
                                question=f"Resume submission and release the {held} held task(s)?",
                                action_label="Resume submission", cancel_url=self._back())
        try:
            released = dispatch.submission_resume(user=request.user, address=client_address(request))
        except ValidationError as error:
            return confirmation(request, self, title="Resume submission",
                                question=f"Resume submission and release the {held} held task(s)?",
                                action_label="Resume submission", cancel_url=self._back(),
                                error=" ".join(error.messages))
        messages.success(request, f"Submission resumed; {released} held task(s) released.")
        return HttpResponseRedirect(self._back())


@admin.register(LegacyWorker)
class LegacyWorkerAdmin(ReadOnlyAdmin):
    list_display = ["name", "host", "pid", "fallback", "alive", "current_task_id", "processed", "failed",
                    "started_at", "heartbeat_at", "stopped_at"]
    list_filter = ["fallback", "host"]

    def get_queryset(self, request):
        self._alive = set(dispatch.legacy_workers_alive().values_list("pk", flat=True))
        return super().get_queryset(request)

    @admin.display(boolean=True)
    def alive(self, worker):
        return worker.pk in self._alive


@admin.register(MigrationEvent)
class MigrationEventAdmin(ReadOnlyAdmin):
    list_display = ["at", "kind", "detail", "user", "figures_text"]
    list_filter = ["kind"]

    @admin.display(description="figures")
    def figures_text(self, event):
        return format_html("<code>{}</code>", ", ".join(f"{k}={v}" for k, v in (event.figures or {}).items()))
