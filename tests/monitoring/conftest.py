import pytest


@pytest.fixture
def seeded_alert_rules(django_db_blocker):
    """The migrations' alert rules and escalation policy (transactional tests empty the tables after each test)."""
    from tests.conftest import alert_rules_seed

    alert_rules_seed()
