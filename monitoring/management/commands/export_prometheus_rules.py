from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from monitoring.artefacts import prometheus_rules


class Command(BaseCommand):
    help = "Writes Prometheus recording and alerting rules for the portal's metrics (stdout, or --output FILE)."

    def add_arguments(self, parser):
        parser.add_argument("--output", help="File to write instead of standard output.")

    def handle(self, *args, output=None, **options):
        text = prometheus_rules()
        if not output:
            self.stdout.write(text, ending="")
            return
        try:
            Path(output).write_text(text)
        except OSError as error:
            raise CommandError(f"Cannot write {output}: {error}") from None
        self.stdout.write(f"Wrote {output}")
