from django.contrib import admin


class PortalAdminSite(admin.AdminSite):
    site_header = "RQ Ops Portal"
    site_title = "RQ Ops Portal"
    index_title = "Caption work on Redis Queue"
