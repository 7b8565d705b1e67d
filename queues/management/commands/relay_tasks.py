import logging
import signal
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, close_old_connections

from portal.logs import announce
from queues.errors import BrokerUnavailable
from queues.services import tasks_relay_once
from queues.signals import service_unavailable

logger = logging.getLogger("queues.relay")


class Command(BaseCommand):
    help = ("Publishes queued tasks that have no job in Redis: tasks submitted while Redis was unreachable, and "
            "retries whose backoff has passed. Loops until stopped; --once makes a single pass.")

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="Make one pass and exit.")
        parser.add_argument("--interval", type=float, default=None,
                            help=f"Seconds between passes (default RELAY_INTERVAL, {settings.RELAY_INTERVAL:g}).")

    def handle(self, *args, once=False, interval=None, **options):
        interval = settings.RELAY_INTERVAL if interval is None else interval
        if interval <= 0:
            raise CommandError("--interval must be a positive number of seconds")
        if once:
            try:
                published = tasks_relay_once()
            except BrokerUnavailable as error:
                raise CommandError(f"Redis is unreachable, nothing published: {error}") from None
            self.stdout.write(f"Published {published} task(s).")
            return

        stopping = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stopping.append(True))
        announce(self, logger, f"Relay running (every {interval:g} s); Ctrl-C stops it.")
        redis_down = False
        while not stopping:
            close_old_connections()
            try:
                published = tasks_relay_once()
                if redis_down:
                    logger.warning("Redis is reachable again")
                    redis_down = False
                if published:
                    logger.info("published %d task(s)", published)
            except BrokerUnavailable as error:
                if not redis_down:
                    logger.warning("Redis is unreachable; tasks stay in the database until it is back: %s", error)
                    redis_down = True
            except DatabaseError as error:
                service_unavailable.send(sender=self.__class__, service="database", where="relay")
                logger.warning("database unreachable, relay pass skipped: %s", error)
            except Exception:
                logger.exception("relay pass failed; trying again")
            deadline = time.monotonic() + interval
            while not stopping and time.monotonic() < deadline:
                time.sleep(min(0.1, interval))
        announce(self, logger, "Relay stopped.")
