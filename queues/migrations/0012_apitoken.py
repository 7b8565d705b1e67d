import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models

# Admins get the new model's permissions when the roles are synced after the migrate (queues.apps).


class Migration(migrations.Migration):
    dependencies = [
        ("queues", "0011_task_dispatch"),
        ("migration", "0002_roles"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="ApiToken",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(help_text="What uses it, e.g. 'runbook cron on ops-1'.", max_length=100,
                                          unique=True)),
                ("digest", models.CharField(editable=False, max_length=64, unique=True)),
                ("prefix", models.CharField(editable=False, help_text="The token's first characters, to tell tokens "
                                                                      "apart.", max_length=12)),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                ("last_used_at", models.DateTimeField(blank=True, null=True)),
                ("revoked_at", models.DateTimeField(blank=True, null=True)),
                ("user", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="api_tokens",
                                           to=settings.AUTH_USER_MODEL)),
            ],
            options={"verbose_name": "API token", "ordering": ["name"]},
        ),
    ]
