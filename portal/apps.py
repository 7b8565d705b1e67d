from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class PortalConfig(AppConfig):
    default = True
    name = "portal"
    verbose_name = "Portal"

    def ready(self):
        from portal import checks  # noqa: F401  (registers the system checks)


class PortalAdminConfig(admin_apps.AdminConfig):
    default = False
    default_site = "portal.admin_site.PortalAdminSite"
