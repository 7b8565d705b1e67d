"""Loading a task's image: from the media root, or over http(s) with size, time and address limits.

Remote fetches refuse schemes other than http(s), and hosts that resolve to loopback, private, link-local or
otherwise internal addresses (a task submitter must not be able to make workers probe the internal network),
unless IMAGE_FETCH_ALLOW_PRIVATE is set. Redirects are followed only to addresses that pass the same checks. The
connection goes to the very addresses that were checked (one lookup per connection), and never through a proxy.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from django.conf import settings

from portal.destinations import NotPublic, checked_handlers, resolve_checked
from queues.errors import CaptionTimeout, PermanentCaptionError, TransientCaptionError
from queues import cancel

ALLOWED_SCHEMES = ("http", "https")
CHUNK = 64 * 1024


def is_remote(reference: str) -> bool:
    return "://" in reference


def media_path(reference: str) -> Path:
    """The file a media-root reference names; refuses paths that escape the media root."""
    root = Path(settings.MEDIA_ROOT).resolve()
    path = (root / reference).resolve()
    if root != path and root not in path.parents:
        raise PermanentCaptionError(f"image reference {reference!r} points outside the media root")
    return path


def check_url(url: str) -> None:
    """Refuses URLs a worker must not fetch. Raises PermanentCaptionError naming the reason.

    The host's addresses are checked here (an early, clear refusal) and again by the connection itself, which
    connects only to addresses it has just checked (portal.destinations.checked_handlers)."""
    parsed = urlparse(url)
    if parsed.scheme not in ALLOWED_SCHEMES:
        raise PermanentCaptionError(f"unsupported URL scheme {parsed.scheme!r}: only http and https are fetched")
    if not parsed.hostname:
        raise PermanentCaptionError(f"URL {url!r} has no host")
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        raise PermanentCaptionError(f"URL {url!r} has an invalid port") from None
    checked_addresses(parsed.hostname, port)


def checked_addresses(host: str, port: int) -> list[tuple]:
    """Resolves the host once and returns its addresses, refusing the host if any of them is not public."""
    try:
        return resolve_checked(host, port, allow_private=settings.IMAGE_FETCH_ALLOW_PRIVATE)
    except socket.gaierror as error:
        raise TransientCaptionError(f"cannot resolve {host}: {error}") from error
    except NotPublic as refused:
        raise PermanentCaptionError(f"refusing to fetch {host}: it resolves to the non-public address "
                                    f"{refused.address} (set IMAGE_FETCH_ALLOW_PRIVATE=true to allow internal hosts)"
                                    ) from None


class StoppableHTTPConnection(http.client.HTTPConnection):
    """A plain connection (to a configured server such as Ollama) that a stop of its caption slot shuts down."""

    def connect(self):
        super().connect()
        cancel.watch_socket(self.sock)


class StoppableHTTPSConnection(http.client.HTTPSConnection):
    def connect(self):
        super().connect()
        cancel.watch_socket(self.sock)


class StoppableHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(StoppableHTTPConnection, req)


class StoppableHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(StoppableHTTPSConnection, req, context=self._context)


# Connections go only to the addresses the check just passed; a stop of the caption slot shuts them down.
_CheckedHTTPHandler, _CheckedHTTPSHandler = checked_handlers(checked_addresses, watch=cancel.watch_socket)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# No proxy handler: through a proxy the proxy would resolve the host, and the address check would mean nothing.
_opener = urllib.request.OpenerDirector()
for _handler in (urllib.request.UnknownHandler(), _CheckedHTTPHandler(),
                 _CheckedHTTPSHandler(context=ssl.create_default_context()), urllib.request.HTTPDefaultErrorHandler(),
                 _CheckedRedirects(), urllib.request.HTTPErrorProcessor()):
    _opener.add_handler(_handler)


def classify_http_status(status: int, what: str) -> Exception:
    message = f"{what} answered HTTP {status}"
    if 300 <= status < 400:
        message += " with a redirect that is not followed (only http(s) redirects are)"
    if status >= 500 or status in (408, 425, 429):
        return TransientCaptionError(message)
    return PermanentCaptionError(message)


def fetch_image(reference: str, *, timeout: float, max_bytes: int | None = None) -> bytes:
    """Returns the image's bytes. Raises PermanentCaptionError or TransientCaptionError."""
    max_bytes = max_bytes or settings.IMAGE_MAX_BYTES
    if not is_remote(reference):
        path = media_path(reference)
        if not path.is_file():
            raise PermanentCaptionError(f"image file {reference!r} does not exist under the media root")
        size = path.stat().st_size
        if size > max_bytes:
            raise PermanentCaptionError(f"image is {size} bytes, larger than the limit of {max_bytes} bytes")
        return path.read_bytes()

    check_url(reference)
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(reference, headers={"User-Agent": "rq-ops-portal/1.0", "Accept": "image/*"})
    try:
        with _opener.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise PermanentCaptionError(
                    f"image is {declared} bytes, larger than the limit of {max_bytes} bytes")
            chunks, total = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise CaptionTimeout(f"downloading the image took longer than {timeout:g} s")
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise PermanentCaptionError(f"image is larger than the limit of {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as error:
        raise classify_http_status(error.code, "the image server") from error
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, (PermanentCaptionError, TransientCaptionError)):
            raise reason from error
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise CaptionTimeout(f"the image server did not answer within {timeout:g} s") from error
        raise TransientCaptionError(f"cannot reach the image server: {reason}") from error
    except (TimeoutError, socket.timeout) as error:
        raise CaptionTimeout(f"the image server did not answer within {timeout:g} s") from error
    except OSError as error:
        raise TransientCaptionError(f"connection to the image server failed: {error}") from error
