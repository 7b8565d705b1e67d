"""Proving a migration (or a rollback): jobs against tasks, and counts and checksums against the baseline.

- **Jobs**: every queued, published RQ task has exactly one entry in its queue's list, and every entry points at a
  task queued for RQ. The lists are read in pages (an explicit operation, never done by a page view); workers keep
  popping meanwhile, so each discrepancy is checked again (``LPOS``, the row) before it counts.
- **Left behind**: after a migration no task is queued for the database poller; after a rollback none is queued or
  running in RQ. Either way no task is held while submission is open (nothing would dispatch it).
- **Counts and checksums** (migration.backup) against the baseline taken before the tasks moved: tasks that were
  finished then are unchanged; tasks that were queued or running then are still queued or running, or were
  processed since, and their fingerprints add up to the baseline's. Tasks active around the baseline (``RECENT``:
  started or finished less than a minute before it, or since) count with the queued and running ones on both sides,
  so a task finishing while the baseline is read cannot show as a difference.
- **Ran twice**: no task of the baseline has two completions.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timedelta

from django.db.models import Count, F, Q
from django.utils.dateparse import parse_datetime

from migration.backup import MASK, Tally, iterate_rows
from migration.dispatch import tasks_held_open
from queues import broker
from queues.models import POLLED_DISPATCH, CaptionTask, Dispatch, TaskEvent, TaskStatus

ACTIVE = (TaskStatus.QUEUED, TaskStatus.PROCESSING)
FINISHED = (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.DISCARDED)


# Tasks with a start or an end less than this before the baseline, or any time after it, are compared as one group
# with the queued and running ones. Their status may change while the baseline is being read (a worker finishing as
# its row is read), and their times come from the workers' clocks; the margin covers both.
RECENT_MARGIN = timedelta(seconds=60)
RECENT = "RECENT"


def _classified_tally(*, upto: int, cutoff: datetime) -> dict:
    """Counts and checksums per status of the tasks up to ``upto``, tasks active since ``cutoff`` under RECENT. The
    baseline and the check classify the same way, so a task can only move from an active status to RECENT."""
    tally = Tally()
    for row in iterate_rows(CaptionTask.objects.filter(pk__lte=upto),
                            fields=("id", "image_ref", "priority", "idempotency_key", "created_at", "status",
                                    "started_at", "finished_at")):
        recent = (row["started_at"] and row["started_at"] >= cutoff) or \
            (row["finished_at"] and row["finished_at"] >= cutoff)
        tally.add(RECENT if recent else row["status"], row)
    return tally.as_dict()


def baseline_take(*, at: datetime) -> dict:
    """The counts and checksums per status of every task now (the verification compares against it)."""
    last = CaptionTask.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    cutoff = at - RECENT_MARGIN
    return {"at": at.isoformat(), "cutoff": cutoff.isoformat(), "max_id": last,
            "by_status": _classified_tally(upto=last, cutoff=cutoff)}


def jobs_check(*, sample_limit: int = 20) -> dict:
    """Queue entries against queued RQ tasks (see the module docstring)."""
    connection = broker.get_connection()
    entries: dict[str, Counter] = {}
    for name in broker.QUEUE_NAMES:
        entries[name] = Counter(_queue_entries(connection, name))
    waiting = {pk: priority for pk, priority in CaptionTask.objects.filter(
        status=TaskStatus.QUEUED, dispatch=Dispatch.RQ, published_at__isnull=False).values_list("pk", "priority")}
    missing, duplicated = [], []
    for pk, priority in waiting.items():
        found = entries[priority].get(pk, 0)
        if found == 0:
            missing.append(pk)
        elif found > 1:
            duplicated.append(pk)
    listed = {pk for counter in entries.values() for pk in counter}
    foreign = [(name, pk) for name, counter in entries.items() for pk in counter
               if pk not in waiting or waiting[pk] != name]
    # Second looks: a worker may have popped and claimed a task between our list read and our row read. A job popped
    # but not yet claimed is in neither place for a moment; what is still missing after a pause is really missing.
    for pause in (0.0, 1.0, 2.0):
        if not missing:
            break
        time.sleep(pause)
        missing = [pk for pk in missing if _still_missing(connection, pk)]
    foreign = [(name, pk) for name, pk in foreign if _still_foreign(connection, name, pk)]
    duplicated = [pk for pk in duplicated if _entries_now(connection, waiting[pk], pk) > 1]
    return {"waiting_tasks": len(waiting), "queue_entries": sum(sum(c.values()) for c in entries.values()),
            "distinct_entries": len(listed), "missing_jobs": len(missing), "duplicate_jobs": len(duplicated),
            "jobs_without_task": len(foreign), "missing_sample": sorted(missing)[:sample_limit],
            "duplicate_sample": sorted(duplicated)[:sample_limit],
            "without_task_sample": sorted(pk for _, pk in foreign)[:sample_limit]}


def _queue_entries(connection, name: str, page: int = 10_000):
    key = broker.Queue.redis_queue_namespace_prefix + name
    start = 0
    while True:
        chunk = connection.lrange(key, start, start + page - 1)
        for raw in chunk:
            job_id = raw.decode()
            if job_id.startswith("caption-") and job_id[8:].isdigit():
                yield int(job_id[8:])
        if len(chunk) < page:
            return
        start += page


def _entries_now(connection, queue: str, pk: int) -> int:
    positions = connection.execute_command("LPOS", broker.Queue.redis_queue_namespace_prefix + queue,
                                           f"caption-{pk}", "COUNT", 0)
    return len(positions or [])


def _still_missing(connection, pk: int) -> bool:
    row = CaptionTask.objects.filter(pk=pk).values_list("status", "dispatch", "published_at", "priority").first()
    if row is None or row[0] != TaskStatus.QUEUED or row[1] != Dispatch.RQ or row[2] is None:
        return False  # claimed, moved or unpublished since
    if _entries_now(connection, row[3], pk):
        return False
    status = connection.hget(broker.CaptionJob.redis_job_namespace_prefix + f"caption-{pk}", "status")
    return status != b"started"  # popped and being claimed right now


def _still_foreign(connection, queue: str, pk: int) -> bool:
    if not _entries_now(connection, queue, pk):
        return False  # popped since
    row = CaptionTask.objects.filter(pk=pk).values_list("status", "dispatch", "published_at", "priority").first()
    return not (row and row[0] == TaskStatus.QUEUED and row[1] == Dispatch.RQ and row[2] is not None
                and row[3] == queue)


def left_behind(*, direction: str) -> dict:
    """Tasks still with the system being left: ``to_rq`` counts queued database tasks; ``to_database`` queued or
    running RQ tasks."""
    held = {"held_with_submission_open": tasks_held_open()}
    if direction == "to_rq":
        count = CaptionTask.objects.filter(status=TaskStatus.QUEUED, dispatch__in=POLLED_DISPATCH).count()
        return {"queued_for_database": count, **held}
    queued = CaptionTask.objects.filter(status=TaskStatus.QUEUED, dispatch=Dispatch.RQ).count()
    running = CaptionTask.objects.filter(status=TaskStatus.PROCESSING, dispatch=Dispatch.RQ).count()
    return {"queued_for_rq": queued, "running_in_rq": running, **held}


def tally_check(baseline: dict) -> dict:
    """Compares the tasks of the baseline (ids up to its ``max_id``) with it, per the module docstring."""
    cutoff = parse_datetime(baseline.get("cutoff") or baseline["at"])
    before = baseline["by_status"]
    after = _classified_tally(upto=baseline["max_id"], cutoff=cutoff)
    groups = [_compare(status, [before.get(status)], [after.get(status)]) for status in FINISHED]
    active = (*ACTIVE, RECENT)
    processed = (after.get(RECENT) or {}).get("count", 0) - (before.get(RECENT) or {}).get("count", 0)
    groups.append(_compare("QUEUED+PROCESSING", [before.get(s) for s in active], [after.get(s) for s in active],
                           processed=processed))
    return {"groups": groups, "ok": all(group["ok"] for group in groups)}


def _compare(name: str, before: list, after: list, *, processed: int | None = None) -> dict:
    def total(entries):
        count = sum(entry["count"] for entry in entries if entry)
        checksum = sum(int(entry["checksum"], 16) for entry in entries if entry) & MASK
        return count, f"{checksum:016x}"

    (count_before, sum_before), (count_after, sum_after) = total(before), total(after)
    result = {"group": name, "before": count_before, "after": count_after, "checksum_before": sum_before,
              "checksum_after": sum_after, "ok": count_before == count_after and sum_before == sum_after}
    if processed is not None:
        result["processed_meanwhile"] = processed
    return result


def ran_twice(*, upto: int | None = None) -> int:
    """Tasks with more completions than an operator asked for: one, plus one per requeue."""
    events = TaskEvent.objects.filter(kind__in=(TaskEvent.Kind.COMPLETED, TaskEvent.Kind.REQUEUED))
    if upto is not None:
        events = events.filter(task_id__lte=upto)
    per_task = events.order_by().values("task_id").annotate(
        completed=Count("id", filter=Q(kind=TaskEvent.Kind.COMPLETED)),
        requeued=Count("id", filter=Q(kind=TaskEvent.Kind.REQUEUED)))
    return per_task.filter(completed__gt=F("requeued") + 1).count()


def verification(*, direction: str = "to_rq", baseline: dict | None = None) -> dict:
    """The whole check; ``ok`` is False when anything does not match."""
    report: dict = {"direction": direction}
    problems = []
    try:
        report["jobs"] = jobs_check()
    except (broker.BrokerUnavailable, *broker.REDIS_ERRORS) as error:
        report["jobs"] = {"error": f"Redis is unreachable: {error}"}
        problems.append("the jobs could not be checked: Redis is unreachable")
    jobs = report["jobs"]
    if "error" not in jobs:
        if jobs["missing_jobs"]:
            problems.append(f"{jobs['missing_jobs']} queued RQ task(s) have no job in Redis")
        if jobs["duplicate_jobs"]:
            problems.append(f"{jobs['duplicate_jobs']} task(s) have more than one job in their queue")
        if jobs["jobs_without_task"]:
            problems.append(f"{jobs['jobs_without_task']} job(s) in Redis point at no task queued for RQ")
    report["left_behind"] = left_behind(direction=direction)
    for name, count in report["left_behind"].items():
        if count:
            problems.append(f"{count} task(s) {name.replace('_', ' ')}")
    if baseline:
        report["tally"] = tally_check(baseline)
        for group in report["tally"]["groups"]:
            if not group["ok"]:
                problems.append(f"{group['group']}: {group['before']} task(s) before, {group['after']} now, or "
                                "their checksums differ")
    report["ran_twice"] = ran_twice(upto=baseline["max_id"] if baseline else None)
    if report["ran_twice"]:
        problems.append(f"{report['ran_twice']} task(s) completed more than once")
    report["problems"] = problems
    report["ok"] = not problems
    return report

