"""Log formats, in one place for every process: Django's LOGGING (portal.settings), gunicorn's own loggers
(portal.gunicorn_config), uvicorn's and daphne's (adopted in portal.asgi) and the start and stop lines of the
long-running commands.

``LOG_FORMAT=json`` gives one JSON object per line (python-json-logger): timestamp, level, logger, message,
correlation_id, task_id, worker and queue where known (queues.correlation.LogContextFilter). ``plain`` (the
default) gives text, with " [correlation id]" after the message when there is one.
"""

from __future__ import annotations

import logging

from pythonjsonlogger.core import RESERVED_ATTRS

def log_settings() -> tuple[str, str]:
    """LOG_FORMAT and LOG_LEVEL from the environment, checked (read by portal.settings, and by gunicorn's config,
    whose master process logs without loading Django)."""
    from portal.env import env_choice

    return (env_choice("LOG_FORMAT", "plain", ("plain", "json")),
            env_choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")))


JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(correlation_id)s %(task_id)s %(worker)s %(queue)s"
SERVER_LOGGERS = ("gunicorn.error", "gunicorn.access", "uvicorn", "uvicorn.error", "uvicorn.access", "daphne")


def logging_config(log_format: str, level: str, *, loggers: dict | None = None) -> dict:
    """A ``logging.config.dictConfig`` dict: everything through one console handler in ``log_format``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": "queues.correlation.LogContextFilter"}},
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s%(context)s"},
            "json": {"()": "pythonjsonlogger.json.JsonFormatter", "fmt": JSON_FIELDS,
                     "rename_fields": {"asctime": "timestamp", "levelname": "level", "name": "logger"},
                     # not fields: the plain format's suffix, and uvicorn's ANSI-coloured copy of the message
                     "reserved_attrs": [*RESERVED_ATTRS, "context", "color_message"]},
        },
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": log_format, "filters": ["context"]}},
        "root": {"handlers": ["console"], "level": level},
        "loggers": loggers or {},
    }


def server_logging(log_format: str, level: str = "INFO") -> dict:
    """gunicorn's ``logconfig_dict``: its error and access loggers through the portal's handler, so that with
    ``LOG_FORMAT=json`` its start-up, worker and access lines are JSON like the application's."""
    return logging_config(log_format, level, loggers={
        name: {"level": level, "handlers": ["console"], "propagate": False}
        for name in ("gunicorn.error", "gunicorn.access")})


def adopt_server_loggers(log_format: str) -> None:
    """With LOG_FORMAT=json, the ASGI server's loggers (configured by the server before it imports the portal)
    hand their records to the portal's handler instead of printing text of their own."""
    if log_format != "json":
        return
    for name in SERVER_LOGGERS:
        server_logger = logging.getLogger(name)
        for handler in list(server_logger.handlers):
            server_logger.removeHandler(handler)
        server_logger.propagate = True


def announce(command, logger: logging.Logger, message: str) -> None:
    """A long-running command's start and stop lines: on its stdout, or with LOG_FORMAT=json a log record like every
    other line the process writes (one JSON object per line, nothing else)."""
    from django.conf import settings

    if settings.LOG_FORMAT == "json":
        logger.info(message)
    else:
        command.stdout.write(message)
