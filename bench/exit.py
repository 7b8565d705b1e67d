"""Stop latency: how long an idle worker takes to exit after SIGTERM, ours against raw rq's SimpleWorker, same run.

    python bench/exit.py [--n 20] [--burners 2] [--cap 90]

Each round starts one idle worker of each kind on the same Redis: ours is ``manage.py rqworker`` (one slot, and
with ``--slots 8`` in every other round), raw rq's is a ``python -c`` process running ``SimpleWorker.work()``. Once
both are registered and subscribed to their command channels (idle in their dequeue loop), both get SIGTERM at the
same moment and the time to each one's exit is measured, up to ``--cap`` seconds (a worker still there is
SIGKILLed and counted at the cap). ``--burners`` CPU-burning processes run beside them, as on a loaded host: rq's
own teardown can then wait out its 60 s command-listener poll (rq 2.12 with redis-py 8.2).

Last line: JSON with the median, p95 and slowest exit of each, how many raw exits took longer than 5 s, and
``ratio`` = raw slowest / ours slowest.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench.common as common  # noqa: E402

from queues import broker  # noqa: E402

RAW = ("import sys, redis; from rq import SimpleWorker, Queue; from rq.serializers import JSONSerializer; "
       "c = redis.Redis.from_url(sys.argv[1]); "
       "SimpleWorker([Queue('bench-raw', connection=c, serializer=JSONSerializer)], connection=c, name=sys.argv[2], "
       "serializer=JSONSerializer).work(logging_level='WARNING')")


def listening(connection, names: list[str]) -> bool:
    return all(count == 1 for _, count in connection.pubsub_numsub(*(f"rq:pubsub:{name}" for name in names)))


def exit_times(processes: dict, cap: float) -> dict[str, float]:
    started = time.monotonic()
    for process in processes.values():
        process.send_signal(signal.SIGTERM)
    times = {}
    while len(times) < len(processes) and time.monotonic() - started < cap:
        for name, process in processes.items():
            if name not in times and process.poll() is not None:
                times[name] = time.monotonic() - started
        time.sleep(0.005)
    for name, process in processes.items():
        if name not in times:
            process.kill()
            process.wait()
            times[name] = cap
    return times


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median_s": round(statistics.median(ordered), 3),
            "p95_s": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 3),
            "slowest_s": round(ordered[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="rounds (one SIGTERM to each kind per round)")
    parser.add_argument("--burners", type=int, default=2, help="CPU-burning processes beside the workers")
    parser.add_argument("--cap", type=float, default=90, help="seconds before a worker is SIGKILLed")
    options = parser.parse_args()
    connection = broker.get_connection()
    environment = {**os.environ}
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(options.burners)]
    ours, raw = [], []
    try:
        for round_number in range(options.n):
            slots = "8" if round_number % 2 else "1"
            names = {"ours": f"bench.ours.{round_number}", "raw": f"bench.raw.{round_number}"}
            processes = {
                "ours": subprocess.Popen([sys.executable, "manage.py", "rqworker", "--name", names["ours"],
                                          "--slots", slots, "--verbosity", "0"], cwd=common.ROOT, env=environment),
                "raw": subprocess.Popen([sys.executable, "-c", RAW, os.environ["REDIS_URL"], names["raw"]],
                                       env=environment),
            }
            try:
                common.wait_for(lambda: listening(connection, list(names.values())), timeout=120)
            except TimeoutError:
                for process in processes.values():
                    process.kill()
                    process.wait()
                raise
            times = exit_times(processes, options.cap)
            ours.append(times["ours"])
            raw.append(times["raw"])
            print(f"round {round_number + 1}/{options.n}: ours {times['ours']:.2f} s ({slots} slot(s)), "
                  f"raw rq {times['raw']:.2f} s", flush=True)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    import redis
    import rq

    print(json.dumps({"benchmark": "exit", "n": options.n, "burners": options.burners,
                      "ours": summary(ours), "raw": summary(raw),
                      "raw_over_5_s": sum(1 for value in raw if value > 5),
                      "ratio": round(max(raw) / max(ours), 2),
                      "versions": {"rq": rq.__version__, "redis_py": redis.__version__},
                      "machine": common.machine()}))


if __name__ == "__main__":
    main()
