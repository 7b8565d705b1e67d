import logging
import signal
import time

from django.core.management.base import BaseCommand, CommandError
from django.db import close_old_connections

from monitoring.alerts.evaluate import lease_holder_name
from monitoring.alerts.retention import alert_history_prune
from monitoring.alerts.watch import evaluator_watch
from monitoring.live.dashboard import LiveSampler
from monitoring.metrics.monitors import SAMPLER, SAMPLER_INTERVAL, SILENT_INTERVALS, monitor_pass
from monitoring.metrics.sampler import sample_take, samples_compact
from portal.logs import announce
from queues import broker
from queues.errors import BrokerUnavailable

logger = logging.getLogger("monitoring.sampler")


class Command(BaseCommand):
    help = ("Records per-minute metric samples (one writer per minute however many of these run), folds old ones "
            "into hourly samples, and sends a live sample to the dashboards' WebSockets every second while any is "
            "open (one sampler of the deployment does, holding a lock in Redis; the others stand by).")

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="Take one sample (if this minute has none) and exit.")
        parser.add_argument("--live-interval", type=float, default=1.0,
                            help="Seconds between live dashboard samples (default 1).")
        parser.add_argument("--pass-interval", type=float, default=SAMPLER_INTERVAL, help=(
            f"Seconds between the records of this sampler's pass (the minute's sample is in) that health and the "
            f"monitoring-stale rule judge: silent for {SILENT_INTERVALS} of them fires the rule (default "
            f"{SAMPLER_INTERVAL:g})."))

    def handle(self, *args, once=False, live_interval=1.0, pass_interval=SAMPLER_INTERVAL, **options):
        if not 0 < live_interval <= 60:
            raise CommandError("--live-interval must be a number of seconds above 0 and at most 60")
        if not 1 <= pass_interval <= 3600:
            raise CommandError("--pass-interval must be a number of seconds from 1 to 3600")
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
        live = LiveSampler()
        holder = lease_holder_name()
        last_minute = last_compact = last_watched = last_pass = None
        announce(self, logger, "Sampler running; Ctrl-C stops it.")
        next_pass = time.monotonic()
        while not stopping:
            close_old_connections()
            now = time.time()
            try:
                minute = int(now // 60)
                if minute != last_minute:
                    sample_take()
                    last_minute = minute
                if last_pass is None or now - last_pass >= pass_interval:
                    # This minute's sample is in (taken here or by another sampler): a pass.
                    monitor_pass(SAMPLER, holder=holder, interval=pass_interval)
                    last_pass = now
                if last_compact is None or now - last_compact > 3600:
                    samples_compact()
                    alert_history_prune()
                    last_compact = now
                live.step()  # only the lock holder, and only while a dashboard is open
            except (BrokerUnavailable, *broker.UNAVAILABLE_ERRORS) as error:
                logger.warning("sampler: Redis unreachable: %s", error)
            except Exception:
                logger.exception("sampler pass failed")
            minute = int(now // 60)
            if minute != last_watched:
                # Once a minute, after its own pass (it never judges itself silent), Redis or not: the watch needs
                # only the database.
                last_watched = minute
                self._watch()
            # On a fixed schedule (a slow pass does not push the next one later), skipping passes that were missed.
            next_pass += live_interval
            if next_pass < time.monotonic():
                next_pass = time.monotonic() + live_interval
            while not stopping and time.monotonic() < next_pass:
                time.sleep(min(0.05, max(0.0, next_pass - time.monotonic())))
        try:
            live.release()
        except (BrokerUnavailable, *broker.UNAVAILABLE_ERRORS):
            pass

    @staticmethod
    def _watch() -> None:
        """The monitoring-stale rule, judged here while the alert evaluator is silent (monitoring.alerts.watch)."""
        try:
            report = evaluator_watch()
            if report:
                logger.warning("sampler: the alert evaluator is silent; judged monitoring-stale: %s", report)
        except Exception:
            logger.exception("sampler: watching the alert evaluator failed")
