from django.conf import settings
from django.db import migrations


def create_default_pool(apps, schema_editor):
    """The default pool, with the old system's autoscaling variables (settings.DEFAULT_POOL_SEED) when they are set:
    RQ_AUTO_SCALING_ENABLED, RQ_MIN_WORKERS, RQ_MAX_WORKERS, RQ_SCALE_UP/DOWN_THRESHOLD, RQ_SCALE_UP/DOWN_COOLDOWN.
    An existing row is left alone: the admin changes it from then on."""
    WorkerPool = apps.get_model("queues", "WorkerPool")
    seed = {"autoscale": False, "minimum": 2, "maximum": 10, "scale_up_threshold": 100, "scale_down_threshold": 20,
            "scale_up_cooldown": 300, "scale_down_cooldown": 600, **getattr(settings, "DEFAULT_POOL_SEED", {})}
    WorkerPool.objects.get_or_create(
        name="default", defaults={"queues": "urgent high normal low", "desired": seed["minimum"], **seed})


class Migration(migrations.Migration):
    dependencies = [("queues", "0002_fleet")]
    operations = [migrations.RunPython(create_default_pool, migrations.RunPython.noop)]
