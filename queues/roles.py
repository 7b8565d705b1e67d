"""The three roles, as groups with permissions (created by migration, re-applied by ``manage.py sync_roles``).

Every page and action checks these permissions on the server; hiding buttons is only a courtesy.
"""

VIEW_QUEUES = ["view_captiontask", "view_taskevent", "view_workerpool", "view_fleetevent", "view_liveworker",
               "view_queueoverview", "view_bulkoperation"]
# Alert history (the monitoring app): Support reads it; Operators also acknowledge, silence and shelve, and tune
# rules' thresholds and durations; Admins (every permission) edit rules, channels, routes and escalation. Channel settings hold webhook URLs and keys, so
# only Admins see them; everyone sees what was delivered where.
VIEW_ALERTS = ["view_alert", "view_alertevent", "view_alertrule", "view_silence", "view_notification",
               "view_deliveryattempt"]
# The migration console (the migration app): everyone reads runs, phases, logs, pollers and the dispatch mode;
# Operators may also pause and resume submission (maintenance); only Admins change the mode and run migrations.
VIEW_MIGRATION = ["view_systemmode", "view_migrationevent", "view_legacyworker", "view_migrationrun",
                  "view_migrationphase", "view_migrationlogline"]
ROLES = {
    # Admins: every permission of every app.
    "Admins": None,
    "Operators": VIEW_QUEUES + VIEW_ALERTS + VIEW_MIGRATION + [
        "view_auditentry", "add_captiontask", "requeue_task", "cancel_task", "change_task_priority", "pause_queue",
        "discard_task",
        "manage_fleet", "acknowledge_alert", "add_silence", "change_silence",
        # thresholds and durations only (monitoring.alerts.admin.rules.AlertRuleAdmin.TUNABLE)
        "change_alertrule", "pause_submission"],
    "Support": VIEW_QUEUES + VIEW_ALERTS + VIEW_MIGRATION,
}


def sync_roles(apps=None) -> dict[str, int]:
    """Creates or updates the groups. Returns how many permissions each has."""
    if apps is None:
        from django.apps import apps as global_apps

        apps = global_apps
    from django.contrib.auth.management import create_permissions

    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, verbosity=0, apps=apps)
        app_config.models_module = None
    group_model = apps.get_model("auth", "Group")
    permission_model = apps.get_model("auth", "Permission")
    counts = {}
    for name, codenames in ROLES.items():
        group, _ = group_model.objects.get_or_create(name=name)
        permissions = permission_model.objects.all() if codenames is None else \
            permission_model.objects.filter(codename__in=codenames)
        group.permissions.set(permissions)
        counts[name] = permissions.count()
    return counts
