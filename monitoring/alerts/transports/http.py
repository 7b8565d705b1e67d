"""POSTing JSON to Slack, webhooks and PagerDuty with urllib, turning every failure into a TransportError.

Destinations: a host that resolves to a loopback, private, link-local or otherwise internal address is refused
unless NOTIFY_ALLOW_PRIVATE is set, and the connection goes to the very addresses that were checked (one lookup, no
second one a DNS answer could change). Where the environment names a proxy for the URL (HTTPS_PROXY, NO_PROXY:
Slack and PagerDuty are often reached so) the proxy connects, after the same check of the host's addresses.
Errors and details are shown to Support, so an answer is quoted only when it comes from Slack's or PagerDuty's own
hosts (``QUOTED_HOSTS``, ``QUOTED_DOMAINS``: short, known answers such as "channel_not_found"); from any other host,
a webhook's or a "Slack" channel aimed at an internal service, only its status is given.
A send ends within its timeout, also when the receiver trickles its answer (monitoring.alerts.transports.deadline).
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from monitoring.alerts.transports.base import TransportError, one_line
from monitoring.alerts.transports.deadline import Deadline, watch_socket
from portal.destinations import NotPublic, checked_handlers, resolve_checked

USER_AGENT = "rq-ops-portal"
MAX_ANSWER_BYTES = 64 * 1024  # an answer is read for its status and first words only
# The hosts whose answers may be quoted: Slack's incoming webhooks and PagerDuty's Events API (events.pagerduty.com,
# events.eu.pagerduty.com).
QUOTED_HOSTS = ("hooks.slack.com",)
QUOTED_DOMAINS = (".pagerduty.com",)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # urllib would follow a 301/302 of a POST as a GET without the body, and report the redirect target's answer
    # as a success. A notification URL that redirects is a wrong URL: the 3xx reaches post_json as an error.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def checked_addresses(host: str, port: int) -> list[tuple]:
    """The host's TCP addresses, refused (permanently: the channel must change) if any is not public while
    NOTIFY_ALLOW_PRIVATE is off."""
    from django.conf import settings

    try:
        return resolve_checked(host, port, allow_private=settings.NOTIFY_ALLOW_PRIVATE)
    except socket.gaierror as error:
        raise TransportError(f"cannot resolve {host}: {error}", permanent=False) from error
    except NotPublic as refused:
        raise TransportError(f"refusing to send to {host}: it resolves to the non-public address {refused.address} "
                             f"(set NOTIFY_ALLOW_PRIVATE=true to allow internal receivers)", permanent=True) from None


_CheckedHTTPHandler, _CheckedHTTPSHandler = checked_handlers(checked_addresses, watch=watch_socket)


class _WatchedHTTPConnection(http.client.HTTPConnection):
    """A connection to a proxy, shut down when its send's deadline passes."""

    def connect(self):
        super().connect()
        watch_socket(self.sock)


class _WatchedHTTPSConnection(http.client.HTTPSConnection):
    def connect(self):
        super().connect()
        watch_socket(self.sock)


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_WatchedHTTPConnection, req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_WatchedHTTPSConnection, req, context=self._context)


# Direct: to the checked addresses, never through a proxy. Proxied: where the environment names a proxy for the URL.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}), _CheckedHTTPHandler, _CheckedHTTPSHandler,
                                      _NoRedirects)
_proxied = urllib.request.build_opener(_WatchedHTTPHandler, _WatchedHTTPSHandler, _NoRedirects)


def _opener_for(url: str):
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    if parts.scheme in proxies and not urllib.request.proxy_bypass(parts.hostname or ""):
        checked_addresses(parts.hostname or "", port)  # the proxy connects; the host is checked all the same
        return _proxied
    return _direct


def answer_may_be_quoted(url: str) -> bool:
    """Whether the URL's host is Slack's or PagerDuty's, whose answers are short and known."""
    host = (urlsplit(url).hostname or "").rstrip(".")
    return host in QUOTED_HOSTS or host.endswith(QUOTED_DOMAINS)


def is_transient_status(status: int) -> bool:
    """408, 429 and 5xx are worth retrying; any other non-2xx answer will not change by itself."""
    return status >= 500 or status in (408, 429)


def json_body(payload: dict) -> bytes:
    """The payload as strict JSON: NaN and infinite values (a Prometheus value can be NaN) become null, which
    every consumer parses; anything not JSON-native (a stray datetime) becomes its string."""

    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(payload), default=str, allow_nan=False).encode()


def post_json(url: str, payload: dict, *, service: str, timeout: float,
              headers: dict[str, str] | None = None, quote_answer: bool = True) -> tuple[int, str]:
    """POSTs ``payload`` as JSON within ``timeout`` seconds in all. Returns the status and the answer's text for a 2xx
    answer (empty unless quoted); raises TransportError otherwise. ``service`` names the other side in error
    messages ("Slack", "webhook at example.com"); the URL itself is never put in a message, since Slack's and many
    webhooks' URLs are secrets. The answer appears in errors and details only with ``quote_answer`` (not for an
    arbitrary webhook) and when the URL's host is Slack's or PagerDuty's (``answer_may_be_quoted``): a Slack or
    PagerDuty channel may point anywhere, an internal service too."""
    if timeout <= 0:
        raise TransportError(f"no time left to send to {service}", permanent=False)
    quote_answer = quote_answer and answer_may_be_quoted(url)
    deadline = Deadline(timeout)
    try:
        with deadline:
            opener = _opener_for(url)
            request = urllib.request.Request(url, data=json_body(payload), method="POST", headers={
                "User-Agent": USER_AGENT, "Content-Type": "application/json", "Accept": "application/json, text/plain",
                **(headers or {})})
            try:
                with opener.open(request, timeout=timeout) as response:
                    try:
                        answer = response.read(MAX_ANSWER_BYTES)
                    except (OSError, http.client.HTTPException):
                        if not deadline.passed:
                            raise
                        answer = b""  # accepted; the rest of its answer (read for its first words) came too late
                    return response.status, _text(answer) if quote_answer else ""
            except urllib.error.HTTPError as error:
                raise _status_error(error, service, quote_answer=quote_answer) from error
    except (OSError, http.client.HTTPException, ValueError) as error:
        if deadline.passed:
            # Cut at the deadline, or a network wait ran out with it: whatever broke, the answer is late.
            raise TransportError(f"{service} did not answer within {timeout:.3g} s", permanent=False) from error
        raise _failure(error, service, timeout) from error


def _failure(error: Exception, service: str, timeout: float) -> TransportError:
    if isinstance(error, urllib.error.URLError):
        if isinstance(error.reason, (TimeoutError, socket.timeout)):
            return TransportError(f"{service} did not answer within {timeout:.3g} s", permanent=False)
        return TransportError(f"cannot reach {service}: {error.reason}", permanent=False)
    if isinstance(error, (TimeoutError, socket.timeout)):
        return TransportError(f"{service} did not answer within {timeout:.3g} s", permanent=False)
    if isinstance(error, http.client.HTTPException):
        return TransportError(f"{service} sent a broken HTTP answer: {type(error).__name__} {error}", permanent=False)
    if isinstance(error, ValueError):
        # urllib and http.client refuse a malformed URL or header value before sending: resending cannot help.
        return TransportError(f"cannot send to {service}: {error}", permanent=True)
    return TransportError(f"connection to {service} failed: {error}", permanent=False)


def _text(data: bytes) -> str:
    return one_line(data.decode("utf-8", errors="replace"))


def _status_error(error: urllib.error.HTTPError, service: str, *, quote_answer: bool = True) -> TransportError:
    try:
        body = _text(error.read(MAX_ANSWER_BYTES)) if quote_answer else ""
    except (OSError, http.client.HTTPException, AttributeError):
        body = ""
    message = f"{service} answered {error.code}"
    if 300 <= error.code < 400:
        message += f" (a redirect to {one_line(error.headers.get('Location', '?'), 100)}, not followed: fix the URL)"
    elif error.code == 429 and error.headers.get("Retry-After"):
        message += f" (Retry-After: {one_line(error.headers['Retry-After'], 20)})"
    if body:
        message += f": {body}"
    return TransportError(message, permanent=not is_transient_status(error.code), http_status=error.code)
