"""Where new tasks go, behind one hook: ``settings.TASK_DISPATCH_POLICY`` names the policy object.

Every task row says which system runs it (``CaptionTask.dispatch``): RQ, the database poller (the legacy worker,
directly or as the fallback while Redis is away), or nobody yet (held while submission is paused). Submission asks
the policy for the systems of new tasks; the relay (once per pass, in the supervisor or ``relay_tasks``) lets it
keep its own state (a fallback that starts or ends, held tasks released when a pause expires); the supervisor asks it
which extra processes to keep running beside the pools (a database poller during the fallback); health and metrics
show its status.

The default policy sends everything to RQ. The migration app installs the one that reads its dispatch mode row:
queues never imports it, the setting wires it in (the way Django finds authentication backends).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.utils.module_loading import import_string

from queues.models import Dispatch


@dataclass(frozen=True)
class DispatchStatus:
    mode: str = "rq"
    fallback_active: bool = False
    submission_paused: bool = False
    paused_reason: str = ""
    paused_until: str | None = None  # ISO time, or None for "until resumed"

    def as_dict(self) -> dict:
        return {"mode": self.mode, "fallback_active": self.fallback_active,
                "submission_paused": self.submission_paused, "paused_reason": self.paused_reason,
                "paused_until": self.paused_until}


@dataclass(frozen=True)
class PollersState:
    """The other system's workers (database pollers), for health: read on demand, never by scrapes or samples."""
    needed: bool = False  # they have work or get new tasks
    alive: int = 0
    waiting: int = 0  # tasks queued for them
    blocked_by: str = ""  # why none may claim now (a migration run that drained them)
    blocked_for_now: bool = False  # ... and that run is executing: it moves their tasks itself


class DispatchPolicy:
    """Everything to RQ, nothing held, no extra processes."""

    def assign(self, count: int) -> list[str]:
        """The systems of ``count`` new tasks (values of ``Dispatch``), read when they are inserted."""
        return [Dispatch.RQ] * count

    def maintain(self, *, redis_up: bool) -> None:
        """Called once per relay pass, before the relay publishes (even when Redis is down)."""

    def processes(self, *, running: set[str]) -> dict[str, list[str]]:
        """Extra processes the supervisor keeps running: name -> ``manage.py`` arguments. ``running``: the names
        this supervisor runs now."""
        return {}

    def status(self) -> DispatchStatus:
        return DispatchStatus()

    def pollers_state(self) -> PollersState:
        return PollersState()

    def tasks_pinned(self) -> tuple[int, str]:
        """Tasks operators may not requeue, move to another priority or delete now: ids up to the first value (0:
        none), and why. A migration run compares them with the baseline it took, so such a change would fail its
        verification for good."""
        return 0, ""

    def pollers(self) -> list[dict]:
        """Workers of the other system, for the live workers page: dicts with name, host, pid, alive, fallback,
        task_id, processed, failed, started_at, heartbeat_at."""
        return []


_policies: dict[str, DispatchPolicy] = {}


def get_policy() -> DispatchPolicy:
    path = getattr(settings, "TASK_DISPATCH_POLICY", "")
    if not path:
        return DispatchPolicy()
    policy = _policies.get(path)
    if policy is None:
        policy = _policies[path] = import_string(path)()
    return policy
