from django.db import migrations

# The roles were synced here; they are synced after every migrate now (queues.apps), so this does nothing.


class Migration(migrations.Migration):
    dependencies = [
        ("migration", "0001_initial"),
        ("queues", "0011_task_dispatch"),
        ("monitoring", "0006_alert_escalation_and_resolutions"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]
    operations = []
