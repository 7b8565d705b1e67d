"""Template context for the admin's pages."""

from __future__ import annotations


def operations_banner(request) -> dict:
    """A problem every operator should see on every admin page: the captioner is misconfigured and work is held."""
    if not request.path.startswith("/admin/") or not getattr(request.user, "is_staff", False):
        return {}
    from queues import broker

    try:
        return {"captioner_problem": broker.captioner_problem()}
    except (broker.BrokerUnavailable, *broker.REDIS_ERRORS):
        return {}
