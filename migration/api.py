"""The old system's maintenance paths (seed 001's runbook): POST /admin/maintenance/pause-task-submission with
``{"reason": ..., "duration": "2 hours"}`` and POST /admin/maintenance/resume-task-submission. The same services as
the migration console, with an API token whose user has ``migration.pause_submission`` (Operators and Admins); every
call is audited ``via`` the token's name. A run that holds the pause itself refuses both (409)."""

from django.core.exceptions import ValidationError
from django.http import JsonResponse

from migration import dispatch
from migration.admin import PAUSE_SUBMISSION
from portal.admin_pages import client_address
from queues.api import token_api


def _held_by_a_run(error: dispatch.RunInCharge) -> JsonResponse:
    return JsonResponse({"error": " ".join(error.messages)}, status=409)


@token_api(PAUSE_SUBMISSION, realm="maintenance")
def pause_task_submission(request, body, token):
    """New tasks are accepted and held until resumed, or until ``duration`` has passed."""
    reason, duration = body.get("reason"), body.get("duration")
    if not isinstance(reason, str) or not reason.strip():
        raise ValidationError({"reason": ["say why submission is paused (it is shown in the admin and in health)"]})
    length = None
    if duration is not None:
        if not isinstance(duration, str):
            raise ValidationError({"duration": ["must be a length such as \"2 hours\", 30m or 1d"]})
        try:
            length = dispatch.duration_parse(duration)
        except ValueError as error:
            raise ValidationError({"duration": [str(error)]}) from None
    try:
        row = dispatch.submission_pause(reason=reason, user=token.user, duration=length,
                                        address=client_address(request))
    except dispatch.RunInCharge as error:
        return _held_by_a_run(error)
    return JsonResponse({"submission_paused": True, "reason": row.paused_reason,
                         "until": row.paused_until.isoformat() if row.paused_until else None})


@token_api(PAUSE_SUBMISSION, realm="maintenance")
def resume_task_submission(request, body, token):
    """Submission opens again; the tasks held meanwhile go to the mode's systems."""
    try:
        released = dispatch.submission_resume(user=token.user, reason=str(body.get("reason") or "resumed by API"),
                                              address=client_address(request))
    except dispatch.RunInCharge as error:
        return _held_by_a_run(error)
    return JsonResponse({"submission_paused": False, "released": released})
