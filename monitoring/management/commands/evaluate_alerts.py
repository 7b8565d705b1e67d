import json
import logging
import signal
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from monitoring.alerts.evaluate import EvaluatorState, alerts_cycle, lease_release
from portal.logs import announce

logger = logging.getLogger("monitoring.alerts")


class Command(BaseCommand):
    help = ("Evaluates the alert rules, plans notifications and hands them to the workers, every "
            "ALERTS_EVALUATION_INTERVAL seconds. Only one evaluator is active per deployment (a lease in the "
            "database); others wait and take over when it stops.")

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="One pass, print what it did, and exit.")
        parser.add_argument("--interval", type=float, default=None,
                            help=f"Seconds between passes (default ALERTS_EVALUATION_INTERVAL, "
                                 f"{settings.ALERTS_EVALUATION_INTERVAL:g}).")

    def handle(self, *args, once=False, interval=None, **options):
        interval = settings.ALERTS_EVALUATION_INTERVAL if interval is None else interval
        if interval <= 0:
            raise CommandError("--interval must be a positive number of seconds")
        state = EvaluatorState()
        if once:
            report = alerts_cycle(state=state)
            if state.holding:
                lease_release(holder=state.holder)
            if "database" in report:
                raise CommandError(f"The database is {report['database']}")
            if "error" in report:  # the database answers, but this pass failed on it (a deadlock, a race lost)
                raise CommandError(f"The pass failed on a database error: {report['error']}; run it again.")
            if not report.get("lease"):
                raise CommandError(f"Another evaluator ({report.get('holder')}) is active; this pass did nothing. "
                                   f"It hands over within 30 s of stopping.")
            self.stdout.write(json.dumps(report, indent=2, default=str))
            return
        # Started with the fleet (a fresh start, a deploy): the rules about workers wait for them (FLEET_START_GRACE).
        state.started_at, state.interval = timezone.now(), interval
        stopping = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stopping.append(True))
        if options["verbosity"]:
            announce(self, logger, f"Alert evaluator {state.holder} running every {interval:g} s; Ctrl-C stops it.")
        was_holding = None
        while not stopping:
            started = time.monotonic()
            try:
                report = alerts_cycle(state=state)
                if state.holding != was_holding:
                    logger.info("alert evaluator %s: %s", state.holder,
                                "active" if state.holding else f"standing by ({report.get('holder', '')})")
                    was_holding = state.holding
                changes = report.get("evaluation", {}).get("changes")
                if changes:
                    logger.info("alerts: %s", "; ".join(changes))
                if "database" in report:
                    logger.warning("alert evaluator: the database is %s", report["database"])
            except Exception:
                logger.exception("alert evaluation pass failed")
            deadline = started + interval
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.1)
        try:
            if state.holding:
                lease_release(holder=state.holder)
        except Exception:
            pass
