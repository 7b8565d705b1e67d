import json

from monitoring.metrics.exports import grafana_dashboard
from monitoring.management.export import ExportCommand


class Command(ExportCommand):
    help = "Writes a Grafana dashboard (timeseries, stat and gauge panels) as JSON (stdout, or --output FILE)."

    def render(self) -> str:
        return json.dumps(grafana_dashboard(), indent=2) + "\n"
