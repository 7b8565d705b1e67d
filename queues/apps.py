from django.apps import AppConfig

# The migration after which the pauses kept in Redis are carried into the rows (fleet.services.redis_pauses_adopt).
PAUSES_INTO_ROWS = ("queues", "0008_task_claims_queue_state")


class QueuesConfig(AppConfig):
    name = "queues"
    verbose_name = "Caption queues"

    def ready(self):
        from django.db.models.signals import post_migrate

        post_migrate.connect(_after_migrate, sender=self)


def _after_migrate(sender, plan=None, **kwargs):
    """After every migrate: the roles get the permissions of every model, those added by later migrations too. After
    the migrate that applied PAUSES_INTO_ROWS: the pauses kept in Redis before it are carried into the rows. (Data
    migrations stay free of live code and Redis: what needs them runs here.)"""
    from queues.roles import sync_roles

    sync_roles()
    applied = {(migration.app_label, migration.name) for migration, backwards in plan or () if not backwards}
    if PAUSES_INTO_ROWS in applied:
        from queues.fleet.services import redis_pauses_adopt

        redis_pauses_adopt()
