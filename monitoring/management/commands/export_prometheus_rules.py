from django.core.management.base import CommandError

from monitoring.alerts.exports import prometheus_rules
from monitoring.management.export import ExportCommand


class Command(ExportCommand):
    help = ("Writes Prometheus recording rules and the alerting rules of the enabled alert rule rows (the ones the "
            "portal evaluates itself) to stdout, or --output FILE.")

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("--max-for", type=int, default=None, metavar="SECONDS",
                            help="Shorten every rule's 'for' to at most this many seconds (for drills and tests).")

    def handle(self, *args, max_for=None, **options):
        if max_for is not None and max_for < 0:
            raise CommandError("--max-for must be zero or a positive number of seconds")
        self.max_for = max_for
        super().handle(*args, **options)

    def render(self) -> str:
        return prometheus_rules(max_for_seconds=self.max_for)
