"""The audit trail: every operator action, from the admin, a command or the API, is an ``AuditEntry`` row naming
who did what to what, and how it came (``audit_via``: the API token's name; ``command_account``: the system
account a command acts as)."""

from __future__ import annotations

import contextlib
import contextvars

from queues.models import AuditEntry

_VIA: contextvars.ContextVar[str] = contextvars.ContextVar("audit_via", default="")


@contextlib.contextmanager
def audit_via(channel: str):
    """Audit entries written inside say how the action came (``detail["via"]``): the fleet API's token name."""
    reset = _VIA.set(channel)
    try:
        yield
    finally:
        _VIA.reset(reset)


def command_account() -> str:
    """The operating-system account running a management command, for the audit trail (no portal user runs it)."""
    import getpass
    import os

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (a container)
        return f"uid {os.getuid()}"


def audit_channel() -> str:
    """The channel set by ``audit_via`` around this code, or "" (an action by a person in the admin)."""
    return _VIA.get()


def audit(*, user, action: str, target: str = "", count: int = 0, detail: dict | None = None,
          address: str | None = None) -> AuditEntry:
    detail = dict(detail or {})
    if _VIA.get():
        detail["via"] = _VIA.get()
    return AuditEntry.objects.create(user=user if getattr(user, "pk", None) else None, action=action,
                                     target=target[:300], count=count, detail=detail, address=address)
