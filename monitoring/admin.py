"""Django's admin autodiscovery imports this module: it registers the alert pages (monitoring.alerts.admin). The
live dashboard's pages are the admin site's own URLs (portal.admin_site)."""

from monitoring.alerts.admin import alerts, channels, notifications, rules, silences  # noqa: F401 (they register)
