import json

from django.core.management.base import BaseCommand, CommandError

from monitoring.metrics.sampler import capacity_report


def _show(value, unit=""):
    if value is None:
        return "n/a"
    return f"{value:.0%}" if unit == "%" else f"{value:,.1f}{unit}"


class Command(BaseCommand):
    help = ("Compares the old system's capacity targets (throughput >= 50 tasks/min at peak, backlog < 50, "
            "utilisation 70-85 %, pickup < 2 min) with measured samples, and says what to scale.")

    def add_arguments(self, parser):
        parser.add_argument("--days", type=int, default=7, help="How many days of samples to read (default 7).")
        parser.add_argument("--json", action="store_true", help="Print JSON for machines.")

    def handle(self, *args, days, **options):
        if not 1 <= days <= 365:
            raise CommandError(f"--days must be between 1 and 365; got {days}")
        report = capacity_report(days=days)
        if options["json"]:
            self.stdout.write(json.dumps(report, default=str, indent=2))
            return
        measured = report["measured"]
        self.stdout.write(f"Capacity over the last {days} day(s) ({measured['samples']} samples)")
        units = {"throughput >= 50 tasks/min at peak": "/min", "backlog < 50": "", "utilisation 70-85 %": "%",
                 "pickup < 2 min": " s"}
        for check in report["checks"]:
            mark = "OK  " if check["ok"] else "MISS"
            self.stdout.write(f"  {mark} {check['target']:<38} measured {_show(check['measured'], units[check['target']])}")
        for line in report["advice"]:
            self.stdout.write(line)

