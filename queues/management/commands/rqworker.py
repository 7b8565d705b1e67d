"""django-rq's ``rqworker``, restricted to the portal's worker class so only allow-listed JSON jobs ever run."""

import os
import sys

from django.conf import settings
from django.core.management.base import CommandError
from django_rq.management.commands.rqworker import Command as DjangoRQWorkerCommand
from django_rq.utils import reset_db_connections
from redis.exceptions import ConnectionError
from rq.logutils import setup_loghandlers
from rq.serializers import JSONSerializer
from rq.utils import import_attribute

from queues import broker
from queues.broker import QUEUE_NAMES
from queues.fleet.worker import MAX_SLOTS, WORKER_TTL, CaptionWorker


class Command(DjangoRQWorkerCommand):
    help = ("Runs a caption worker on the given queues (default: urgent high normal low, drained in that order). "
            "Only allow-listed callables with JSON-serialised arguments run.")

    def add_arguments(self, parser):
        super().add_arguments(parser)
        # django-rq's default worker TTL is 420 s: a worker that died idle would stay in rq's list (and rq info) for
        # 8 minutes when nobody unregisters it. Ours renew every few seconds, so a short one costs nothing.
        parser.set_defaults(serializer="rq.serializers.JSONSerializer", worker_ttl=WORKER_TTL)
        parser.add_argument("--slots", type=int, default=1,
                            help=f"Caption slots: jobs this process runs at once, each in a thread of its own "
                                 f"(default 1; at most {MAX_SLOTS}). For captioners that mostly wait on a server.")

    def handle(self, *args, **options):
        worker_class = options.get("worker_class")
        if worker_class:
            try:
                chosen = import_attribute(worker_class)
            except (ImportError, AttributeError, ValueError) as error:
                raise CommandError(f"--worker-class {worker_class!r} cannot be imported: {error}") from None
            if not (isinstance(chosen, type) and issubclass(chosen, CaptionWorker)):
                raise CommandError(f"--worker-class must be queues.fleet.worker.CaptionWorker or a subclass of it; "
                                   f"{worker_class!r} would run jobs without the allow-list")
        if options.get("job_class") not in (None, "queues.broker.CaptionJob"):
            raise CommandError("--job-class cannot be changed: caption workers always use queues.broker.CaptionJob")
        if options.get("queue_class") not in (None, "queues.broker.CaptionQueue"):
            raise CommandError("--queue-class cannot be changed: caption workers always use queues.broker.CaptionQueue")
        if options.get("serializer") not in ("rq.serializers.JSONSerializer", "json"):
            raise CommandError("--serializer cannot be changed: caption jobs are always JSON")
        if not 1 <= options["slots"] <= MAX_SLOTS:
            raise CommandError(f"--slots must be between 1 and {MAX_SLOTS}; got {options['slots']}")
        unknown = [name for name in args if name not in settings.RQ_QUEUES]
        if unknown:
            raise CommandError(f"Unknown queue(s): {', '.join(unknown)}. Queues are {', '.join(QUEUE_NAMES)}.")
        worker_class = chosen if worker_class else CaptionWorker
        # django-rq's handle, with the connection from queues.broker (REDIS_URL or Sentinel, this process' capped
        # pool) instead of one django-rq would build from RQ_QUEUES.
        if options.get("pid"):
            with open(os.path.expanduser(options["pid"]), "w") as pid_file:
                pid_file.write(str(os.getpid()))
        level = {0: "WARNING", 1: "INFO"}.get(options["verbosity"], "DEBUG")
        setup_loghandlers(level)
        try:
            connection = broker.get_connection()
            worker = worker_class(
                [broker.get_queue(name, connection) for name in (args or QUEUE_NAMES)], connection=connection,
                name=options["name"], worker_ttl=options["worker_ttl"], serializer=JSONSerializer,
                job_class=broker.CaptionJob, queue_class=broker.CaptionQueue, slots=options["slots"],
            )
            reset_db_connections()  # no database connection crosses a fork
            worker.work(burst=options.get("burst", False), with_scheduler=options.get("with_scheduler", False),
                        logging_level=level, max_jobs=options["max_jobs"], max_idle_time=options["max_idle_time"])
        except (ConnectionError, broker.BrokerUnavailable) as error:
            self.stderr.write(f"Redis is unreachable at {settings.REDIS_URL}: {error}")
            sys.exit(1)
