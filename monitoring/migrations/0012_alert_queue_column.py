"""The alert's queue label in an indexed column of its own (the history's ?label=queue= filter), copied from the
labels of the rows already written. The copy is this migration's own (no model method): the rule it applies is
fixed here, whatever the model does later."""

from django.db import migrations, models

QUEUE_MAX = 100
BATCH = 2000


def copy_queue_labels(apps, schema_editor):
    Alert = apps.get_model("monitoring", "Alert")
    changed = []
    for alert in Alert.objects.filter(labels__has_key="queue").only("pk", "labels").iterator(chunk_size=BATCH):
        value = alert.labels.get("queue")
        if isinstance(value, str) and 0 < len(value) <= QUEUE_MAX:
            alert.queue = value
            changed.append(alert)
        if len(changed) >= BATCH:
            Alert.objects.bulk_update(changed, ["queue"])
            changed = []
    Alert.objects.bulk_update(changed, ["queue"])


class Migration(migrations.Migration):

    dependencies = [
        ("monitoring", "0011_alert_unique_occurrence"),
    ]

    operations = [
        migrations.AddField(
            model_name="alert",
            name="queue",
            field=models.CharField(blank=True, default="", editable=False, help_text=(
                "The labels' queue, copied on save: the history's ?label=queue= filter reads it through an index."),
                max_length=100),
        ),
        migrations.RunPython(copy_queue_labels, migrations.RunPython.noop),
        migrations.AddIndex(
            model_name="alert",
            index=models.Index(fields=["queue", "-started_at"], name="alert_queue_started_idx"),
        ),
    ]
