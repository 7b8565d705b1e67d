from monitoring.artefacts import prometheus_rules
from monitoring.management.export import ExportCommand


class Command(ExportCommand):
    help = "Writes Prometheus recording and alerting rules for the portal's metrics (stdout, or --output FILE)."

    def render(self) -> str:
        return prometheus_rules()
