"""gunicorn's settings for the portal: ``gunicorn -c python:portal.gunicorn_config portal.wsgi ...``.

Its own lines (start-up, workers, errors, the access log) come out in the portal's LOG_FORMAT (portal.logs), and
every access line carries the request's correlation id: in the JSON's ``correlation_id``, or at the end of the
plain line. Command-line options still apply on top (workers, bind, ``--access-logfile -``).
"""

from gunicorn import glogging

from portal.legacy_variables import log_not_read
from portal.logs import log_settings, server_logging
from queues import correlation

LOG_FORMAT, LOG_LEVEL = log_settings()  # gunicorn's master process logs before (and without) loading Django
loglevel = LOG_LEVEL.lower()
logconfig_dict = server_logging(LOG_FORMAT, LOG_LEVEL) if LOG_FORMAT == "json" else {}
access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(L)ss' + \
    ("" if LOG_FORMAT == "json" else " [%({x-correlation-id}o)s]")
logger_class = "portal.gunicorn_config.Logger"


def when_ready(server):
    log_not_read(server.log)  # the old system's variables that are set but not read, once per start


class Logger(glogging.Logger):
    """gunicorn's logger, with the response's X-Correlation-ID bound while it writes the access line."""

    def access(self, resp, req, environ, request_time):
        correlation_id = next((value for name, value in resp.headers if name.lower() == "x-correlation-id"), None)
        with correlation.bound(correlation_id):
            super().access(resp, req, environ, request_time)
