"""Every answer of the HTTP API that is not a success: ``{"error": "...", "field": "..."}`` as JSON, with the status
the OpenAPI description lists for the operation (400, 401, 403, 404, 405, 409, 413, 429, 503), never an HTML page.

The handlers are the NinjaAPI's: they see what a view, the token check or the request's parsing raised. Outages of
Redis or the database answer 503 with ``Retry-After`` (the driver's text goes to the log, not to the caller)."""

from __future__ import annotations

import json
import logging
import math

import redis
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DatabaseError, DataError
from django.http import Http404, JsonResponse
from ninja import Schema
from ninja.errors import AuthenticationError, HttpError, Throttled, ValidationError

from migration.dispatch import RunInCharge
from monitoring.alerts.actions import AlertError
from portal.body_limits import too_large_error
from queues.errors import BrokerUnavailable
from queues.fleet.services import FleetError

logger = logging.getLogger(__name__)

RETRY_AFTER_OUTAGE = 10


class ErrorOut(Schema):
    error: str
    field: str | None = None


class ApiError(Exception):
    """A refusal with its status; ``field`` names the input at fault (400) and ``headers`` go on the answer."""

    def __init__(self, status: int, message: str, *, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}


def not_found(what: str) -> ApiError:
    return ApiError(404, f"no such {what}")


def conflict(message: str) -> ApiError:
    return ApiError(409, message)


def answer(status: int, message: str, field: str | None = None, **headers) -> JsonResponse:
    response = JsonResponse({"error": message, "field": field}, status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def _location(parts) -> str:
    """Pydantic's error location as the caller wrote the field: ``tasks[3].image_ref``, ``priority``."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _validation(request, error: ValidationError) -> JsonResponse:
    """The first of pydantic's errors, field named; the request's source (body, query, path) left out."""
    first = error.errors[0] if error.errors else {}
    location = [part for part in first.get("loc", ()) if part not in ("body", "query", "path", "payload",
                                                                      "filters", "header")]
    if first.get("type") == "json_invalid" or not location and "body" in first.get("loc", ()):
        return answer(400, "the body must be a JSON object: " + first.get("msg", "it could not be parsed"))
    if "body" in first.get("loc", ()) and not _json_object(request):
        # A list or a number where an object belongs: pydantic would name a field it tried to read off it.
        return answer(400, "the body must be a JSON object")
    message = first.get("msg", "invalid input")
    return answer(400, f"{_location(location) or 'input'}: {message}", _location(location) or None)


def _json_object(request) -> bool:
    try:
        return isinstance(json.loads(request.body), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def _django_validation(request, error: DjangoValidationError) -> JsonResponse:
    if hasattr(error, "error_dict"):
        field, messages = next(iter(error.message_dict.items()))
        field = None if field == "__all__" else field
        return answer(400, f"{field}: {' '.join(messages)}" if field else " ".join(messages), field)
    return answer(400, " ".join(error.messages))


def _api_error(request, error: ApiError) -> JsonResponse:
    return answer(error.status, error.message, error.field, **error.headers)


def _http_error(request, error: HttpError) -> JsonResponse:
    if error.status_code == 400 and str(error) == "Cannot parse request body":
        return answer(400, "the body must be a JSON object (Content-Type: application/json)")
    return answer(error.status_code, str(error))


def _authentication(request, error: AuthenticationError) -> JsonResponse:
    return answer(401, "authentication required: 'Authorization: Bearer <API token>' (manage.py api_token create)",
                  WWW_Authenticate='Bearer realm="api"')


def _throttled(request, error: Throttled) -> JsonResponse:
    wait = max(1, math.ceil(error.wait or 1))
    return answer(429, f"too many requests for this token; try again in {wait} s", Retry_After=str(wait))


def _too_large(request, error: RequestDataTooBig) -> JsonResponse:
    return answer(413, too_large_error(settings.DATA_UPLOAD_MAX_MEMORY_SIZE))


def _refused(request, error: Exception) -> JsonResponse:
    """An alert action the alert's state refuses (already acknowledged, resolved, not shelved...)."""
    return answer(409, str(error))


def _held_by_a_run(request, error: RunInCharge) -> JsonResponse:
    """Pausing, resuming or setting the mode while a migration run does it itself."""
    return answer(409, " ".join(error.messages))


def _unknown_in_fleet(request, error: Exception) -> JsonResponse:
    """An unknown pool or worker (the fleet services' FleetError, as the older fleet calls answer it)."""
    return answer(404, str(error))


def _missing(request, error: Http404) -> JsonResponse:
    return answer(404, str(error) or "not found")


def _redis_down(request, error: Exception) -> JsonResponse:
    logger.warning("%s: Redis is unreachable", request.path, exc_info=True)
    return answer(503, "Redis is unreachable; try again shortly", Retry_After=str(RETRY_AFTER_OUTAGE))


# MySQL/MariaDB's refusals of a value rather than failures of the server: a string its column's character set
# cannot hold (1366), collations that cannot be compared (1267, 1270, 1271), a value too long or out of range.
REFUSED_VALUE_CODES = {1267, 1270, 1271, 1366, 1406, 1264}


def _database_down(request, error: DatabaseError) -> JsonResponse:
    code = error.args[0] if error.args and isinstance(error.args[0], int) else None
    if isinstance(error, DataError) or code in REFUSED_VALUE_CODES:
        logger.info("%s: the database refused a value: %s", request.path, error)
        return answer(400, "the database cannot store or compare a value given (its characters or its size)")
    logger.warning("%s: the database failed", request.path, exc_info=True)
    return answer(503, "the database is unreachable; try again shortly", Retry_After=str(RETRY_AFTER_OUTAGE))


def _unexpected(request, error: Exception) -> JsonResponse:
    logger.error("%s %s failed", request.method, request.path, exc_info=error)
    return answer(500, "internal error; the portal's log has the details")


def install(api) -> None:
    """The handlers on ``api``; the most specific class wins, as Django Ninja looks them up along the MRO."""
    api.add_exception_handler(ValidationError, _validation)
    api.add_exception_handler(DjangoValidationError, _django_validation)
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(Throttled, _throttled)
    api.add_exception_handler(AuthenticationError, _authentication)
    api.add_exception_handler(HttpError, _http_error)
    api.add_exception_handler(Http404, _missing)
    api.add_exception_handler(AlertError, _refused)
    api.add_exception_handler(FleetError, _unknown_in_fleet)
    api.add_exception_handler(RunInCharge, _held_by_a_run)
    api.add_exception_handler(RequestDataTooBig, _too_large)
    api.add_exception_handler(BrokerUnavailable, _redis_down)
    api.add_exception_handler(redis.exceptions.RedisError, _redis_down)
    api.add_exception_handler(DatabaseError, _database_down)
    api.add_exception_handler(Exception, _unexpected)


def documented(*codes: int) -> dict:
    """The error answers an operation documents, beside its success: every operation may answer 400 (bad input),
    401, 403, 413 (a body over the limit), 429 (this token's rate) and 503 (an outage)."""
    return {code: ErrorOut for code in sorted({400, 401, 403, 413, 429, 503, *codes})}
