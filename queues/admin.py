from django.contrib import admin, messages
from django.utils.html import format_html
from django.utils.text import Truncator

from queues.forms import TaskSubmitForm
from queues.models import CaptionTask, TaskEvent
from queues.services import task_submit


class TaskEventInline(admin.TabularInline):
    model = TaskEvent
    extra = 0
    can_delete = False
    fields = ["at", "kind", "attempt", "started_at", "worker_name", "duration_ms", "error_class", "error_message",
              "detail"]
    readonly_fields = fields
    ordering = ["at", "id"]

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(CaptionTask)
class CaptionTaskAdmin(admin.ModelAdmin):
    list_display = ["id", "status_badge", "priority", "image_short", "caption_short", "attempts",
                    "last_error_class", "created_at", "finished_at"]
    list_display_links = ["id"]
    list_filter = ["status", "priority", "last_error_class"]
    search_fields = ["=id", "image_ref", "last_error_message", "idempotency_key"]
    date_hierarchy = None
    list_per_page = 50
    show_full_result_count = False
    ordering = ["-id"]
    readonly_fields = ["status", "attempts", "caption", "last_error_class", "last_error_message", "worker_name",
                       "created_at", "published_at", "publish_after", "started_at", "finished_at", "updated_at"]
    inlines = [TaskEventInline]

    fieldsets = [
        (None, {"fields": ["image_ref", "priority", "idempotency_key", "status", "attempts"]}),
        ("Result", {"fields": ["caption", "last_error_class", "last_error_message", "worker_name"]}),
        ("Timestamps", {"fields": ["created_at", "published_at", "publish_after", "started_at", "finished_at",
                                   "updated_at"]}),
    ]

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
        obj.pk = task.pk
        obj._state.adding = False
        obj.refresh_from_db()

    def save_related(self, request, form, formsets, change):
        pass

    @admin.display(description="status", ordering="status")
    def status_badge(self, task):
        colours = {"QUEUED": "#79aec8", "PROCESSING": "#e0a800", "COMPLETED": "#2e7d32", "FAILED": "#c62828",
                   "CANCELLED": "#777"}
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

from queues import fleet_admin  # noqa: E402,F401  (registers the fleet pages)
