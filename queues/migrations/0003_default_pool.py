from django.db import migrations


def create_default_pool(apps, schema_editor):
    WorkerPool = apps.get_model("queues", "WorkerPool")
    WorkerPool.objects.get_or_create(
        name="default",
        defaults={"queues": "urgent high normal low", "desired": 2, "minimum": 2, "maximum": 10, "autoscale": False,
                  "scale_up_threshold": 100, "scale_down_threshold": 20, "scale_up_cooldown": 300,
                  "scale_down_cooldown": 600},
    )


class Migration(migrations.Migration):
    dependencies = [("queues", "0002_fleet")]
    operations = [migrations.RunPython(create_default_pool, migrations.RunPython.noop)]
