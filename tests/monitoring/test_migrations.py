"""Data migrations of the monitoring app, run forward on rows written at the schema before them."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

pytestmark = pytest.mark.django_db(transaction=True)


def migrate(target):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate([target])
    return executor.loader.project_state([target]).apps


def test_the_queue_column_is_copied_from_the_labels_of_alerts_already_written():
    latest = MigrationExecutor(connection).loader.graph.leaf_nodes("monitoring")[0]
    before = migrate(("monitoring", "0011_alert_unique_occurrence"))
    try:
        Alert = before.get_model("monitoring", "Alert")
        now = timezone.now()
        written = {}
        for name, labels in {"normal": {"queue": "normal", "severity": "critical"}, "none": {"severity": "info"},
                             "long": {"queue": "q" * 150}, "number": {"queue": 3}}.items():
            written[name] = Alert.objects.create(name=name, fingerprint=name, summary=name, labels=labels,
                                                 started_at=now, holding_since=now, last_seen_at=now).pk
        after = migrate(("monitoring", "0012_alert_queue_column"))
        copied = dict(after.get_model("monitoring", "Alert").objects.values_list("name", "queue"))
        assert copied == {"normal": "normal", "none": "", "long": "", "number": ""}
    finally:
        migrate(latest)
