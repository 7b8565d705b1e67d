"""What every transport shares: the message it is given, what it returns, the error it raises, the base class."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit


class TransportError(Exception):
    """A send that did not reach the outside system.

    ``permanent``: sending the same message again will fail the same way (a refused address, a revoked webhook, an
    invalid event), so the caller does not retry and counts it against the channel. Otherwise the failure is
    transient (a timeout, a refused connection, 429, 5xx) and the caller retries with backoff.

    ``settings_fault``: the portal's own settings are wrong (the SMTP login or sender), not the channel's; the
    caller does not count it against the channel, or one wrong password would disable every email channel.
    """

    def __init__(self, message: str, *, permanent: bool, http_status: int | None = None,
                 settings_fault: bool = False):
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.http_status = http_status
        self.settings_fault = settings_fault


@dataclass
class Message:
    """One notification about one group of alerts, already worded by monitoring.alerts.notify.

    Plain data (``dataclasses.asdict`` and ``Message(**data)`` round-trip), so it can be stored and sent again."""

    kind: str  # "firing", "resolved", "repeat", "escalation", "test"
    status: str  # "firing" or "resolved": the group as a whole
    subject: str  # one line, e.g. "[FIRING:2] critical: Redis unreachable"
    text: str  # plain-text body, several lines
    group_key: str  # stable id of the alert group
    portal_url: str  # the alert history page
    # Each: name, severity, state, summary, labels, annotations, started_at, resolved_at, runbook_url, url,
    # fingerprint, value. Transports read them with .get(), so a missing optional key is not an error.
    alerts: list[dict] = field(default_factory=list)


@dataclass
class Delivery:
    """What a successful send returns, for the delivery attempt row."""

    http_status: int | None
    detail: str  # short: "ok", or the first 200 characters of the answer


class Transport:
    """One kind of notification channel. Subclasses set ``kind``, ``label`` and ``fields`` (the config keys they
    accept) and implement ``field_errors`` and ``deliver``."""

    kind = ""
    label = ""
    fields: tuple[str, ...] = ()

    def __init__(self, config: dict):
        self.config = config

    @classmethod
    def config_errors(cls, config: dict) -> dict[str, str]:
        """Field name -> what is wrong with it; ``{}`` when the config is valid. The channel's admin form
        (NotificationChannelForm) shows these."""
        if not isinstance(config, dict):
            return {"config": "must be a JSON object"}
        # An unknown key is usually a misspelt one ("tokn"), which would otherwise be ignored without a word.
        errors = {key: f"unknown setting; {cls.label} channels take {', '.join(cls.fields)}"
                  for key in config if key not in cls.fields}
        errors.update(cls.field_errors(config))
        return errors

    @classmethod
    def field_errors(cls, config: dict) -> dict[str, str]:
        raise NotImplementedError

    def send(self, message: Message, *, timeout: float = 10.0) -> Delivery:
        """Delivers the message within about ``timeout`` seconds. Raises TransportError for every network, HTTP or
        configuration problem (a config edited into something invalid fails permanently, naming the field)."""
        errors = self.config_errors(self.config)
        if errors:
            problems = "; ".join(f"{name}: {problem}" for name, problem in errors.items())
            raise TransportError(f"{self.label} channel is misconfigured: {problems}", permanent=True)
        return self.deliver(message, timeout=timeout)

    def deliver(self, message: Message, *, timeout: float) -> Delivery:
        raise NotImplementedError


def url_error(value) -> str | None:
    """Why ``value`` is not an http(s) URL with a host, or None when it is."""
    if not isinstance(value, str) or not value.strip():
        return "required: an http or https URL"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if not parts.hostname:
        return "has no host"
    if any(character.isspace() for character in value):
        return "must not contain spaces"
    if any(ord(character) < 32 or ord(character) == 127 for character in value):
        return "must not contain control characters"
    return None


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line, whitespace collapsed, cut to ``limit`` characters (error messages, details)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
