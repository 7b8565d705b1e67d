"""Slack incoming webhooks: one message with Block Kit blocks, ``text`` as the notification's fallback."""

from __future__ import annotations

from monitoring.alerts.transports.base import Delivery, Message, Transport, one_line, url_error
from monitoring.alerts.transports.http import post_json

# Slack refuses a message of more than 50 blocks (invalid_blocks). A header, the alerts, an "and N more" line and
# the context stay well below it.
MAX_ALERT_SECTIONS = 20
MAX_SECTION_CHARS = 3000  # Slack's limit for a section's text
MAX_HEADER_CHARS = 150  # Slack's limit for a header's text
MAX_FALLBACK_CHARS = 4000

MARKS = {"critical": ":red_circle:", "error": ":large_orange_circle:", "warning": ":warning:",
         "info": ":information_source:"}


class SlackTransport(Transport):
    kind = "slack"
    label = "Slack"
    fields = ("url",)

    @classmethod
    def field_errors(cls, config: dict) -> dict[str, str]:
        problem = url_error(config.get("url"))
        return {"url": problem} if problem else {}

    def deliver(self, message: Message, *, timeout: float) -> Delivery:
        status, answer = post_json(self.config["url"], slack_payload(message), service="Slack", timeout=timeout)
        return Delivery(http_status=status, detail=answer or "ok")


def slack_payload(message: Message) -> dict:
    header = one_line(message.subject, MAX_HEADER_CHARS) or "RQ Ops Portal"  # Slack refuses an empty header
    blocks = [{"type": "header", "text": {"type": "plain_text", "text": header}}]
    for alert in message.alerts[:MAX_ALERT_SECTIONS]:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _alert_text(alert)}})
    hidden = len(message.alerts) - MAX_ALERT_SECTIONS
    if hidden > 0:
        plural = "s" if hidden > 1 else ""
        more = f"…and {hidden} more alert{plural}: see {_link(message.portal_url, 'the alert history')}."
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": more}})
    context = f"{_link(message.portal_url, 'Alert history in the RQ Ops Portal')} · group `{_code(message.group_key)}`"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _cut(context, MAX_SECTION_CHARS)}]})
    return {"text": _cut(f"{message.subject}\n{message.text}", MAX_FALLBACK_CHARS), "blocks": blocks}


def _alert_text(alert: dict) -> str:
    severity, state = alert.get("severity") or "", alert.get("state") or ""
    mark = ":white_check_mark:" if state == "resolved" else MARKS.get(severity, ":grey_question:")
    lines = [f"{mark} *{_escape(alert.get('name') or '?')}* · {_escape(severity)} · {_escape(state)}"]
    if alert.get("summary"):
        lines.append(_escape(alert["summary"]))
    labels = alert.get("labels") or {}
    if labels:
        lines.append(" ".join(f"`{_code(key)}={_code(value)}`" for key, value in sorted(labels.items())))
    links = [_link(alert["url"], "Open in the portal")] if alert.get("url") else []
    if alert.get("runbook_url"):
        links.append(_link(alert["runbook_url"], "Runbook"))
    if links:
        lines.append(" · ".join(links))
    return _cut("\n".join(lines), MAX_SECTION_CHARS)


def _escape(text) -> str:
    """Slack's mrkdwn treats &, < and > as markup (api.slack.com/reference/surfaces/formatting); the rest passes."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _code(text) -> str:
    return _escape(text).replace("`", "'")  # a backtick cannot be escaped inside `code`


def _link(url: str, text: str) -> str:
    return f"<{_escape(url).replace('|', '%7C')}|{_escape(text)}>" if url else _escape(text)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"
