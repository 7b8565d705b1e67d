from django.apps import AppConfig


class QueuesConfig(AppConfig):
    name = "queues"
    verbose_name = "Caption queues"

    def ready(self):
        from django.db.models.signals import post_migrate

        post_migrate.connect(_sync_roles, sender=self)


def _sync_roles(sender, **kwargs):
    # Models added by later migrations get their permissions into the roles too.
    from queues.roles import sync_roles

    sync_roles()
