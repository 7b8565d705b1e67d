import pytest


@pytest.fixture
def seeded_alert_rules(django_db_blocker):
    """The migration's alert rules and escalation policy (transactional tests empty the tables after each test)."""
    from django.apps import apps

    from monitoring.alert_rules import escalation_seed, rules_seed

    rules_seed(apps)
    escalation_seed(apps)
