
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from queues import broker
from queues.errors import BrokerUnavailable
from queues import control
from queues.fleet.services import (
    FleetError,
    fleet_workers,
    pool_get,
    pool_restart,
    pool_scale,
    processing_set_suspended,
    worker_stop_job,
)
from queues.models import WorkerPool, job_id_for


class Command(BaseCommand):
    help = ("Shows and changes the worker fleet: status | scale POOL N | restart [POOL] | stop-job WORKER JOB | "
            "suspend | resume.")

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        actions.add_parser("status", help="Pools and live workers.")
        scale = actions.add_parser("scale", help="Set a pool's desired number of workers.")
        scale.add_argument("pool")
        scale.add_argument("count", type=int)
        restart = actions.add_parser("restart", help="Gracefully restart the workers of a pool (default: all).")
        restart.add_argument("pool", nargs="?")
        stop_job = actions.add_parser("stop-job", help="Stop the job a worker is running (its task ends FAILED); "
                                                       "refused if the worker is running another job by then.")
        stop_job.add_argument("worker", help="the worker's name, as status lists it")
        stop_job.add_argument("job", help="the job to stop: caption-<task id>, or the task id status shows")
        actions.add_parser("suspend", help="Workers finish their current task and take no new ones.")
        actions.add_parser("resume", help="Workers take tasks again.")

    def handle(self, *args, action, **options):
        try:
            if not broker.ping():
                raise CommandError("Redis is unreachable: the fleet cannot be read or changed")
            getattr(self, f"do_{action.replace('-', '_')}")(**options)
        except FleetError as error:
            raise CommandError(str(error)) from None
        except ValidationError as error:
            raise CommandError(" ".join(" ".join(messages) for messages in error.message_dict.values())) from None
        except BrokerUnavailable as error:
            raise CommandError(f"Redis is unreachable: {error}") from None

    def do_status(self, **options):
        suspended = control.processing_suspended()
        self.stdout.write(f"Processing: {'SUSPENDED' if suspended else 'running'}")
        rows = fleet_workers()
        for pool in WorkerPool.objects.all():
            live = sum(1 for row in rows if row.pool == pool.name and row.alive)
            auto = "on" if pool.autoscale else "off"
            self.stdout.write(f"Pool {pool.name}: {live} running, desired {pool.desired} "
                              f"(min {pool.minimum}, max {pool.maximum}, autoscale {auto}); queues {pool.queues}")
        if not rows:
            self.stdout.write("No workers registered.")
        for row in rows:
            task = f"task {row.task_id} for {row.task_running_seconds:.0f}s" if row.task_id else "-"
            memory = f"{row.memory_bytes / 2**20:.0f} MiB" if row.memory_bytes else "?"
            self.stdout.write(f"  {row.name:<40} {row.host:<16} pid {row.pid or '?':<7} {row.state:<10} {task:<22}"
                              f" done {row.successful} failed {row.failed} mem {memory}")

    def do_scale(self, pool, count, **options):
        pool = pool_scale(pool=pool_get(pool), desired=count, reason="manage.py workers scale")
        self.stdout.write(self.style.SUCCESS(f"Pool {pool.name} now wants {pool.desired} worker(s)."))

    def do_restart(self, pool=None, **options):
        pools = [pool_get(pool)] if pool else list(WorkerPool.objects.all())
        total = sum(pool_restart(pool=item) for item in pools)
        self.stdout.write(self.style.SUCCESS(f"Asked {total} worker(s) to restart after their current task."))

    def do_stop_job(self, worker, job, **options):
        job_id = job_id_for(int(job)) if job.isdigit() else job
        worker_stop_job(worker_name=worker, job_id=job_id)
        self.stdout.write(self.style.SUCCESS(f"Asked worker {worker} to stop {job_id}."))

    def do_suspend(self, **options):
        processing_set_suspended(suspended=True)
        self.stdout.write(self.style.SUCCESS("Processing suspended: workers finish their current task and wait."))

    def do_resume(self, **options):
        processing_set_suspended(suspended=False)
        self.stdout.write(self.style.SUCCESS("Processing resumed."))
