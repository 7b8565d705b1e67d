"""The migration's speed: tasks moved to RQ against raw rq ``enqueue_many``, and the database poller against our RQ
worker, same Redis, same database, same run.

    python bench/migration.py [--n 100000] [--rounds 3] [--tasks 2000]

Migrate: N queued database tasks, then the run's ``migrate`` phase alone (the phases before it marked done): batches
of 1,000 moved by conditional update with the checkpoint, jobs published in one MULTI/EXEC per batch. Raw: N trivial
JSON jobs through ``Queue.enqueue_many`` in pipelines of 1,000 (no database). Rounds alternate; medians compared.
Poller: ``--tasks`` tasks through ``LegacyPoller`` (burst) against the same number through ``CaptionWorker`` (burst),
both with the no-op captioner, in this process. Last line: JSON with ``ratio`` (migrated/s ÷ raw jobs/s; goal >=
1.0) and ``poller_ratio`` (poller tasks/s ÷ RQ worker tasks/s; goal <= 1.0, the RQ worker at least as fast), and
each round's own figures (``ratio_rounds``, ``rq_worker_to_poller_rounds``: RQ worker tasks/s ÷ poller tasks/s).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench.common as common  # noqa: E402
from bench.worker import run_ours as run_rq_worker  # noqa: E402  (the worker benchmark's own measurement)
from django.conf import settings  # noqa: E402
from django.utils import timezone  # noqa: E402
from rq import Queue  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from migration.legacy import LegacyPoller  # noqa: E402
from migration.models import MigrationRun  # noqa: E402
from migration.runs import run_create, run_execute  # noqa: E402
from queues import broker  # noqa: E402
from queues.models import CaptionTask, Dispatch  # noqa: E402
from queues.samples import ensure_samples  # noqa: E402

RAW_QUEUE = "bench-raw"


def reset() -> None:
    broker.get_connection().flushdb()
    CaptionTask.objects.all().delete()
    MigrationRun.objects.all().delete()


def insert(n: int, reference: str, dispatch: str = Dispatch.DATABASE) -> None:
    for start in range(0, n, 10_000):
        count = min(10_000, n - start)
        CaptionTask.objects.insert_new([(reference, "normal", None)] * count, publish_after=timezone.now(),
                                       dispatch=[dispatch] * count)


def run_ours(n: int, reference: str) -> float:
    insert(n, reference)
    run = run_create(user=None, options={"validate_tasks": 0})
    migrate = run.phases.get(name="migrate")
    run.phases.filter(order__lt=migrate.order).update(state="done")
    started = time.perf_counter()
    run = run_execute(run=run, one_phase=True)
    elapsed = time.perf_counter() - started
    assert run.phases.get(name="migrate").state == "done", run.failure_reason
    assert broker.queue_lengths()["normal"] == n
    assert not CaptionTask.objects.filter(dispatch=Dispatch.DATABASE).exists()
    return elapsed


def run_raw(n: int) -> float:
    queue = Queue(RAW_QUEUE, connection=broker.get_connection(), serializer=JSONSerializer)
    started = time.perf_counter()
    for start in range(0, n, 1000):
        queue.enqueue_many([Queue.prepare_data("bench.trivial.noop", args=(index,), job_id=f"raw-{index}")
                            for index in range(start, min(n, start + 1000))])
    elapsed = time.perf_counter() - started
    assert queue.count == n
    return elapsed


def run_poller(n: int, reference: str) -> float:
    insert(n, reference)
    started = time.perf_counter()
    result = LegacyPoller(name="bench-poller", interval=0.01).work(burst=True)
    elapsed = time.perf_counter() - started
    assert result.completed == n
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=2000)
    args = parser.parse_args()
    reference = ensure_samples()[0]
    settings.CAPTION_BACKEND = "noop"
    ours, raw, poller, worker = [], [], [], []
    for _ in range(args.rounds):
        reset()
        raw.append(run_raw(args.n))
        reset()
        ours.append(run_ours(args.n, reference))
    for _ in range(args.rounds):
        reset()
        poller.append(run_poller(args.tasks, reference))
        reset()
        worker.append(run_rq_worker(args.tasks, reference))
    reset()
    ours_s, raw_s = common.median(ours), common.median(raw)
    poller_s, worker_s = common.median(poller), common.median(worker)
    common.finish({
        "benchmark": "migration", "n": args.n, "rounds": args.rounds, "tasks": args.tasks,
        "migrate_s": round(ours_s, 3), "raw_enqueue_s": round(raw_s, 3),
        "migrated_per_s": round(args.n / ours_s), "raw_per_s": round(args.n / raw_s),
        "ratio": round(raw_s / ours_s, 3),
        "poller_per_s": round(args.tasks / poller_s), "rq_worker_per_s": round(args.tasks / worker_s),
        "poller_ratio": round(worker_s / poller_s, 3),
        # Each round's own figures (the two sides back to back): the spread.
        "ratio_rounds": [round(raw_round / ours_round, 3) for raw_round, ours_round in zip(raw, ours)],
        "rq_worker_to_poller_rounds": [round(poller_round / worker_round, 3)
                                       for poller_round, worker_round in zip(poller, worker)],
    })


if __name__ == "__main__":
    main()
