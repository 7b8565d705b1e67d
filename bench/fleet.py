"""The fleet's reaction times, with a real supervisor, real workers and a real Redis.

    python bench/fleet.py [--scales 5] [--kills 5]

scale_up_s: from a pool's desired count being raised to the new worker being registered and alive (goal <= 2 s),
with the supervisor's default settings (a step every 0.5 s). The peer figure, raw_worker_start_s, is how long a bare
``rq worker`` process takes from launch to registration on the same machine: the floor for any supervisor that
starts worker processes.

recovery_s: from SIGKILL of a worker in the middle of a task to the task running again on another worker (goal
<= 60 s; rq by itself notices abandoned jobs in its maintenance pass, every 600 s by default). It includes the
default retry backoff (RQ_RETRY_BACKOFF, 2 s) that protects against tasks that kill every worker. The captioner is a
local HTTP server answering like Ollama after 2 s.
Last line: JSON.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from django.conf import settings  # noqa: E402

import bench.common as common  # noqa: E402
from queues import broker  # noqa: E402
from queues.fleet.services import fleet_workers, pool_scale  # noqa: E402
from queues.models import CaptionTask, TaskStatus, WorkerPool  # noqa: E402
from queues.samples import ensure_samples  # noqa: E402
from queues.services import task_submit  # noqa: E402


def alive_count() -> int:
    return sum(1 for row in fleet_workers() if row.alive and row.pool == "default")


def raw_worker_start(index: int) -> float:
    name = f"raw-bench-{index}"
    code = ("import redis, sys; from rq import Worker, Queue; c = redis.Redis.from_url(%r); "
            "Worker([Queue('bench-raw', connection=c)], connection=c, name=%r).work(burst=False)"
            % (settings.REDIS_URL, name))
    connection = broker.get_connection()
    assert not connection.exists(f"rq:worker:{name}")
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    common.wait_for(lambda: connection.exists(f"rq:worker:{name}"))
    elapsed = time.monotonic() - started
    process.send_signal(signal.SIGTERM)
    process.wait(30)
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, default=5)
    parser.add_argument("--kills", type=int, default=5)
    args = parser.parse_args()

    ollama = common.slow_ollama_server(delay=2.0)
    environment = {**os.environ, "CAPTION_BACKEND": "ollama", "OLLAMA_URL": f"http://127.0.0.1:{ollama.server_port}",
                   "IMAGE_FETCH_ALLOW_PRIVATE": "true"}
    pool = WorkerPool.objects.get(name="default")
    pool = pool_scale(pool=pool, desired=1, adjust_bounds=True)
    supervisor = subprocess.Popen([sys.executable, "manage.py", "runworkers", "--worker-verbosity", "0"],
                                  cwd=settings.BASE_DIR, env=environment, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    try:
        common.wait_for(lambda: alive_count() == 1)
        scale_ups = []
        for step in range(args.scales):
            target = 2 + step
            pool = pool_scale(pool=pool, desired=target, adjust_bounds=True)
            started = time.monotonic()
            common.wait_for(lambda: alive_count() == target)
            scale_ups.append(time.monotonic() - started)
        pool = pool_scale(pool=pool, desired=1, adjust_bounds=True)
        common.wait_for(lambda: alive_count() == 1)
        pool = pool_scale(pool=pool, desired=2, adjust_bounds=True)
        common.wait_for(lambda: alive_count() == 2)

        reference = ensure_samples()[0]
        recoveries = []
        for _ in range(args.kills):
            task = task_submit(image_ref=reference)
            running = common.wait_for(
                lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.PROCESSING).first())
            time.sleep(0.3)
            pid = broker.alive_states([running.worker_name])[running.worker_name]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            common.wait_for(lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.PROCESSING,
                                                        attempts=2).exists())
            recoveries.append(time.monotonic() - killed)
            common.wait_for(
                lambda: CaptionTask.objects.filter(pk=task.pk, status=TaskStatus.COMPLETED).exists())
            common.wait_for(lambda: alive_count() == 2)
        raw_starts = [raw_worker_start(index) for index in range(3)]
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(120)
        ollama.shutdown()
    common.finish({
        "benchmark": "fleet",
        "scale_up_s_median": round(common.median(scale_ups), 3), "scale_up_s_max": round(max(scale_ups), 3),
        "raw_worker_start_s_median": round(common.median(raw_starts), 3),
        "recovery_s_median": round(common.median(recoveries), 3), "recovery_s_max": round(max(recoveries), 3),
        "scales": len(scale_ups), "kills": len(recoveries),
    })


if __name__ == "__main__":
    main()
