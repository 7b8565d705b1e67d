import re
from datetime import timedelta

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count
from django.utils import timezone
from tqdm import tqdm

from queues import broker, control
from queues.audit import audit, audit_via, command_account
from queues.errors import BrokerUnavailable
from queues.models import CaptionTask, Priority, TaskStatus
from queues.operations.services import tasks_cancel, tasks_cleanup, tasks_discard, tasks_requeue

DURATION = re.compile(r"^(\d+)([smhd])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(value: str) -> timedelta:
    match = DURATION.match(value.strip())
    if not match:
        raise CommandError(f"--older-than must look like 90s, 30m, 12h or 7d; got {value!r}")
    return timedelta(**{UNITS[match.group(2)]: int(match.group(1))})


def parse_ids(value: str) -> list[int]:
    try:
        ids = [int(part) for part in value.replace(" ", ",").split(",") if part]
    except ValueError:
        raise CommandError(f"--ids must be task ids separated by commas; got {value!r}") from None
    if not ids:
        raise CommandError("--ids needs at least one task id")
    return ids


class Command(BaseCommand):
    help = ("Task operations for operators: stats | requeue (--failed | --ids ...) [--error-class X] [--queue Q] | "
            "cancel (--ids ... | --queue Q) | discard (--failed | --ids ...) [--error-class X] [--queue Q] | "
            "cleanup --older-than 7d [--dry-run].")

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        actions.add_parser("stats", help="Tasks by status and jobs by queue.")
        for name, text in (("requeue", "Requeue failed, discarded or cancelled tasks (retry count reset)."),
                           ("cancel", "Cancel queued tasks."),
                           ("discard", "Discard dead letters (failed tasks that can never succeed): they leave the "
                                       "failed-job registries, the dead-letter counts and alert, and stay in the "
                                       "history as discarded.")):
            sub = actions.add_parser(name, help=text)
            if name in ("requeue", "discard"):
                sub.add_argument("--failed", action="store_true", help="Every failed task (the dead letters).")
            sub.add_argument("--ids", help="Comma-separated task ids.")
            sub.add_argument("--error-class", help="Only tasks whose last error has this class.")
            sub.add_argument("--queue", choices=Priority.values, help="Only tasks of this queue.")
            sub.add_argument("--dry-run", action="store_true", help="Say how many would be touched; change nothing.")
            sub.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")
        cleanup = actions.add_parser("cleanup", help="Delete old completed, cancelled and discarded rows and old finished jobs.")
        cleanup.add_argument("--older-than", default=f"{settings.TASK_RETENTION_DAYS}d",
                             help=f"Age to keep (default TASK_RETENTION_DAYS, {settings.TASK_RETENTION_DAYS}d).")
        cleanup.add_argument("--dry-run", action="store_true")
        cleanup.add_argument("--yes", action="store_true")

    def handle(self, *args, action, **options):
        try:
            # Audited as coming from this command and the account running it: no portal user runs it.
            with audit_via(f"manage.py tasks {action} (account {command_account()})"):
                getattr(self, f"do_{action}")(**options)
        except BrokerUnavailable as error:
            raise CommandError(f"Redis is unreachable: {error}") from None

    def do_stats(self, **options):
        by_status = dict(CaptionTask.objects.order_by().values_list("status").annotate(count=Count("id")))
        self.stdout.write("Tasks: " + ", ".join(f"{status.lower()} {by_status.get(status, 0)}"
                                                for status in TaskStatus.values))
        try:
            figures, paused = broker.queue_figures(), control.paused_queues()
        except broker.UNAVAILABLE_ERRORS as error:
            raise CommandError(f"Redis is unreachable: {error}") from None
        for name, row in figures.items():
            flag = " (paused)" if name in paused else ""
            self.stdout.write(f"Queue {name}{flag}: waiting {row['waiting']}, running {row['running']}, "
                              f"scheduled {row['scheduled']}, dead letters {row['dead']}, finished {row['finished']}")

    def _select(self, *, statuses, ids=None, error_class=None, queue=None, **options):
        queryset = CaptionTask.objects.filter(status__in=statuses)
        if ids:
            queryset = CaptionTask.objects.filter(pk__in=parse_ids(ids))  # refusals are reported, not hidden
        if error_class:
            queryset = queryset.filter(last_error_class=error_class)
        if queue:
            queryset = queryset.filter(priority=queue)
        return list(queryset.order_by("pk").values_list("pk", flat=True))

    def _confirm(self, question: str, yes: bool) -> None:
        if yes:
            return
        if not self.stdin_isatty():
            raise CommandError(f"{question} Add --yes to confirm when not running interactively.")
        if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
            raise CommandError("Nothing done.")

    def stdin_isatty(self) -> bool:
        import sys

        return sys.stdin.isatty()

    def _bulk(self, verb, service, ids, *, dry_run, yes):
        if not ids:
            self.stdout.write("No task matches.")
            return
        if dry_run:
            self.stdout.write(f"Would {verb} up to {len(ids)} task(s) (dry run, nothing changed).")
            return
        self._confirm(f"{verb.capitalize()} {len(ids)} task(s)?", yes)
        with tqdm(total=len(ids), unit="task", desc=verb.capitalize(), file=self.stderr._out) as bar:
            result = service(task_ids=ids, on_batch=lambda count, _: bar.update(count))
        self.stdout.write(self.style.SUCCESS(result.describe()))

    def do_requeue(self, *, failed, ids, dry_run, yes, **options):
        if not failed and not ids:
            raise CommandError("Say which tasks: --failed (every dead letter) or --ids 1,2,3")
        selected = self._select(statuses=[TaskStatus.FAILED], ids=ids, **options)
        self._bulk("requeue", tasks_requeue, selected, dry_run=dry_run, yes=yes)

    def do_discard(self, *, failed, ids, dry_run, yes, **options):
        if not failed and not ids:
            raise CommandError("Say which tasks: --failed (every dead letter, narrowed by --error-class or --queue) "
                               "or --ids 1,2,3")
        selected = self._select(statuses=[TaskStatus.FAILED], ids=ids, **options)
        self._bulk("discard", tasks_discard, selected, dry_run=dry_run, yes=yes)

    def do_cancel(self, *, ids, dry_run, yes, **options):
        if not ids and not options.get("queue"):
            raise CommandError("Say which tasks: --ids 1,2,3 or --queue NAME (every queued task of it)")
        selected = self._select(statuses=[TaskStatus.QUEUED], ids=ids, **options)
        self._bulk("cancel", tasks_cancel, selected, dry_run=dry_run, yes=yes)

    def do_cleanup(self, *, older_than, dry_run, yes, **options):
        cutoff = timezone.now() - parse_duration(older_than)
        if dry_run:
            plan = tasks_cleanup(cutoff=cutoff, dry_run=True)
            self.stdout.write(f"Would delete {plan['rows']} task row(s) finished before {cutoff:%Y-%m-%d %H:%M} "
                              f"and {plan['jobs']} finished job(s) from Redis (dry run).")
            if plan["kept"]:
                self.stdout.write(f"Would keep {plan['kept']} older row(s): {plan['why_kept']}.")
            return
        self._confirm(f"Delete completed, cancelled and discarded tasks finished before {cutoff:%Y-%m-%d %H:%M}?", yes)
        with tqdm(unit="row", desc="Cleaning up", file=self.stderr._out) as bar:
            done = tasks_cleanup(cutoff=cutoff, on_batch=bar.update)
        audit(user=None, action="tasks_cleanup", target=f"finished before {cutoff:%Y-%m-%d %H:%M}", count=done["rows"],
              detail={"jobs": done["jobs"], "kept": done["kept"]})
        self.stdout.write(self.style.SUCCESS(f"Deleted {done['rows']} task row(s) and {done['jobs']} finished "
                                             "job(s) from Redis."))
        if done["kept"]:
            self.stdout.write(self.style.WARNING(f"Kept {done['kept']} older row(s): {done['why_kept']}."))
