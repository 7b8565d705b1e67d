from django.db import migrations

# The rule as it was added (issue: who watches the watchers). Written out here, not read from the rule catalogue, so
# that later edits of the catalogue do not change what this migration did.
RULE = dict(
    name="monitoring-stale", title="The portal's sampler or alert evaluator has gone silent",
    signal="monitoring_silent", comparison=">=", threshold=3, for_seconds=0, severity="error",
    component="monitoring", labels={},
    runbook="Start the one that is silent (its health component names it): `manage.py run_sampler` writes the "
            "per-minute samples the window rules read, `manage.py evaluate_alerts` judges the rules and sends the "
            "notifications. While the sampler is silent the window rules cannot fire; while the evaluator is, only "
            "this rule (judged by the sampler) can.")
INHIBITED_BY = ["redis-unreachable", "database-unreachable"]


def seed(apps, schema_editor):
    rule_model = apps.get_model("monitoring", "AlertRule")
    values = dict(RULE)
    rule, created = rule_model.objects.get_or_create(name=values.pop("name"), defaults=values)
    if created:
        rule.inhibited_by.set(rule_model.objects.filter(name__in=INHIBITED_BY))


def unseed(apps, schema_editor):
    apps.get_model("monitoring", "AlertRule").objects.filter(name=RULE["name"]).delete()


class Migration(migrations.Migration):
    dependencies = [("monitoring", "0008_monitor_pass")]
    operations = [migrations.RunPython(seed, unseed)]
