import logging
import signal
import time

from channels.layers import get_channel_layer
from django.core.management.base import BaseCommand, CommandError
from django.db import close_old_connections

from monitoring.consumers import METRICS_GROUP
from monitoring.live import dashboards_push
from monitoring.sampler import sample_take, samples_compact
from queues import broker
from queues.errors import BrokerUnavailable

logger = logging.getLogger("monitoring.sampler")


class Command(BaseCommand):
    help = ("Records per-minute metric samples (one writer per minute however many of these run), folds old ones "
            "into hourly samples, and pushes live figures to the dashboards' WebSockets every few seconds while any "
            "is open.")

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="Take one sample (if this minute has none) and exit.")
        parser.add_argument("--live-interval", type=float, default=2.0,
                            help="Seconds between live dashboard updates (default 2).")

    def handle(self, *args, once=False, live_interval=2.0, **options):
        if live_interval <= 0:
            raise CommandError("--live-interval must be a positive number of seconds")
        if once:
            try:
                rows = sample_take()
            except BrokerUnavailable as error:
                raise CommandError(f"Redis is unreachable: {error}") from None
            self.stdout.write("This minute was already sampled." if rows is None else f"Wrote {len(rows)} sample(s).")
            return
        stopping = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stopping.append(True))
        layer = get_channel_layer()
        last_minute = last_compact = None
        self.stdout.write("Sampler running; Ctrl-C stops it.")
        while not stopping:
            close_old_connections()
            now = time.time()
            try:
                minute = int(now // 60)
                if minute != last_minute:
                    sample_take()
                    last_minute = minute
                if last_compact is None or now - last_compact > 3600:
                    samples_compact()
                    last_compact = now
                dashboards_push(group=METRICS_GROUP, layer=layer)  # only while a dashboard is open
            except (BrokerUnavailable, *broker.UNAVAILABLE_ERRORS) as error:
                logger.warning("sampler: Redis unreachable: %s", error)
            except Exception:
                logger.exception("sampler pass failed")
            deadline = time.monotonic() + live_interval
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.1)
