from django.db import migrations, models
from django.db.models import Count, Min


def drop_duplicates(apps, schema_editor):
    """Rows written twice for one occurrence (two Alertmanager peers at once): the first stays, the others go with
    their timelines."""
    alert_model = apps.get_model("monitoring", "Alert")
    duplicated = (alert_model.objects.values("source", "fingerprint", "started_at").order_by()
                  .annotate(rows=Count("id"), first=Min("id")).filter(rows__gt=1))
    for group in duplicated:
        alert_model.objects.filter(source=group["source"], fingerprint=group["fingerprint"],
                                   started_at=group["started_at"]).exclude(pk=group["first"]).delete()


class Migration(migrations.Migration):

    dependencies = [
        ("monitoring", "0010_alert_escalations_per_policy"),
    ]

    operations = [
        migrations.RunPython(drop_duplicates, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name="alert",
            constraint=models.UniqueConstraint(fields=("source", "fingerprint", "started_at"),
                                               name="alert_unique_occurrence"),
        ),
    ]
