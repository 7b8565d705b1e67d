import logging

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from portal.logs import announce
from queues import broker
from queues.fleet.services import pool_scale
from queues.fleet.supervisor import Supervisor
from queues.models import WorkerPool

logger = logging.getLogger("queues.supervisor")


class Command(BaseCommand):
    help = ("Supervises this host's caption workers: keeps each pool's desired number running (shared with the "
            "supervisors on other hosts), restarts workers that die, recovers their tasks, and autoscales. "
            "SIGTERM or Ctrl-C stops the workers gracefully (each finishes its current task) and exits.")

    def add_arguments(self, parser):
        parser.add_argument("--pool", action="append", dest="pools",
                            help="Only supervise this pool (repeat for several). Default: every pool.")
        parser.add_argument("--interval", type=float, default=0.5, help="Seconds between reconcile steps.")
        parser.add_argument("--lease-ttl", type=float, default=10.0,
                            help="Seconds before a dead supervisor's workers are taken over by the others.")
        parser.add_argument("--reconcile-interval", type=float, default=5.0,
                            help="Seconds between passes that recover tasks of dead workers and lost jobs.")
        parser.add_argument("--autoscale-interval", type=float, default=2.0)
        parser.add_argument("--worker-verbosity", type=int, default=1, choices=[0, 1, 2],
                            help="Log level of the workers (0 warnings, 1 each job, 2 debug).")
        parser.add_argument("--no-workers", action="store_false", dest="run_workers",
                            help="Start no workers: only the fleet's duties (relay, reconciler, autoscaler), for "
                                 "clusters whose own scaler runs the workers (deploy/kubernetes).")

    def handle(self, *args, pools, interval, lease_ttl, reconcile_interval, autoscale_interval, worker_verbosity,
               run_workers=True, **options):
        logging.getLogger("queues").setLevel(logging.INFO)
        for name, value in (("--interval", interval), ("--lease-ttl", lease_ttl),
                            ("--reconcile-interval", reconcile_interval), ("--autoscale-interval", autoscale_interval)):
            if value <= 0:
                raise CommandError(f"{name} must be a positive number of seconds")
        if lease_ttl < 4 * interval:
            raise CommandError("--lease-ttl must be at least four times --interval, or leases expire between renewals")
        if pools:
            unknown = sorted(set(pools) - set(WorkerPool.objects.values_list("name", flat=True)))
            if unknown:
                raise CommandError(f"Unknown pool(s): {', '.join(unknown)}")
        if not broker.ping():
            raise CommandError(f"Redis is unreachable at {settings.REDIS_URL}; start it (or set REDIS_URL) first")
        if settings.RQ_WORKER_COUNT is not None:
            self._apply_worker_count(settings.RQ_WORKER_COUNT)
        supervisor = Supervisor(pool_names=pools, interval=interval, lease_ttl=lease_ttl,
                                reconcile_interval=reconcile_interval, autoscale_interval=autoscale_interval,
                                worker_verbosity=worker_verbosity, run_workers=run_workers)
        serving = ("no workers: the fleet's duties only" if not run_workers else
                   "pools " + ", ".join(pools) if pools else "all pools")
        announce(self, logger, f"Supervisor {supervisor.id} running ({serving}); Ctrl-C stops it.")
        supervisor.run()
        announce(self, logger, "Supervisor stopped; its workers have exited.")

    def _apply_worker_count(self, count: int) -> None:
        """RQ_WORKER_COUNT, the old system's worker count: each start sets the default pool to it (the emergency
        step of its runbook: export RQ_WORKER_COUNT=8, restart), widening the pool's bounds if it must."""
        pool = WorkerPool.objects.filter(name="default").first()
        if pool is None:
            raise CommandError("RQ_WORKER_COUNT is set but there is no pool named 'default'; run migrate first")
        if pool.desired != count:
            previous = pool.desired
            pool_scale(pool=pool, desired=count, adjust_bounds=True, reason="RQ_WORKER_COUNT at supervisor start")
            announce(self, logger, f"RQ_WORKER_COUNT={count}: pool 'default' set from {previous} to {count} "
                                   "worker(s) (unset it to leave the count to the admin and the autoscaler)")
