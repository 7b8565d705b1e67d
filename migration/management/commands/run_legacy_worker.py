import logging

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from migration.legacy import LegacyPoller
from migration.models import POLLING_DISABLED
from portal.logs import announce

logger = logging.getLogger("migration.legacy")


class Command(BaseCommand):
    help = ("Runs the database-polling worker: claims queued tasks dispatched to the database and runs them with the "
            "same captioner, timeout, retries and dead letters as the RQ workers. SIGTERM finishes the task in hand, "
            "then exits; a second SIGTERM gives it back and exits at once.")

    def add_arguments(self, parser):
        parser.add_argument("--burst", action="store_true", help="Exit when no task is left to claim.")
        parser.add_argument("--max-tasks", type=int, default=None, metavar="N", help="Exit after N tasks.")
        parser.add_argument("--interval", type=float, default=None, metavar="S",
                            help=f"Seconds between looks for work when there was none "
                                 f"(default LEGACY_POLL_INTERVAL, {settings.LEGACY_POLL_INTERVAL:g}).")
        parser.add_argument("--name", default=None, help="The poller's name (default: poller.<host>.<pid>.<id>).")
        parser.add_argument("--fallback", action="store_true",
                            help="Started by a supervisor for the Redis fallback (shown in the fleet views).")

    def handle(self, *args, burst=False, max_tasks=None, interval=None, name=None, fallback=False, **options):
        if not settings.DATABASE_POLLING_ENABLED and not fallback:
            raise CommandError(POLLING_DISABLED + " (the supervisor starts it with --fallback while that is on)")
        if max_tasks is not None and max_tasks < 1:
            raise CommandError("--max-tasks must be at least 1")
        if interval is not None and interval <= 0:
            raise CommandError("--interval must be a positive number of seconds")
        if name is not None and not name.strip():
            raise CommandError("--name must not be empty")
        poller = LegacyPoller(name=name, interval=interval, fallback=fallback)
        poller.install_signal_handlers()
        if options["verbosity"] > 0:
            announce(self, logger, f"Database poller {poller.name} running"
                              + (" (burst)" if burst else "; Ctrl-C stops it after the task in hand."))
        result = poller.work(burst=burst, max_tasks=max_tasks)
        if options["verbosity"] > 0:
            announce(self, logger, f"Database poller {poller.name} stopped ({result.reason}): {result.processed} task(s), "
                              f"{result.completed} completed, {result.failed} failed.")
