from django.core.management.base import CommandError

from monitoring.alerts.exports import prometheus_rule_resource, prometheus_rules
from monitoring.management.export import ExportCommand


class Command(ExportCommand):
    help = ("Writes Prometheus recording rules and the alerting rules of the enabled alert rule rows (the ones the "
            "portal evaluates itself) to stdout, or --output FILE: a rules file for Prometheus (--format rules), or "
            "a PrometheusRule resource for the Prometheus Operator (--format prometheusrule).")

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("--max-for", type=int, default=None, metavar="SECONDS",
                            help="Shorten every rule's 'for' to at most this many seconds (for drills and tests).")
        parser.add_argument("--format", choices=["rules", "prometheusrule"], default="rules",
                            help="rules: Prometheus' rule_files format (default); prometheusrule: a Kubernetes "
                                 "PrometheusRule (monitoring.coreos.com/v1) holding the same groups.")
        parser.add_argument("--name", default="rq-ops-portal",
                            help="With --format prometheusrule: the resource's name (default rq-ops-portal).")

    def handle(self, *args, max_for=None, format="rules", name="rq-ops-portal", **options):
        if max_for is not None and max_for < 0:
            raise CommandError("--max-for must be zero or a positive number of seconds")
        self.max_for, self.format, self.name = max_for, format, name
        super().handle(*args, **options)

    def render(self) -> str:
        if self.format == "prometheusrule":
            return prometheus_rule_resource(name=self.name, max_for_seconds=self.max_for)
        return prometheus_rules(max_for_seconds=self.max_for)
