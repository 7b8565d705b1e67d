"""Notification channels: the one place that talks to email, Slack, webhooks and PagerDuty.

monitoring.alerts.notify builds a ``Message`` (plain data: subject, text, the group's alerts, links) and calls
``transport_for(channel.kind, channel.config).send(message, timeout=...)`` once per delivery attempt, recording one
DeliveryAttempt row per call with what came back. The channel's admin form (NotificationChannelForm) shows
``config_errors``. Nothing else in the project imports the outside systems' protocols.

The contract of ``send``:

- It returns a ``Delivery`` (HTTP status, a short detail) when the outside system accepted the message.
- It raises ``TransportError`` for every network, HTTP or configuration problem, and nothing else:
  ``permanent=True`` when sending again cannot succeed by itself (a refused recipient, a revoked or unknown Slack
  webhook, an invalid PagerDuty event, a wrong URL that redirects, a config edited into something invalid), so the
  caller stops retrying and counts the failure against the channel; ``permanent=False`` for what passes (a
  timeout, a refused or dropped connection, HTTP 408, 429 and 5xx, an SMTP 4xx reply), so the caller retries
  with backoff. The message names the channel kind and what happened, and never a URL (Slack's and many webhooks'
  URLs are secrets). An answer's text (at most 200 characters: "Slack answered 404: channel_not_found") is quoted
  only from Slack's and PagerDuty's own hosts; any other host gets its status code alone, as it may be an internal
  service whose answers Support should not read.
- ``timeout`` bounds the whole send (deadline.py: the connections a send opened are shut when it runs out, so a
  server that trickles its answer cannot hold it longer), also when PagerDuty gets one event per alert. Email uses
  the smaller of it and EMAIL_TIMEOUT.
- Sending the same message twice is harmless for PagerDuty (deduplicated by fingerprint) and shows twice in the
  other channels: the caller retries only failed attempts.

HTTP goes through urllib (monitoring/alerts/transports/http.py) with the User-Agent "rq-ops-portal", honouring proxies
from the environment and following no redirects. One module per kind: email.py, slack.py, webhook.py, pagerduty.py.
"""

from __future__ import annotations

from monitoring.alerts.transports.base import Delivery, Message, Transport, TransportError
from monitoring.alerts.transports.email import EmailTransport
from monitoring.alerts.transports.pagerduty import PagerDutyTransport
from monitoring.alerts.transports.slack import SlackTransport
from monitoring.alerts.transports.webhook import WebhookTransport

__all__ = ["TRANSPORTS", "Delivery", "Message", "Transport", "TransportError", "transport_for"]

TRANSPORTS: dict[str, type[Transport]] = {
    transport.kind: transport
    for transport in (EmailTransport, SlackTransport, WebhookTransport, PagerDutyTransport)
}


def transport_for(kind: str, config: dict) -> Transport:
    """The transport of a channel kind, set up with the channel's config. Raises ValueError for an unknown kind."""
    try:
        transport = TRANSPORTS[kind]
    except KeyError:
        raise ValueError(f"unknown notification channel kind {kind!r}; choose one of {', '.join(TRANSPORTS)}") from None
    return transport(config)
