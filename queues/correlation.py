"""Correlation ids: one id follows a request into the tasks it submits, their jobs, the workers' log lines, the
attempt rows (TaskEvent) and audit entries, so operators can find everything one request caused.

The id of the work in hand lives in a context variable: ``portal.middleware.CorrelationIdMiddleware`` sets it for
each HTTP request (from a sane ``X-Correlation-ID`` header, or a new one) and echoes it; the worker binds the task's
id (from its job's meta, then from the claimed row) around each job, with the task, worker and queue, for the log
lines. Rows written meanwhile take it as their default (``current``). ``LogContextFilter`` puts these fields on every
log record: the JSON log format (``LOG_FORMAT=json``) prints them, the plain one adds the id when there is one.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import uuid

HEADER = "X-Correlation-ID"
# A token a caller may choose (a request id from a proxy, a trace id): letters, digits and ._:- , at most 64.
SANE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")

_correlation_id: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="")
_log_fields: contextvars.ContextVar[dict] = contextvars.ContextVar("log_fields", default={})
FIELDS = ("task_id", "worker", "queue")


def new_id() -> str:
    return uuid.uuid4().hex


def sane(value: str | None) -> str | None:
    """``value`` if a caller's id may be kept as it is, else None."""
    return value if value and SANE.fullmatch(value) else None


def current() -> str:
    """The correlation id of the work in hand ("" outside a request or task): the default of the rows that carry one."""
    return _correlation_id.get()


@contextlib.contextmanager
def bound(correlation_id: str | None = None, **fields):
    """Within: ``current()`` is ``correlation_id`` (kept if None) and log records carry ``fields`` (task_id, worker,
    queue)."""
    token = _correlation_id.set(correlation_id) if correlation_id is not None else None
    fields_token = _log_fields.set({**_log_fields.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _log_fields.reset(fields_token)
        if token is not None:
            _correlation_id.reset(token)


class LogContextFilter(logging.Filter):
    """Adds correlation_id, task_id, worker and queue to every record (None where unknown), and ``context``: the
    plain format's " [correlation_id]" suffix."""

    def filter(self, record: logging.LogRecord) -> bool:
        correlation_id = _correlation_id.get() or None
        fields = _log_fields.get()
        if getattr(record, "correlation_id", None) is None:
            record.correlation_id = correlation_id
        for name in FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, fields.get(name))
        record.context = f" [{record.correlation_id}]" if record.correlation_id else ""
        return True
