from django.core.management.base import BaseCommand

from queues.roles import sync_roles


class Command(BaseCommand):
    help = "Creates or updates the Admins, Operators and Support groups and their permissions."

    def handle(self, *args, **options):
        for name, count in sync_roles().items():
            self.stdout.write(f"{name}: {count} permission(s)")
