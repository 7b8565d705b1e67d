"""One worker process: our full caption path against raw rq's SimpleWorker on trivial jobs, same Redis, same run.

    python bench/worker.py [--n 2000] [--rounds 3] [--pickups 100]

Throughput: N tasks through ``CaptionWorker`` with the no-op captioner (claim by conditional update, attempt and
completion rows, status updates) against N trivial JSON jobs through rq's ``SimpleWorker``; both in burst mode in
this process, logging at WARNING. Pickup latency: an idle worker process (``manage.py rqworker``) and, one at a time,
a task submitted (row committed, job published); latency = the worker's recorded start - the moment submission
began. Raw rq's pickup is measured the same way with an idle SimpleWorker process. Last line: JSON with ``ratio``
(ours / raw tasks per second, goal >= 0.7) and pickup p50/p95 in ms (goal p95 <= 20 ms).
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench.common as common  # noqa: E402
from django.conf import settings  # noqa: E402
from django.utils import timezone  # noqa: E402
from rq import Queue, SimpleWorker  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from queues import broker  # noqa: E402
from queues.models import CaptionTask, TaskStatus  # noqa: E402
from queues.samples import ensure_samples  # noqa: E402
from queues.services import TaskSpec, task_submit, tasks_submit_many  # noqa: E402
from queues.worker import CaptionWorker  # noqa: E402

RAW_QUEUE = "bench-raw"


def reset():
    broker.get_connection().flushdb()
    CaptionTask.objects.all().delete()


def run_ours(n: int, reference: str) -> float:
    tasks_submit_many(specs=[TaskSpec(reference) for _ in range(n)])
    worker = CaptionWorker(broker.get_queues(), connection=broker.get_connection())
    started = time.perf_counter()
    worker.work(max_jobs=n, logging_level="WARNING")
    elapsed = time.perf_counter() - started
    assert CaptionTask.objects.filter(status=TaskStatus.COMPLETED).count() == n
    return elapsed


def run_raw(n: int) -> float:
    connection = broker.get_connection()
    queue = Queue(RAW_QUEUE, connection=connection, serializer=JSONSerializer)
    queue.enqueue_many([Queue.prepare_data("bench.trivial.noop", args=(index,)) for index in range(n)])
    worker = SimpleWorker([queue], connection=connection, serializer=JSONSerializer)
    started = time.perf_counter()
    worker.work(max_jobs=n, logging_level="WARNING")
    elapsed = time.perf_counter() - started
    assert queue.finished_job_registry.get_job_count(cleanup=False) == n
    return elapsed


def child_environment() -> dict:
    return {**os.environ, "CAPTION_BACKEND": "local", "PYTHONPATH": str(settings.BASE_DIR)}


def pickups_ours(count: int, reference: str) -> list[float]:
    worker = subprocess.Popen([sys.executable, "manage.py", "rqworker", "--verbosity", "0"], cwd=settings.BASE_DIR,
                              env=child_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        latencies = []
        for index in range(count + 3):
            time.sleep(0.05)  # let the worker go idle (blocked in BLPOP) again
            begun = timezone.now()
            task = task_submit(image_ref=reference)
            started_at = common.wait_for(lambda: CaptionTask.objects.filter(pk=task.pk)
                                         .values_list("started_at", flat=True).first(), timeout=10, interval=0.0005)
            if index >= 3:  # the first pickups include the worker's start-up
                latencies.append((started_at - begun).total_seconds() * 1000)
        return latencies
    finally:
        worker.terminate()
        worker.wait(30)


def pickups_raw(count: int) -> list[float]:
    code = ("import sys; sys.path.insert(0, %r); import redis; from rq import SimpleWorker, Queue; "
            "from rq.serializers import JSONSerializer; c = redis.Redis.from_url(%r); "
            "SimpleWorker([Queue(%r, connection=c, serializer=JSONSerializer)], connection=c, "
            "serializer=JSONSerializer).work(logging_level='WARNING')"
            % (str(settings.BASE_DIR), settings.REDIS_URL, RAW_QUEUE))
    worker = subprocess.Popen([sys.executable, "-c", code], env=child_environment(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    connection = broker.get_connection()
    queue = Queue(RAW_QUEUE, connection=connection, serializer=JSONSerializer)
    try:
        latencies = []
        for index in range(count + 3):
            time.sleep(0.05)
            begun = timezone.now()
            job = queue.enqueue("bench.trivial.noop", index)

            def started():
                value = connection.hget(job.key, "started_at")
                return value.decode() if value else None

            started_at = common.wait_for(started, timeout=10, interval=0.0005)
            if index >= 3:
                from rq.utils import utcparse

                started_time = utcparse(started_at).replace(tzinfo=begun.tzinfo)
                latencies.append((started_time - begun).total_seconds() * 1000)
        return latencies
    finally:
        worker.terminate()
        worker.wait(30)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pickups", type=int, default=100)
    args = parser.parse_args()
    reference = ensure_samples()[0]
    settings.CAPTION_BACKEND = "noop"
    ours, raw = [], []
    for _ in range(args.rounds):
        reset()
        raw.append(run_raw(args.n))
        reset()
        ours.append(run_ours(args.n, reference))
    reset()
    ours_pickup = pickups_ours(args.pickups, reference)
    raw_pickup = pickups_raw(args.pickups)
    reset()
    ours_s, raw_s = common.median(ours), common.median(raw)
    common.finish({
        "benchmark": "worker", "n": args.n, "rounds": args.rounds,
        "ours_per_s": round(args.n / ours_s, 1), "raw_per_s": round(args.n / raw_s, 1),
        "ratio": round(raw_s / ours_s, 3),
        "pickup_ms_p50": round(common.percentile(ours_pickup, 0.5), 2),
        "pickup_ms_p95": round(common.percentile(ours_pickup, 0.95), 2),
        "raw_pickup_ms_p50": round(common.percentile(raw_pickup, 0.5), 2),
        "raw_pickup_ms_p95": round(common.percentile(raw_pickup, 0.95), 2),
        "pickups": len(ours_pickup),
    })


if __name__ == "__main__":
    main()
