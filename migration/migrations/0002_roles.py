from django.db import migrations


def roles(apps, schema_editor):
    from queues.roles import sync_roles

    sync_roles(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("migration", "0001_initial"),
        ("queues", "0011_task_dispatch"),
        ("monitoring", "0006_alert_escalation_and_resolutions"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]
    operations = [migrations.RunPython(roles, migrations.RunPython.noop)]
