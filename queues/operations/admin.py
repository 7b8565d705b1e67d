"""Queue operations in the admin: task actions with confirmation, the queues overview, dead letters, bulk operations.

Entry points only: each view checks the permission on the server, shows a confirmation with counts on GET (or the
first POST of an admin action), acts on the confirming POST through ``queues.operations.services`` and redirects with a
message that has the counts.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Count, Max, Min
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html

from queues import broker
from queues.errors import BrokerUnavailable
from queues import control
from portal.admin_pages import ReadOnlyAdmin, client_address, confirmation
from queues.models import BulkOperation, CaptionTask, Priority, QueueOverview, TaskStatus
from queues.operations.services import (
    ELIGIBLE,
    INLINE_LIMIT,
    bulk_operation_start,
    queue_empty,
    queue_set_paused,
    queues_maintenance,
    tasks_cancel,
    tasks_change_priority,
    tasks_discard,
    tasks_requeue,
    tasks_retry_now,
)

SERVICES = {"requeue": tasks_requeue, "cancel": tasks_cancel, "priority": tasks_change_priority,
            "retry_now": tasks_retry_now, "discard": tasks_discard}
LABELS = {"requeue": "Requeue", "cancel": "Cancel", "priority": "Change priority of", "retry_now": "Retry now",
          "discard": "Discard"}


class CappedCountPaginator(Paginator):
    """Counts at most ``CAP`` + 1 rows: a full COUNT over a million rows is what makes changelists slow."""

    CAP = 10_000

    @cached_property
    def count(self):
        return self.object_list.order_by()[:self.CAP + 1].count() if hasattr(self.object_list, "order_by") \
            else len(self.object_list)


def run_task_action(model_admin, request, queryset, action: str, **params):
    """Shared by the changelist actions: confirmation with counts first, then the service (or a background
    operation for large selections)."""
    total = queryset.count()
    eligible = queryset.filter(ELIGIBLE[action]).count()
    if request.POST.get("confirm") != "yes":
        by_status = Counter(dict(queryset.order_by().values_list("status").annotate(count=Count("id"))))
        context = {
            **model_admin.admin_site.each_context(request), "title": f"{LABELS[action]} tasks",
            "action": action, "action_label": LABELS[action], "total": total, "eligible": eligible,
            "refused": total - eligible, "by_status": sorted(by_status.items()), "priorities": Priority.choices,
            "params": params, "background": total > INLINE_LIMIT, "opts": model_admin.model._meta,
            "selected": request.POST.getlist(admin.helpers.ACTION_CHECKBOX_NAME),
            "select_across": request.POST.get("select_across", "0"), "action_name": request.POST.get("action"),
        }
        return TemplateResponse(request, "admin/queues/captiontask/confirm_task_action.html", context)
    if action == "priority" and params.get("priority") not in Priority.values:
        messages.error(request, "Choose the new priority: urgent, high, normal or low.")
        return None
    if total > INLINE_LIMIT:
        # "All matching the filter" is stored as the filter (re-evaluated by the run), never as its ids.
        across = request.POST.get("select_across") == "1"
        try:
            operation = bulk_operation_start(
                kind=action, matching=queryset if across else None, params=params, user=request.user,
                task_ids=None if across else list(queryset.values_list("pk", flat=True)),
                address=client_address(request))
        except BrokerUnavailable:
            messages.error(request, "Redis is unreachable, so the background operation could not start. "
                                    "Nothing was changed.")
            return None
        except ValueError as error:  # a filter that cannot be stored (no list filter of this admin builds one)
            messages.error(request, f"This selection cannot run in the background: {error}")
            return None
        url = reverse("admin:queues_bulkoperation_change", args=[operation.pk])
        messages.info(request, format_html(
            '{} {} tasks runs in the background: <a href="{}">follow its progress</a>.',
            LABELS[action], operation.total, url))
        return None
    ids = list(queryset.values_list("pk", flat=True))
    try:
        result = SERVICES[action](task_ids=ids, user=request.user, address=client_address(request), **params)
    except BrokerUnavailable:
        messages.error(request, f"Redis is unreachable: nothing more could be done ({LABELS[action].lower()} "
                                "needs it). Tasks already changed say so in their history; try again when Redis "
                                "answers.")
        return None
    (messages.success if result.changed else messages.warning)(request, result.describe())
    return None


class TaskActionsMixin:
    """Admin actions for CaptionTaskAdmin (mixed in there)."""

    actions = ["requeue_tasks", "cancel_tasks", "change_priority", "retry_tasks_now", "discard_tasks"]

    def has_requeue_permission(self, request):
        return request.user.has_perm("queues.requeue_task")

    def has_cancel_permission(self, request):
        return request.user.has_perm("queues.cancel_task")

    def has_priority_permission(self, request):
        return request.user.has_perm("queues.change_task_priority")

    def has_discard_permission(self, request):
        return request.user.has_perm("queues.discard_task")

    @admin.action(description="Requeue selected failed/cancelled tasks", permissions=["requeue"])
    def requeue_tasks(self, request, queryset):
        return run_task_action(self, request, queryset, "requeue")

    @admin.action(description="Cancel selected queued tasks", permissions=["cancel"])
    def cancel_tasks(self, request, queryset):
        return run_task_action(self, request, queryset, "cancel")

    @admin.action(description="Change priority of selected queued tasks", permissions=["priority"])
    def change_priority(self, request, queryset):
        return run_task_action(self, request, queryset, "priority", priority=request.POST.get("priority", ""))

    @admin.action(description="Retry selected tasks now (skip the backoff)", permissions=["requeue"])
    def retry_tasks_now(self, request, queryset):
        return run_task_action(self, request, queryset, "retry_now")

    @admin.action(description="Discard selected dead letters (failed tasks)", permissions=["discard"])
    def discard_tasks(self, request, queryset):
        return run_task_action(self, request, queryset, "discard")

    def get_urls(self):
        return [path("<int:task_id>/do/<str:action>/", self.admin_site.admin_view(self.single_task_action),
                     name="queues_captiontask_do")] + super().get_urls()

    def single_task_action(self, request, task_id, action):
        """Requeue, cancel, retry or discard one task from its page (same confirmation and service as the list)."""
        needed = {"requeue": "queues.requeue_task", "retry_now": "queues.requeue_task", "cancel": "queues.cancel_task",
                  "discard": "queues.discard_task"}
        if action not in needed:
            raise PermissionDenied("Unknown action")
        if not request.user.has_perm(needed[action]):
            raise PermissionDenied
        queryset = CaptionTask.objects.filter(pk=task_id)
        response = run_task_action(self, request, queryset, action)
        return response or HttpResponseRedirect(reverse("admin:queues_captiontask_change", args=[task_id]))


@admin.register(QueueOverview)
class QueueOverviewAdmin(ReadOnlyAdmin):
    """Per queue: waiting, running, waiting to retry, scheduled, dead-lettered, finished; oldest queued task;
    completed and failed in the last 5 minutes. O(queues) Redis commands and a fixed number of indexed queries."""

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("", wrap(self.overview_view), name="queues_queueoverview_changelist"),
            path("dead-letters/", wrap(self.dead_letters_view), name="queues_queueoverview_dead_letters"),
            path("dead-letters/discard/", wrap(self.dead_letters_discard_view),
                 name="queues_queueoverview_dead_letters_discard"),
            path("<str:queue_name>/<str:action>/", wrap(self.queue_action_view), name="queues_queueoverview_act"),
            path("maintenance/", wrap(self.maintenance_view), name="queues_queueoverview_maintenance"),
        ]

    def _require_view(self, request):
        if not request.user.has_perm("queues.view_captiontask"):
            raise PermissionDenied

    def overview_view(self, request):
        self._require_view(request)
        now = timezone.now()
        try:
            figures, paused = broker.queue_figures(), control.paused_queues()
        except (BrokerUnavailable, *broker.UNAVAILABLE_ERRORS) as error:
            figures, paused = {}, set()
            messages.error(request, f"Redis is unreachable; showing what the database knows: {error}")
        retrying = dict(CaptionTask.objects.filter(status=TaskStatus.QUEUED, published_at__isnull=True,
                                                   attempts__gt=0).order_by().values_list("priority")
                        .annotate(count=Count("id")))
        dead = dict(CaptionTask.objects.filter(status=TaskStatus.FAILED).order_by().values_list("priority")
                    .annotate(count=Count("id")))
        recent = CaptionTask.objects.filter(finished_at__gte=now - timedelta(minutes=5)).order_by()
        completed = dict(recent.filter(status=TaskStatus.COMPLETED).values_list("priority").annotate(count=Count("id")))
        failed = dict(recent.filter(status=TaskStatus.FAILED).values_list("priority").annotate(count=Count("id")))
        rows = []
        for name in broker.QUEUE_NAMES:
            oldest = CaptionTask.objects.filter(status=TaskStatus.QUEUED, priority=name).aggregate(
                oldest=Min("created_at"))["oldest"]
            redis_figures = figures.get(name, {})
            rows.append({
                "name": name, "paused": name in paused, "waiting": redis_figures.get("waiting"),
                "running": redis_figures.get("running"), "retrying": retrying.get(name, 0),
                "scheduled": redis_figures.get("scheduled"), "dead_redis": redis_figures.get("dead"),
                "dead": dead.get(name, 0), "finished": redis_figures.get("finished"),
                "oldest_age": (now - oldest).total_seconds() if oldest else None,
                "completed_5m": completed.get(name, 0), "failed_5m": failed.get(name, 0),
            })
        context = {**self.admin_site.each_context(request), "title": "Queues", "rows": rows,
                   "opts": self.model._meta, "can_pause": request.user.has_perm("queues.pause_queue"),
                   "can_empty": request.user.has_perm("queues.empty_queue")}
        return TemplateResponse(request, "admin/queues/queueoverview/overview.html", context)

    def dead_letters_view(self, request):
        self._require_view(request)
        groups = list(CaptionTask.objects.filter(status=TaskStatus.FAILED).order_by()
                      .values("last_error_class").annotate(count=Count("id"), newest=Max("id"))
                      .order_by("-count"))
        examples = {task.pk: task for task in CaptionTask.objects.filter(pk__in=[g["newest"] for g in groups])
                    .only("pk", "last_error_message", "finished_at", "image_ref")}
        for group in groups:
            group["example"] = examples.get(group["newest"])
        context = {**self.admin_site.each_context(request), "title": "Dead letters", "groups": groups,
                   "opts": self.model._meta, "can_discard": request.user.has_perm("queues.discard_task")}
        return TemplateResponse(request, "admin/queues/queueoverview/dead_letters.html", context)

    def dead_letters_discard_view(self, request):
        """Discards every dead letter of one error class (``?error_class=``; empty: those without a class), after a
        confirmation with the count. More than INLINE_LIMIT run in the background."""
        if not request.user.has_perm("queues.discard_task"):
            raise PermissionDenied
        error_class = request.GET.get("error_class", "")
        back = reverse("admin:queues_queueoverview_dead_letters")
        selected = CaptionTask.objects.filter(status=TaskStatus.FAILED, last_error_class=error_class)
        count = selected.count()
        shown = error_class or "(none)"
        if request.method == "POST":
            try:
                if count > INLINE_LIMIT:
                    operation = bulk_operation_start(kind=BulkOperation.Kind.DISCARD, matching=selected,
                                                     params={"error_class": error_class}, user=request.user,
                                                     address=client_address(request))
                    url = reverse("admin:queues_bulkoperation_change", args=[operation.pk])
                    messages.info(request, format_html(
                        'Discarding {} dead letters of {} runs in the background: <a href="{}">follow its '
                        'progress</a>.', operation.total, shown, url))
                else:
                    result = tasks_discard(task_ids=list(selected.values_list("pk", flat=True)), user=request.user,
                                           address=client_address(request), detail={"error_class": error_class})
                    (messages.success if result.changed else messages.warning)(request, result.describe())
            except BrokerUnavailable:
                messages.error(request, "Redis is unreachable: the dead letters could not leave the failed-job "
                                        "registries, so none was discarded. Try again when Redis answers.")
            return HttpResponseRedirect(back)
        background = (f" There are more than {INLINE_LIMIT}: they are discarded in the background (progress under "
                      "Bulk operations).") if count > INLINE_LIMIT else ""
        question = (f"Discard the {count} dead letter(s) of error class {shown}? They leave the failed-job registries "
                    "and the dead-letter counts (so the dead-letter alert stops counting them), and stay in the task "
                    f"history as discarded until the cleanup; a discarded task can still be requeued.{background}")
        return confirmation(request, self, title=f"Discard dead letters of {shown}", question=question,
                            action_label="Discard", cancel_url=back, danger=True)

    def queue_action_view(self, request, queue_name, action):
        if action not in ("pause", "resume", "empty") or queue_name not in broker.QUEUE_NAMES:
            raise PermissionDenied("Unknown queue or action")
        if not request.user.has_perm("queues.empty_queue" if action == "empty" else "queues.pause_queue"):
            raise PermissionDenied
        back = reverse("admin:queues_queueoverview_changelist")
        error = ""
        if request.method == "POST":
            try:
                if action == "empty":
                    outcome = queue_empty(queue_name=queue_name, confirm=request.POST.get("confirm_name", ""),
                                          user=request.user, address=client_address(request))
                    if isinstance(outcome, BulkOperation):
                        url = reverse("admin:queues_bulkoperation_change", args=[outcome.pk])
                        messages.info(request, format_html(
                            'Emptying queue {} ({} queued tasks) runs in the background: its tasks are cancelled '
                            'first, then its jobs are removed. <a href="{}">Follow its progress</a>.',
                            queue_name, outcome.total, url))
                    else:
                        messages.success(request, f"Queue {queue_name} emptied: {outcome.describe()}")
                else:
                    queue_set_paused(queue_name=queue_name, paused=action == "pause", user=request.user,
                                     address=client_address(request))
                    messages.success(request, f"Queue {queue_name} {'paused' if action == 'pause' else 'resumed'}.")
                return HttpResponseRedirect(back)
            except ValueError as invalid:
                error = str(invalid)
            except BrokerUnavailable:
                messages.error(request, "Redis is unreachable, so the background operation could not start. "
                                        "Nothing was changed.")
                return HttpResponseRedirect(back)
        waiting = CaptionTask.objects.filter(status=TaskStatus.QUEUED, priority=queue_name).count()
        background = (f" There are more than {INLINE_LIMIT}: they are cancelled in the background (progress under "
                      "Bulk operations), and the jobs are removed once all are cancelled.") \
            if waiting > INLINE_LIMIT else ""
        question = {
            "pause": f"Pause queue {queue_name}? Its {waiting} queued task(s) stay queued and are not dispatched "
                     "until it is resumed.",
            "resume": f"Resume queue {queue_name}? Workers take its {waiting} queued task(s) again.",
            "empty": f"Empty queue {queue_name}? Its {waiting} queued task(s) are cancelled and their jobs "
                     f"removed.{background} Type the queue's name to confirm.",
        }[action]
        field = {"name": "confirm_name", "label": "Queue name", "value": "", "type": "text"} \
            if action == "empty" else None
        return confirmation(request, self, title=f"{action.capitalize()} queue {queue_name}", question=question,
                            action_label=action.capitalize(), cancel_url=back, field=field, error=error,
                            danger=action == "empty")

    def maintenance_view(self, request):
        if not request.user.has_perm("queues.pause_queue"):
            raise PermissionDenied
        back = reverse("admin:queues_queueoverview_changelist")
        if request.method == "POST":
            cleaned = queues_maintenance(user=request.user, address=client_address(request))
            messages.success(request, f"Registry maintenance done: removed {sum(cleaned.values())} expired "
                                      "entries.")
            return HttpResponseRedirect(back)
        return confirmation(request, self, title="Queue maintenance", action_label="Run maintenance",
                            question="Run rq's registry cleanup on every queue? Expired entries of the running, "
                                     "finished, failed and scheduled registries are removed (reading pages never "
                                     "does this).", cancel_url=back)


@admin.register(BulkOperation)
class BulkOperationAdmin(ReadOnlyAdmin):
    list_display = ["id", "kind", "state", "progress", "total", "changed", "refused", "user", "created_at",
                    "finished_at"]
    list_filter = ["kind", "state"]
    readonly_fields = ["kind", "state", "progress", "total", "processed", "changed", "refused", "message", "params",
                       "acts_on", "user", "address", "created_at", "finished_at", "runs", "worker_name",
                       "heartbeat_at", "checkpoint"]
    fields = readonly_fields

    @admin.display(description="acts on")
    def acts_on(self, operation):
        if operation.selection is None:
            return f"{operation.total} selected task(s)"
        return format_html("every task matching this filter (evaluated as it runs): <code>{}</code>",
                           json.dumps(operation.selection))

    @admin.display(description="progress")
    def progress(self, operation):
        return format_html('<progress max="100" value="{}"></progress> {}%', operation.percent, operation.percent)
