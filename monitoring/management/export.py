"""What the artefact exports share: print the text, or write it to ``--output FILE``."""

import os
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError


class ExportCommand(BaseCommand):
    # An export that holds credentials (the Alertmanager configuration: webhook token, SMTP password, Slack URLs,
    # PagerDuty keys) is written readable by its owner only.
    secret = False

    def render(self) -> str:
        raise NotImplementedError

    def add_arguments(self, parser):
        parser.add_argument("--output", help="File to write instead of standard output.")

    def handle(self, *args, output=None, **options):
        try:
            text = self.render()
        except DatabaseError as error:  # the rules and channels are rows
            raise CommandError(f"Cannot read the database ({error}); has `manage.py migrate` run?") from None
        if not output:
            self.stdout.write(text, ending="")
            return
        try:
            if self.secret:
                descriptor = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.fchmod(descriptor, 0o600)  # also when the file existed with wider permissions
                with os.fdopen(descriptor, "w") as handle:
                    handle.write(text)
            else:
                Path(output).write_text(text)
        except OSError as error:
            raise CommandError(f"Cannot write {output}: {error}") from None
        self.stdout.write(f"Wrote {output}")
