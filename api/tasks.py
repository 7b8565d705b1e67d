"""Tasks over HTTP: submit one or many, read one with its timeline, list with the admin's filters, and the
operators' actions (requeue, cancel, change priority, discard a dead letter). The same services as the admin."""

from datetime import datetime

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.http import HttpResponse
from ninja import Field, Path, Query, Router, Schema, Status

from api.access import needs
from api.fields import Moment
from api.errors import ApiError, conflict, documented, not_found
from api.pages import DEFAULT, MOST, page
from portal.admin_pages import client_address
from queues.audit import audit
from queues.models import CaptionTask, Dispatch, Priority, TaskStatus
from queues.operations.services import (
    WHY_NOT,
    tasks_cancel,
    tasks_change_priority,
    tasks_discard,
    tasks_requeue,
)
from queues.services import TaskSpec, task_submit_or_find, tasks_submit_many

router = Router(tags=["tasks"])

BATCH_MAX = 1000
ID = Path(..., ge=1, le=2 ** 63 - 1, description="The task's id.")


class TaskIn(Schema):
    image_ref: str = Field(..., min_length=1, max_length=2048,
                           description="An http(s) URL of the image, or a path under the media root.")
    priority: Priority = Field(Priority.NORMAL, description="The queue the task waits in.")
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=200,
        description="A key of the caller's: a second submission with it returns the first task (200), unchanged.")


class BatchIn(Schema):
    tasks: list[TaskIn] = Field(..., min_length=1, max_length=BATCH_MAX)


class TaskOut(Schema):
    id: int
    status: TaskStatus
    waiting_to_retry: bool = Field(description="Failed an attempt and is due to run again.")
    held: bool = Field(description="Submitted while submission was paused: runs once it resumes.")
    priority: Priority
    dispatch: Dispatch = Field(description="The system that runs it: RQ, the database poller, or held.")
    image_ref: str
    idempotency_key: str | None
    attempts: int
    caption: str
    last_error_class: str
    last_error_message: str
    worker_name: str
    correlation_id: str
    created_at: datetime
    published_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @staticmethod
    def resolve_held(task) -> bool:
        return task.dispatch == Dispatch.HELD


class TaskEventOut(Schema):
    at: datetime
    kind: str
    attempt: int
    started_at: datetime | None
    worker_name: str
    duration_ms: int | None
    error_class: str
    error_message: str
    traceback: str
    detail: str
    actor: str | None = Field(description="The user who did it (an operator's action), or null.")
    correlation_id: str

    @staticmethod
    def resolve_actor(event) -> str | None:
        return event.actor.username if event.actor_id else None


TIMELINE_MOST = 300


class TaskDetailOut(TaskOut):
    timeline: list[TaskEventOut] = Field(description=f"The newest {TIMELINE_MOST} events, oldest first.")

    @staticmethod
    def resolve_timeline(task) -> list:
        # A task requeued over and over has no bound on its events; the answer keeps the newest, as an alert's does.
        return list(task.events.select_related("actor").order_by("-at", "-id")[:TIMELINE_MOST])[::-1]


class BatchOut(Schema):
    created: list[int] = Field(description="The new tasks' ids, in the order submitted.")
    existing: list[int] = Field(description="The tasks of items whose idempotency key was known already, or repeated "
                                            "an earlier item's (not submitted again).")
    held: bool = Field(description="Submission is paused: the new tasks wait until it resumes.")


class TaskPage(Schema):
    results: list[TaskOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last one.")


class TaskFilters(Schema):
    status: TaskStatus | None = None
    priority: Priority | None = None
    dispatch: Dispatch | None = None
    error_class: str | None = Field(None, max_length=200, description="The last error's class (dead letters).")
    worker: str | None = Field(None, max_length=200, description="The worker of the latest attempt.")
    created_after: Moment | None = None
    created_before: Moment | None = None
    finished_after: Moment | None = None
    finished_before: Moment | None = None
    q: str | None = Field(None, max_length=500, description="The admin's search: a task id, a correlation id, or "
                                                             "words of the image reference, error or key.")
    cursor: str | None = Field(None, max_length=40, description="next_cursor of the previous page.")
    limit: int = Field(DEFAULT, ge=1, le=MOST)


class PriorityIn(Schema):
    priority: Priority


def _task(task_id: int) -> CaptionTask:
    task = CaptionTask.objects.filter(pk=task_id).first()
    if task is None:
        raise not_found(f"task {task_id}")
    return task


def _submission_errors(error: DjangoValidationError, prefix: str = "") -> ApiError:
    """The service's field-named refusal as the API names the field: ``image_ref``, or ``tasks[3].image_ref`` for
    its ``item 3: image_ref``."""
    field, messages = next(iter(error.message_dict.items()))
    if field.startswith("item "):
        index, _, name = field[5:].partition(": ")
        field = f"tasks[{index}].{name}"
    field = prefix + field
    return ApiError(400, f"{field}: {' '.join(messages)}", field=field)


@router.post("/tasks", response={200: TaskOut, 201: TaskOut, **documented()}, operation_id="task_submit",
             summary="Submit a task")
@needs("queues.add_captiontask")
def submit(request, response: HttpResponse, payload: TaskIn):
    """A new caption task, saved, then queued. While submission is paused it is accepted and held (``held``). An
    idempotency key already used answers 200 with the first task, whatever the other fields say."""
    try:
        with transaction.atomic():  # the task and its audit entry together; the job is queued after the commit
            task, created = task_submit_or_find(image_ref=payload.image_ref, priority=payload.priority,
                                                idempotency_key=payload.idempotency_key)
            if created:
                audit(user=request.auth.user, action="task_submit", target=f"task {task.pk}", count=1,
                      address=client_address(request))
    except DjangoValidationError as error:
        raise _submission_errors(error) from None
    if not created:
        return task
    response["Location"] = f"/api/v1/tasks/{task.pk}"
    return Status(201, task)


@router.post("/tasks/batch", response={200: BatchOut, 201: BatchOut, **documented()}, operation_id="tasks_submit_many",
             summary="Submit many tasks")
@needs("queues.add_captiontask")
def submit_many(request, payload: BatchIn):
    """Up to 1000 tasks in one request. Every item is checked before anything is written: one bad item refuses the
    whole batch (400, naming ``tasks[i].field``) and nothing is saved. An item whose idempotency key is known (or
    repeats an earlier item's) is not submitted again: its task's id is in ``existing``."""
    try:
        with transaction.atomic():
            result = tasks_submit_many(specs=[TaskSpec(item.image_ref, item.priority, item.idempotency_key)
                                              for item in payload.tasks])
            if result.created:
                audit(user=request.auth.user, action="tasks_submit", target=f"{len(result.created)} task(s)",
                      count=len(result.created), detail={"first": result.created[0], "last": result.created[-1]},
                      address=client_address(request))
    except DjangoValidationError as error:
        raise _submission_errors(error) from None
    held = bool(result.created) and CaptionTask.objects.filter(pk=result.created[0],
                                                               dispatch=Dispatch.HELD).exists()
    # 201 when anything was created; 200 when every item's idempotency key was known (as for one task).
    return Status(201 if result.created else 200,
                  {"created": result.created, "existing": result.existing, "held": held})


@router.get("/tasks", response={200: TaskPage, **documented()}, operation_id="tasks_list", summary="List tasks")
@needs("queues.view_captiontask")
def list_tasks(request, filters: Query[TaskFilters]):
    """Newest first, ``limit`` at a time; ``next_cursor`` fetches the next page (stable while tasks are added)."""
    tasks = CaptionTask.objects.all()
    exact = {"status": filters.status, "priority": filters.priority, "dispatch": filters.dispatch,
             "last_error_class": filters.error_class, "worker_name": filters.worker,
             "created_at__gte": filters.created_after, "created_at__lt": filters.created_before,
             "finished_at__gte": filters.finished_after, "finished_at__lt": filters.finished_before}
    tasks = tasks.filter(**{name: value for name, value in exact.items() if value is not None})
    if filters.q:
        tasks = tasks.search(filters.q)
    return page(tasks, filters.cursor, filters.limit)


@router.get("/tasks/{task_id}", response={200: TaskDetailOut, **documented(404)}, operation_id="task_get",
            summary="A task with its timeline")
@needs("queues.view_captiontask")
def get_task(request, task_id: int = ID):
    """Status, attempts, caption or error, and the timeline: every attempt (worker, duration, error) and every
    operator's action."""
    return _task(task_id)


def _act(request, task_id: int, service, action: str, **params):
    task = _task(task_id)
    result = service(task_ids=[task.pk], user=request.auth.user, address=client_address(request), **params)
    if result.changed:
        return _task(task_id)
    if result.pinned:
        raise conflict(f"task {task_id} is left unchanged: {result.pinned_reason}")
    task = _task(task_id)  # as it is now (a 404 if the cleanup took it meanwhile)
    raise conflict(f"task {task_id} is {task.status.lower()}: {WHY_NOT[action]}")


@router.post("/tasks/{task_id}/requeue", response={200: TaskOut, **documented(404, 409)},
             operation_id="task_requeue", summary="Requeue a failed, discarded or cancelled task")
@needs("queues.requeue_task")
def requeue(request, task_id: int = ID):
    """Runs the task again from its first attempt."""
    return _act(request, task_id, tasks_requeue, "requeue")


@router.post("/tasks/{task_id}/cancel", response={200: TaskOut, **documented(404, 409)}, operation_id="task_cancel",
             summary="Cancel a queued task")
@needs("queues.cancel_task")
def cancel(request, task_id: int = ID):
    return _act(request, task_id, tasks_cancel, "cancel")


@router.post("/tasks/{task_id}/priority", response={200: TaskOut, **documented(404, 409)},
             operation_id="task_change_priority", summary="Move a queued task to another priority")
@needs("queues.change_task_priority")
def change_priority(request, payload: PriorityIn, task_id: int = ID):
    """A queued task that has that priority already is answered as it is (200), nothing changed."""
    task = _task(task_id)
    if task.status == TaskStatus.QUEUED and task.priority == payload.priority:
        return task
    return _act(request, task_id, tasks_change_priority, "priority", priority=payload.priority)


@router.post("/tasks/{task_id}/discard", response={200: TaskOut, **documented(404, 409)},
             operation_id="task_discard", summary="Discard a dead letter")
@needs("queues.discard_task")
def discard(request, task_id: int = ID):
    """A failed task leaves the failed-job registries and the dead-letter counts; it stays in the history
    (``DISCARDED``) and can still be requeued."""
    return _act(request, task_id, tasks_discard, "discard")
