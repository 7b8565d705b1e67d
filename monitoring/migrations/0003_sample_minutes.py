from django.db import migrations, models


def hourly_rows_cover_an_hour(apps, schema_editor):
    # Hourly rows written before this field existed were read as 60 minutes; keep their figures unchanged.
    MetricSample = apps.get_model("monitoring", "MetricSample")
    MetricSample.objects.filter(resolution="1h").update(minutes=60)


class Migration(migrations.Migration):

    dependencies = [
        ("monitoring", "0002_sample_processing_count"),
    ]

    operations = [
        migrations.AddField(
            model_name="metricsample",
            name="minutes",
            field=models.PositiveIntegerField(default=1, help_text="Minutes the counts cover (rates divide by this)."),
        ),
        migrations.RunPython(hourly_rows_cover_an_hour, migrations.RunPython.noop),
    ]
