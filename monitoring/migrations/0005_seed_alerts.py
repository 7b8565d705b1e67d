from django.db import migrations

# The four levels of the old system's escalation list, each notified when a firing alert is still unacknowledged
# that many minutes after it fired (the routes notify at once). Their channels are left empty: an Admin attaches
# the channels each level uses (the timeline records an escalation to a level without channels as such).
ESCALATION_LEVELS = [(1, "System administrator", 5), (2, "Development team", 15), (3, "Database administrator", 30),
                     (4, "Management", 60)]


def seed(apps, schema_editor):
    from monitoring.alert_rules import rules_seed
    from queues.roles import sync_roles

    rules_seed(apps)
    policy_model = apps.get_model("monitoring", "EscalationPolicy")
    step_model = apps.get_model("monitoring", "EscalationStep")
    policy, created = policy_model.objects.get_or_create(name="Default escalation",
                                                         defaults={"severities": ["critical", "error"]})
    if created:
        for level, title, after in ESCALATION_LEVELS:
            step_model.objects.create(policy=policy, level=level, title=title, after_minutes=after)
    sync_roles(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("monitoring", "0004_alerts"),
        ("queues", "0010_task_event_held"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
