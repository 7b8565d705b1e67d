from django.db import migrations

# Seed 004's Alertmanager routing as the portal's own routes: critical alerts to the pager and on (continue), every
# alert to chat, grouped by alertname, cluster and service, a 10 s group wait, reminders every 12 hours. They start
# without channels (a channel needs its URL or key): an Admin attaches a PagerDuty channel to the first and a Slack
# channel to the second, and the portal and the exported Alertmanager configuration then route as the document does.
# Written out here, not read from live code, so that this migration does what it did whatever the code becomes.
# Only on an install without routes (a fresh one): an upgraded install keeps the routes it has, untouched. The
# catch-all comes last (position 1000), so a route an Admin adds later (position 100 by default) is tried before it.
ROUTES = [
    dict(name="critical to PagerDuty", position=10, severities=["critical"], continue_matching=True),
    dict(name="everything to Slack", position=1000, severities=["critical", "error", "warning", "info"],
         continue_matching=False),
]
TIMINGS = dict(matchers=[], group_by=["alertname", "cluster", "service"], group_wait_seconds=10,
               repeat_interval_seconds=12 * 3600, send_resolved=True, enabled=True)


def seed(apps, schema_editor):
    route_model = apps.get_model("monitoring", "NotificationRoute")
    if route_model.objects.exists():
        return
    for route in ROUTES:
        values = dict(route)
        route_model.objects.get_or_create(name=values.pop("name"), defaults={**values, **TIMINGS})


def unseed(apps, schema_editor):
    apps.get_model("monitoring", "NotificationRoute").objects.filter(
        name__in=[route["name"] for route in ROUTES], channels=None).delete()


class Migration(migrations.Migration):
    dependencies = [("monitoring", "0013_seed_document_alerts")]
    operations = [migrations.RunPython(seed, unseed)]
