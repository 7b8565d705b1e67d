"""django-rq's ``rqworker``, restricted to the portal's worker class so only allow-listed JSON jobs ever run."""

from django.conf import settings
from django.core.management.base import CommandError
from django_rq.management.commands.rqworker import Command as DjangoRQWorkerCommand
from rq.utils import import_attribute

from queues.broker import QUEUE_NAMES
from queues.worker import CaptionWorker


class Command(DjangoRQWorkerCommand):
    help = ("Runs a caption worker on the given queues (default: urgent high normal low, drained in that order). "
            "Only allow-listed callables with JSON-serialised arguments run.")

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.set_defaults(serializer="rq.serializers.JSONSerializer")

    def handle(self, *args, **options):
        worker_class = options.get("worker_class")
        if worker_class:
            try:
                chosen = import_attribute(worker_class)
            except (ImportError, AttributeError, ValueError) as error:
                raise CommandError(f"--worker-class {worker_class!r} cannot be imported: {error}") from None
            if not (isinstance(chosen, type) and issubclass(chosen, CaptionWorker)):
                raise CommandError(f"--worker-class must be queues.worker.CaptionWorker or a subclass of it; "
                                   f"{worker_class!r} would run jobs without the allow-list")
        if options.get("job_class") not in (None, "queues.broker.CaptionJob"):
            raise CommandError("--job-class cannot be changed: caption workers always use queues.broker.CaptionJob")
        if options.get("serializer") not in ("rq.serializers.JSONSerializer", "json"):
            raise CommandError("--serializer cannot be changed: caption jobs are always JSON")
        unknown = [name for name in args if name not in settings.RQ_QUEUES]
        if unknown:
            raise CommandError(f"Unknown queue(s): {', '.join(unknown)}. Queues are {', '.join(QUEUE_NAMES)}.")
        if settings.EMBEDDED_REDIS:
            from portal.embedded_redis import ensure_embedded_running

            ensure_embedded_running(settings.VAR_DIR, settings.EMBEDDED_REDIS_PORT)
        return super().handle(*(args or QUEUE_NAMES), **options)
