from django.apps import AppConfig


class QueuesConfig(AppConfig):
    name = "queues"
    verbose_name = "Caption queues"

    def ready(self):
        from django.db.models.signals import post_migrate

        post_migrate.connect(_after_migrate, sender=self)


def _after_migrate(sender, plan=None, **kwargs):
    """After every migrate: the roles get the permissions of every model, those added by later migrations too; the
    pauses kept in Redis before queues migration 0008 are carried into the rows (once per deployment; a flush, which
    sends this signal too without a plan, does not). Data migrations stay free of live code and Redis: what needs
    them runs here."""
    from queues.roles import sync_roles

    sync_roles()
    if plan is not None:
        from queues.fleet.services import redis_pauses_adopt

        redis_pauses_adopt()
