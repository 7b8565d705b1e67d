"""What both artefact exports share: print the text, or write it to ``--output FILE``."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError


class ExportCommand(BaseCommand):
    def render(self) -> str:
        raise NotImplementedError

    def add_arguments(self, parser):
        parser.add_argument("--output", help="File to write instead of standard output.")

    def handle(self, *args, output=None, **options):
        text = self.render()
        if not output:
            self.stdout.write(text, ending="")
            return
        try:
            Path(output).write_text(text)
        except OSError as error:
            raise CommandError(f"Cannot write {output}: {error}") from None
        self.stdout.write(f"Wrote {output}")
