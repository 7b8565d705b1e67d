import json

from monitoring.management.export import ExportCommand
from monitoring.metrics.exports import grafana_dashboard


class Command(ExportCommand):
    help = "Writes a Grafana dashboard (timeseries, stat and gauge panels) as JSON (stdout, or --output FILE)."

    def render(self) -> str:
        return json.dumps(grafana_dashboard(), indent=2) + "\n"
