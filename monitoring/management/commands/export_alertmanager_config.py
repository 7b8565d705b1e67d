from django.core.management.base import CommandError

from monitoring.alerts.exports import alertmanager_config
from monitoring.alerts.transports.base import url_error
from monitoring.management.export import ExportCommand


class Command(ExportCommand):
    secret = True
    help = ("Writes a Prometheus Alertmanager configuration built from the enabled notification routes and channels, "
            "to stdout or --output FILE: the watchdog to your dead man's switch, the twins of the portal's rules "
            "nowhere (the portal pages for them), every other alert to the portal's webhook and then the routes.")

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("--portal-url", help="The portal's base URL as Alertmanager reaches it (default: "
                                                 "PORTAL_URL).")
        parser.add_argument("--max-group-wait", type=int, default=None, metavar="SECONDS",
                            help="Shorten every route's group_wait to at most this many seconds (for drills and "
                                 "tests).")
        parser.add_argument("--watchdog-url", metavar="URL",
                            help="Your dead man's switch: a URL that expects the always-firing RQWatchdog alert "
                                 "every minute and pages when it stops coming (a heartbeat check of your paging "
                                 "service). Without it the watchdog goes nowhere.")
        parser.add_argument("--group-interval", type=int, default=10, metavar="SECONDS",
                            help="How long Alertmanager waits before it tells a group's receivers about alerts "
                                 "that joined or resolved (default 10, as the monitoring guide's routing; drills "
                                 "use 1).")

    def handle(self, *args, portal_url=None, max_group_wait=None, group_interval=10, watchdog_url=None, **options):
        if portal_url is not None and (problem := url_error(portal_url)):
            raise CommandError(f"--portal-url {problem}")
        if watchdog_url is not None and (problem := url_error(watchdog_url)):
            raise CommandError(f"--watchdog-url {problem}")
        if max_group_wait is not None and max_group_wait < 0:
            raise CommandError("--max-group-wait must be zero or a positive number of seconds")
        if group_interval < 1:
            raise CommandError("--group-interval must be at least 1 second (Alertmanager refuses 0)")
        self.portal_url, self.max_group_wait, self.group_interval = portal_url, max_group_wait, group_interval
        self.watchdog_url = watchdog_url
        super().handle(*args, **options)

    def render(self) -> str:
        try:
            return alertmanager_config(portal_url=self.portal_url, max_group_wait_seconds=self.max_group_wait,
                                       group_interval_seconds=self.group_interval, watchdog_url=self.watchdog_url,
                                       warn=lambda message: self.stderr.write(f"Warning: {message}"))
        except ValueError as error:
            raise CommandError(str(error)) from None
