from django.db import migrations


def seed(apps, schema_editor):
    from monitoring.alert_rules import escalation_seed, rules_seed
    from queues.roles import sync_roles

    rules_seed(apps)
    escalation_seed(apps)
    sync_roles(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("monitoring", "0004_alerts"),
        ("queues", "0010_task_event_held"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
