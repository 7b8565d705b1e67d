"""Submission over HTTP: its state, pause (with a reason and a length) and resume. The migration console's
services: new tasks are accepted and held while paused, and released to the mode's systems on resume."""

from datetime import datetime

from ninja import Field, Router, Schema

from api.access import needs
from api.errors import ApiError, documented
from migration import dispatch
from migration.admin import PAUSE_SUBMISSION
from migration.state import system_mode
from portal.admin_pages import client_address
from queues.models import CaptionTask, Dispatch, TaskStatus

router = Router(tags=["submission"])


class SubmissionOut(Schema):
    paused: bool
    reason: str = Field(description="Why it is paused (empty when open).")
    until: datetime | None = Field(description="When the pause ends by itself; null: until resumed.")
    held: int = Field(description="Tasks accepted while paused, waiting for the resume.")
    mode: str = Field(description="The dispatch mode: which systems run new tasks.")


class PauseIn(Schema):
    reason: str = Field(..., min_length=1, max_length=300, description="Shown in the admin and in health.")
    duration: str | None = Field(None, max_length=40, description='How long: 90s, 30m, 2h, 1d or "2 hours"; '
                                                                   "omitted: until resumed.")


class ResumeIn(Schema):
    reason: str = Field("", max_length=300)


class ResumeOut(SubmissionOut):
    released: int = Field(description="Held tasks sent on to the mode's systems.")


def _state() -> dict:
    row = system_mode()
    paused = row.paused_now()
    return {"paused": paused, "reason": row.paused_reason if paused else "",
            "until": row.paused_until if paused else None, "mode": row.mode,
            "held": CaptionTask.objects.filter(dispatch=Dispatch.HELD, status=TaskStatus.QUEUED).count()}


@router.get("/submission", response={200: SubmissionOut, **documented()}, operation_id="submission_get",
            summary="Whether submission is paused")
@needs("migration.view_systemmode")
def state(request):
    return _state()


@router.post("/submission/pause", response={200: SubmissionOut, **documented(409)}, operation_id="submission_pause",
             summary="Pause submission")
@needs(PAUSE_SUBMISSION)
def pause(request, payload: PauseIn):
    """New tasks are accepted and held until resumed, or until ``duration`` has passed. Refused (409) while a
    migration run holds the pause."""
    submission_paused(request, payload.reason, payload.duration)
    return _state()


def submission_paused(request, reason: str, duration: str | None):
    """Pauses submission as the token's user (the SystemMode row after it): a blank reason or a duration that does
    not parse is a 400 naming its field, a run that holds the pause a 409."""
    if not reason.strip():
        raise ApiError(400, "reason: say why submission is paused (it is shown in the admin and in health)",
                       field="reason")
    length = None
    if duration is not None:
        try:
            length = dispatch.duration_parse(duration)
        except ValueError as error:
            raise ApiError(400, f"duration: {error}", field="duration") from None
    return dispatch.submission_pause(reason=reason, user=request.auth.user, duration=length,
                                     address=client_address(request))


@router.post("/submission/resume", response={200: ResumeOut, **documented(409)}, operation_id="submission_resume",
             summary="Resume submission")
@needs(PAUSE_SUBMISSION)
def resume(request, payload: ResumeIn | None = None):
    """Submission opens again; the tasks held meanwhile go to the mode's systems."""
    reason = (payload.reason if payload else "") or "resumed by API"
    released = dispatch.submission_resume(user=request.auth.user, reason=reason, address=client_address(request))
    return {**_state(), "released": released}
