"""Durable bulk submission (rows + publish) against raw rq ``Queue.enqueue_many`` on the same Redis.

    python bench/submit.py [--n 20000] [--rounds 3]

Ours: ``tasks_submit_many`` — validation, rows written in batches of 1,000, one Redis pipeline per batch, rows
marked published. Raw: one ``enqueue_many`` call of N trivial JSON jobs (no database). Rounds alternate and the
median of each side is compared. Last line: JSON with ``ratio`` = our tasks/s ÷ raw jobs/s (goal >= 0.95 on SQLite,
>= 0.8 on MariaDB) and ``ratio_rounds``, each round's own.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench.common as common  # noqa: F401  (configures Django, Redis, the database)
from django.db import connection
from rq import Queue
from rq.serializers import JSONSerializer

from queues import broker
from queues.models import CaptionTask
from queues.samples import ensure_samples
from queues.services import TaskSpec, tasks_submit_many


def run_ours(n: int, references: list[str]) -> float:
    specs = [TaskSpec(image_ref=references[index % len(references)]) for index in range(n)]
    started = time.perf_counter()
    result = tasks_submit_many(specs=specs)
    elapsed = time.perf_counter() - started
    assert result.created_count == n
    assert CaptionTask.objects.filter(published_at__isnull=True).count() == 0
    assert broker.queue_lengths()["normal"] == n
    return elapsed


def run_raw(n: int) -> float:
    queue = Queue("bench-raw", connection=broker.get_connection(), serializer=JSONSerializer)
    started = time.perf_counter()
    queue.enqueue_many([Queue.prepare_data("bench.trivial.noop", args=(index,), job_id=f"raw-{index}")
                        for index in range(n)])
    elapsed = time.perf_counter() - started
    assert queue.count == n
    return elapsed


def reset() -> None:
    broker.get_connection().flushdb()
    CaptionTask.objects.all().delete()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM") if connection.vendor == "sqlite" else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    references = ensure_samples()
    ours, raw = [], []
    for _ in range(args.rounds):
        reset()
        raw.append(run_raw(args.n))
        reset()
        ours.append(run_ours(args.n, references))
    reset()
    ours_s, raw_s = common.median(ours), common.median(raw)
    common.finish({
        "benchmark": "submit", "n": args.n, "rounds": args.rounds,
        "ours_s": round(ours_s, 3), "raw_s": round(raw_s, 3),
        "ours_per_s": round(args.n / ours_s), "raw_per_s": round(args.n / raw_s),
        "ratio": round(raw_s / ours_s, 3),
        # Each round's own ratio (raw then ours, back to back): the spread.
        "ratio_rounds": [round(raw_round / ours_round, 3) for raw_round, ours_round in zip(raw, ours)],
    })


if __name__ == "__main__":
    main()
