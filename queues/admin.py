from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html
from django.utils.text import Truncator

from queues import broker
from queues.dispatch import get_policy
from queues.errors import BrokerUnavailable
from queues.forms import TaskSubmitForm
from queues.models import CaptionTask, CaptionTaskQuerySet, Dispatch, TaskEvent
from queues.operations.admin import CappedCountPaginator, TaskActionsMixin
from queues.services import task_submit


class TaskEventInline(admin.TabularInline):
    """The task's timeline: each attempt (worker, start, duration, error and traceback) and each operator change."""

    model = TaskEvent
    extra = 0
    can_delete = False
    fields = ["at", "kind", "attempt", "started_at", "worker_name", "duration_ms", "error_class", "error_message",
              "detail", "actor", "correlation_id", "traceback_details"]
    readonly_fields = fields
    ordering = ["at", "id"]
    verbose_name_plural = "timeline"

    def has_add_permission(self, request, obj=None):
        return False

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("actor")

    @admin.display(description="traceback")
    def traceback_details(self, event):
        if not event.traceback:
            return ""
        return format_html("<details><summary>show</summary><pre>{}</pre></details>", event.traceback)


class WorkerFilter(admin.SimpleListFilter):
    """Tasks by worker: the live workers are offered; any worker name works in the URL."""

    title = "worker"
    parameter_name = "worker"

    def lookups(self, request, model_admin):
        try:
            names = sorted(worker.name for worker in broker.workers())
        except (BrokerUnavailable, *broker.REDIS_ERRORS):
            names = []
        current = self.value()
        if current and current not in names:
            names.append(current)
        return [(name, name) for name in names]

    def queryset(self, request, queryset):
        return queryset.filter(worker_name=self.value()) if self.value() else queryset


class ErrorClassFilter(admin.SimpleListFilter):
    """Error classes of the dead letters. Django's default lists the distinct values of the whole table, a scan
    of every row; failed tasks are the ones worth filtering by error, and they have an index."""

    title = "error class"
    parameter_name = "last_error_class"

    def lookups(self, request, model_admin):
        classes = list(CaptionTask.objects.filter(status="FAILED").exclude(last_error_class="").order_by()
                       .values_list("last_error_class", flat=True).distinct()[:50])
        if self.value() and self.value() not in classes:
            classes.append(self.value())
        return [(name, name) for name in sorted(classes)]

    def queryset(self, request, queryset):
        return queryset.filter(last_error_class=self.value()) if self.value() else queryset


@admin.register(CaptionTask)
class CaptionTaskAdmin(TaskActionsMixin, admin.ModelAdmin):
    list_display = ["id", "status_badge", "priority", "image_short", "caption_short", "attempts",
                    "last_error_class", "created_at", "finished_at"]
    list_display_links = ["id"]
    list_filter = ["status", "priority", "dispatch", ErrorClassFilter, ("created_at", admin.DateFieldListFilter),
                   ("finished_at", admin.DateFieldListFilter), WorkerFilter]
    paginator = CappedCountPaginator
    search_fields = CaptionTaskQuerySet.SEARCHED  # shows the search box; CaptionTaskQuerySet.search runs it
    date_hierarchy = None
    list_per_page = 50
    show_full_result_count = False
    ordering = ["-id"]
    readonly_fields = ["status", "dispatch", "attempts", "caption", "last_error_class", "last_error_message",
                       "worker_name", "created_at", "published_at", "publish_after", "started_at", "finished_at", "updated_at",
                       "job_in_redis", "task_actions", "correlation_id"]
    inlines = [TaskEventInline]

    fieldsets = [
        (None, {"fields": ["image_ref", "priority", "idempotency_key", "status", "dispatch", "attempts",
                           "correlation_id", "task_actions"]}),
        ("Result", {"fields": ["caption", "last_error_class", "last_error_message", "worker_name"]}),
        ("Timestamps", {"fields": ["created_at", "published_at", "publish_after", "started_at", "finished_at",
                                   "updated_at"]}),
        ("In Redis", {"fields": ["job_in_redis"]}),
    ]

    def get_search_results(self, request, queryset, search_term):
        # The API's search too (CaptionTaskQuerySet.search): task ids and correlation ids by index, else substrings.
        return queryset.search(search_term), False

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = TaskSubmitForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fieldsets(self, request, obj=None):
        if obj is None:
            return [(None, {"fields": ["image_ref", "priority", "idempotency_key"],
                            "description": "The task is saved first and queued right after."})]
        return self.fieldsets

    def get_inlines(self, request, obj):
        return self.inlines if obj is not None else []

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        # A submitted task's input is part of its history: it is requeued or cancelled, never edited.
        return ["image_ref", "priority", "idempotency_key", *self.readonly_fields]

    def save_model(self, request, obj, form, change):
        if change:
            return
        task = task_submit(image_ref=form.cleaned_data["image_ref"], priority=form.cleaned_data["priority"],
                           idempotency_key=form.cleaned_data.get("idempotency_key"))
        if obj.idempotency_key and task.created_at < obj.created_at:
            messages.info(request, f"A task with this idempotency key already exists: task {task.pk}.")
        elif task.dispatch == Dispatch.HELD:
            messages.warning(request, f"Task {task.pk} is held: submission is paused "
                                      f"({get_policy().status().paused_reason}); it runs once submission resumes.")
        obj.pk = task.pk
        obj._state.adding = False
        obj.refresh_from_db()

    def save_related(self, request, form, formsets, change):
        pass

    @admin.display(description="job in Redis")
    def job_in_redis(self, task):
        try:
            job = broker.fetch_job(task.pk)
        except (BrokerUnavailable, *broker.REDIS_ERRORS) as error:
            return f"Redis unreachable: {error}"
        if job is None:
            return "No job in Redis (finished jobs expire; unpublished tasks have none yet)."
        status = job.get_status(refresh=False)
        parts = [f"{job.id}: {status} on queue {job.origin}", f"enqueued {job.enqueued_at:%Y-%m-%d %H:%M:%S}"
                 if job.enqueued_at else "", f"started {job.started_at:%H:%M:%S}" if job.started_at else "",
                 f"ended {job.ended_at:%H:%M:%S}" if job.ended_at else "",
                 f"worker {job.worker_name}" if job.worker_name else ""]
        return "; ".join(part for part in parts if part)

    @admin.display(description="actions")
    def task_actions(self, task):
        links = []
        for action, label, allowed in (("requeue", "Requeue", task.status in ("FAILED", "CANCELLED", "DISCARDED")),
                                       ("retry_now", "Retry now", task.waiting_to_retry),
                                       ("cancel", "Cancel", task.status == "QUEUED"),
                                       ("discard", "Discard", task.status == "FAILED")):
            if allowed:
                links.append(format_html('<a class="button" href="{}">{}</a>',
                                         reverse("admin:queues_captiontask_do", args=[task.pk, action]), label))
        return format_html(" ".join(["{}"] * len(links)), *links) if links else "–"

    @admin.display(description="status", ordering="status")
    def status_badge(self, task):
        colours = {"QUEUED": "#79aec8", "PROCESSING": "#e0a800", "COMPLETED": "#2e7d32", "FAILED": "#c62828",
                   "CANCELLED": "#777", "DISCARDED": "#777"}
        label = "WAITING TO RETRY" if task.waiting_to_retry else task.status
        return format_html('<span style="color:{};font-weight:bold">{}</span>', colours.get(task.status, "#000"), label)

    @admin.display(description="image", ordering="image_ref")
    def image_short(self, task):
        return Truncator(task.image_ref).chars(50)

    @admin.display(description="caption / error")
    def caption_short(self, task):
        if task.status == "FAILED" or (task.last_error_message and task.status != "COMPLETED"):
            return format_html('<span style="color:#c62828">{}</span>',
                               Truncator(f"{task.last_error_class}: {task.last_error_message}").chars(90))
        return Truncator(task.caption).chars(90)

from queues.fleet import admin as fleet_admin  # noqa: E402,F401  (registers the fleet pages)
