from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from portal.embedded_redis import RedisServerError, embedded_server, ensure_embedded_running


class Command(BaseCommand):
    help = ("Starts, stops or shows the embedded Redis server the portal uses when REDIS_URL is unset. Commands "
            "that need Redis start it on demand; 'stop' shuts it down cleanly (the append-only file is flushed).")

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["start", "stop", "status"])

    def handle(self, *args, action, **options):
        if not settings.EMBEDDED_REDIS:
            variable = "REDIS_SENTINELS" if settings.REDIS_SENTINELS else "REDIS_URL"
            raise CommandError(f"{variable} is set ({settings.REDIS_URL}); the embedded server is not in use.")
        server = embedded_server(settings.VAR_DIR, settings.EMBEDDED_REDIS_PORT)
        if action == "start":
            try:
                ensure_embedded_running(settings.VAR_DIR, settings.EMBEDDED_REDIS_PORT)
            except RedisServerError as error:
                raise CommandError(f"The embedded Redis server could not start: {error}") from None
            self.stdout.write(f"Embedded Redis is running at {server.url}")
        elif action == "stop":
            if server.stop():
                self.stdout.write("Embedded Redis stopped.")
            else:
                self.stdout.write("Embedded Redis was not running.")
        else:
            pid = server.running_pid()
            if server.ping():
                self.stdout.write(f"running (pid {pid}) at {server.url}, data in {server.directory}")
            else:
                self.stdout.write("not running")
