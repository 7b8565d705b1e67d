"""A JSON webhook of the operator's own: the whole message, versioned, optionally with a bearer token."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from monitoring.alerts.transports.base import Delivery, Message, Transport, url_error
from monitoring.alerts.transports.http import post_json

HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)


class WebhookTransport(Transport):
    kind = "webhook"
    label = "Webhook"
    fields = ("url", "headers", "token")

    @classmethod
    def field_errors(cls, config: dict) -> dict[str, str]:
        errors = {}
        if problem := url_error(config.get("url")):
            errors["url"] = problem
        headers = config.get("headers") or {}
        if not isinstance(headers, dict):
            errors["headers"] = 'must be a JSON object of header names and values, e.g. {"X-Team": "ops"}'
        else:
            for name, value in headers.items():
                if not isinstance(name, str) or not HEADER_NAME.fullmatch(name):
                    errors["headers"] = f"{name!r} is not a valid header name"
                elif not isinstance(value, str) or "\r" in value or "\n" in value:
                    errors["headers"] = f"the value of {name} must be a string on one line"
                elif name.lower() == "authorization" and config.get("token"):
                    errors["headers"] = "give either a token or an Authorization header, not both"
        token = config.get("token")
        if token is not None and (not isinstance(token, str) or not token or any(c.isspace() for c in token)):
            errors["token"] = "must be a non-empty string without spaces (sent as 'Authorization: Bearer <token>')"
        return errors

    def deliver(self, message: Message, *, timeout: float) -> Delivery:
        headers = dict(self.config.get("headers") or {})
        if self.config.get("token"):
            headers["Authorization"] = f"Bearer {self.config['token']}"
        # The receiver's answer is not kept: any URL can be a webhook's, and the errors and details are shown to
        # Support (an internal service's answer could hold anything).
        status, _ = post_json(self.config["url"], webhook_payload(message), headers=headers, timeout=timeout,
                              service=f"webhook at {urlsplit(self.config['url']).hostname}", quote_answer=False)
        return Delivery(http_status=status, detail="ok")


def webhook_payload(message: Message) -> dict:
    """The body consumers parse. "version" changes only when a field changes meaning or goes away."""
    return {"version": "1", "kind": message.kind, "status": message.status, "group_key": message.group_key,
            "subject": message.subject, "text": message.text, "portal_url": message.portal_url,
            "alerts": message.alerts}
