from django.db import migrations


def create_row(apps, schema_editor):
    """The dispatch mode row, from the old system's variables as they are set when the portal is installed."""
    from django.conf import settings

    system_mode = apps.get_model("migration", "SystemMode")
    mode = "legacy" if not settings.RQ_ENABLED else ("hybrid" if settings.RQ_HYBRID_MODE else "rq")
    system_mode.objects.get_or_create(pk=1, defaults={
        "mode": mode, "hybrid_rq_percent": settings.RQ_HYBRID_RQ_PERCENT,
        "fallback_enabled": settings.RQ_FALLBACK_ENABLED, "fallback_timeout": settings.RQ_FALLBACK_TIMEOUT})


class Migration(migrations.Migration):
    dependencies = [("migration", "0002_roles")]
    operations = [migrations.RunPython(create_row, migrations.RunPython.noop)]
