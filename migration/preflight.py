"""The migration's preflight: can this installation move its queued tasks to RQ now?

Each check answers ok or not with a sentence and its figures; the run's first phase fails when any check fails, and
``manage.py migrate_to_rq preflight`` prints the same report. Checks never raise: an unreachable Redis or database is
a failed check with the reason.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field

from django.conf import settings
from django.db import DatabaseError, connection
from django.db.models import Count

from queues import broker
from queues.models import CaptionTask

# Bytes Redis needs per waiting caption job (its hash and its queue entry): 568 measured on Redis 7.0 (used_memory
# before and after publishing 10,000 jobs; MEMORY USAGE of one job hash says 520), rounded up for margin.
REDIS_BYTES_PER_JOB = 800
# Bytes of backup per task row, as an upper bound: one row's JSON uncompressed, with a caption of a few hundred
# characters. gzip makes it far smaller on real data (6 bytes a row for identical sample rows); the check asks for
# twice this, so it never passes for lack of a margin.
BACKUP_BYTES_PER_ROW = 1000


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    figures: dict = field(default_factory=dict)


@dataclass
class PreflightReport:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    def as_dict(self) -> dict:
        return {"ok": self.ok, "checks": [asdict(check) for check in self.checks]}


def preflight_report(*, require_rq_workers: bool = True) -> PreflightReport:
    checks = [_redis_checks(), _database_check()]
    checks = [check for group in checks for check in group]
    counts = next((check.figures for check in checks if check.name == "database"), {})
    queued = counts.get("queued_for_database", 0)
    checks.append(_memory_check(queued))
    checks.append(_disk_check(counts.get("total", 0)))
    checks.append(_workers_check(required=require_rq_workers))
    return PreflightReport(checks)


def _redis_checks() -> list[Check]:
    try:
        if not broker.ping():
            return [Check("redis", False, "Redis does not answer PING")]
        info = broker.get_connection().info("memory")
    except (broker.BrokerUnavailable, *broker.REDIS_ERRORS) as error:
        return [Check("redis", False, f"Redis is unreachable: {error}")]
    policy = info.get("maxmemory_policy") or ""
    if isinstance(policy, bytes):
        policy = policy.decode()
    return [
        Check("redis", True, "Redis answers PING", {"used_memory": info.get("used_memory"),
                                                    "maxmemory": info.get("maxmemory")}),
        Check("redis_eviction_policy", policy == "noeviction",
              "maxmemory-policy is noeviction" if policy == "noeviction" else
              f"maxmemory-policy is {policy!r}: Redis could evict queued jobs under memory pressure; set it to "
              "noeviction (CONFIG SET maxmemory-policy noeviction, and in redis.conf)", {"policy": policy}),
    ]


def _database_check() -> list[Check]:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        rows = CaptionTask.objects.order_by().values_list("status", "dispatch").annotate(count=Count("id"))
        by_status: dict[str, int] = {}
        by_dispatch: dict[str, dict[str, int]] = {}
        for status, dispatch, count in rows:
            by_status[status] = by_status.get(status, 0) + count
            by_dispatch.setdefault(dispatch, {})[status] = count
    except DatabaseError as error:
        return [Check("database", False, f"the database does not answer: {error}")]
    queued_db = sum(by_dispatch.get(name, {}).get("QUEUED", 0) for name in ("database", "fallback"))
    total = sum(by_status.values())
    return [Check("database", True, f"{total} task(s); {queued_db} queued for the database poller",
                  {"total": total, "by_status": by_status, "by_dispatch": by_dispatch,
                   "queued_for_database": queued_db})]


def _memory_check(queued: int) -> Check:
    try:
        info = broker.get_connection().info("memory")
    except (broker.BrokerUnavailable, *broker.REDIS_ERRORS):
        return Check("redis_memory", False, "unknown: Redis is unreachable")
    used, limit = int(info.get("used_memory") or 0), int(info.get("maxmemory") or 0)
    needed = queued * REDIS_BYTES_PER_JOB
    figures = {"used_bytes": used, "maxmemory_bytes": limit, "needed_bytes": needed}
    if not limit:
        return Check("redis_memory", True, f"no maxmemory limit; the queued tasks need about {_mb(needed)}", figures)
    ok = used + needed <= 0.8 * limit
    return Check("redis_memory", ok,
                 f"{_mb(used)} used of {_mb(limit)}; the queued tasks need about {_mb(needed)}"
                 + ("" if ok else ": that would pass 80 % of maxmemory"), figures)


def _disk_check(rows: int) -> Check:
    directory = settings.MIGRATION_BACKUP_DIR
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    needed = rows * BACKUP_BYTES_PER_ROW
    ok = free >= 2 * needed
    return Check("backup_disk", ok, f"{_mb(free)} free in {directory}; the backup needs about {_mb(needed)}",
                 {"free_bytes": free, "needed_bytes": needed, "directory": str(directory)})


def _workers_check(*, required: bool) -> Check:
    try:
        names = [worker.name for worker in broker.workers()]
        alive = [name for name, state in broker.alive_states(names).items() if state is not None]
    except (broker.BrokerUnavailable, *broker.REDIS_ERRORS) as error:
        return Check("rq_workers", False, f"unknown: {error}")
    if alive:
        return Check("rq_workers", True, f"{len(alive)} RQ worker(s) alive", {"alive": len(alive)})
    return Check("rq_workers", not required, "no RQ worker is alive: start the supervisor (manage.py runworkers) "
                                             "before migrating", {"alive": 0})


def _mb(size: int) -> str:
    return f"{size / 1_048_576:.1f} MiB"
