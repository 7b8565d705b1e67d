from django.db import migrations, models


class Migration(migrations.Migration):
    """The database poller claims the highest priority first: its claim's index gains the priority."""

    dependencies = [
        ("queues", "0017_audit_correlation_index"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="captiontask",
            index=models.Index(fields=["dispatch", "status", "priority", "publish_after"],
                               name="task_dispatch_priority_idx"),
        ),
        migrations.RemoveIndex(model_name="captiontask", name="task_dispatch_idx"),
    ]
