"""HTTP middleware of the portal."""

from django.http import JsonResponse
from django.utils.log import log_response

from portal.views import MACHINE_PREFIXES
from queues import correlation


class CorrelationIdMiddleware:
    """Gives every request a correlation id: the caller's ``X-Correlation-ID`` when it is a sane token (letters,
    digits and ``._:-``, at most 64), otherwise a new one. The id is ``request.correlation_id``, is current while the
    request is handled (tasks it submits and audit entries it writes take it) and comes back in the response's
    ``X-Correlation-ID`` header."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        correlation_id = correlation.sane(request.headers.get(correlation.HEADER)) or correlation.new_id()
        request.correlation_id = correlation_id
        with correlation.bound(correlation_id):
            response = self.get_response(request)
            if response.status_code >= 400:
                # Django logs 4xx/5xx answers after the middleware returns, where the id is no longer current;
                # logged here (the same line), the record carries it and Django does not log it again.
                log_response("%s: %s", response.reason_phrase, request.path, response=response, request=request)
        response[correlation.HEADER] = correlation_id
        return response


class MachineErrorsAsJsonMiddleware:
    """An error answer on a machine endpoint (``/api/``, ``/metrics``, the probes) that is not JSON becomes JSON:
    ``{"error": ..., "field": null}`` with the same status and headers (``Allow`` on a 405). The views answer JSON
    themselves; this covers what answers before them (a method the URL does not take, Django's CSRF refusal, a
    request too large to read)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if response.status_code < 400 or not request.path.startswith(MACHINE_PREFIXES) or \
                response.get("Content-Type", "").startswith("application/json") or response.streaming:
            return response
        if response.status_code == 405:
            message = f"{request.method} is not allowed on {request.path}; use {response.get('Allow', 'another')}"
        else:
            message = f"{response.status_code} {response.reason_phrase}".lower()
        answer = JsonResponse({"error": message, "field": None}, status=response.status_code)
        for name, value in response.items():
            if name.lower() not in ("content-type", "content-length"):
                answer[name] = value
        return answer
