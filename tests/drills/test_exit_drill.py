"""Drill: an idle worker leaves within seconds of a stop signal, however loaded the machine.

Every retire, scale-down, hand-over, slot change and deploy waits for a worker to exit; one that lingers holds its
pool's lease and its capacity. rq's command listener used to turn a lost race at teardown into a 60 s wait (its
``unsubscribe()`` sent UNSUBSCRIBE before stopping the listener thread, and redis-py 8.2's ``stop()`` joins that thread
without a limit): two CPU burners beside the workers made it likely, so the drill runs with two.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from queues import broker
from tests.processes import start_command, stop_process, wait_for

# alone: its load is the two CPU burners the issue names, not the rest of the suite beside it (portal.testing runs it
# after the others, by itself).
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.alone]

SIGTERMS = 50  # half to one-slot workers, half to 8-slot workers
AT_ONCE = 5  # workers started, then signalled, together
SLOWEST_ALLOWED = 3.0  # seconds from SIGTERM to exit


@pytest.fixture
def cpu_burners():
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield burners
    for burner in burners:
        stop_process(burner, grace=1, sig=signal.SIGKILL)


def start_worker(name: str, slots: int) -> subprocess.Popen:
    return start_command("rqworker", "urgent", "high", "normal", "low", "--name", name, "--slots", str(slots),
                         "--verbosity", "0")


def listening(redis, names: list[str]) -> bool:
    """Each worker is registered and its command listener subscribed: it is idle in its dequeue loop."""
    channels = redis.pubsub_numsub(*(f"rq:pubsub:{name}" for name in names))
    return all(count == 1 for _, count in channels)


def test_fifty_sigterms_to_idle_workers_each_exit_within_three_seconds_beside_two_cpu_burners(redis, cpu_burners):
    exits: list[tuple[str, float]] = []
    for round_number in range(SIGTERMS // AT_ONCE):
        slots = 1 if round_number % 2 == 0 else 8
        names = [f"drill.{round_number}.{index}" for index in range(AT_ONCE)]
        workers = {name: start_worker(name, slots) for name in names}
        try:
            wait_for(lambda: listening(redis, names) or any(w.poll() is not None for w in workers.values()), 60,
                     "the workers to start listening")
            early = [name for name, worker in workers.items() if worker.poll() is not None]
            assert not early, f"exited before the signal: {early}"
            signalled = time.monotonic()
            for worker in workers.values():
                worker.send_signal(signal.SIGTERM)
            waiting = dict(workers)
            while waiting and time.monotonic() - signalled < 30:
                for name, worker in list(waiting.items()):
                    if worker.poll() is not None:
                        exits.append((f"{name} ({slots} slot{'s' if slots > 1 else ''})",
                                      time.monotonic() - signalled))
                        del waiting[name]
                time.sleep(0.01)
            for name in waiting:
                exits.append((f"{name} ({slots} slots)", float("inf")))
            failed = {name: worker.returncode for name, worker in workers.items() if worker.returncode not in (0, None)}
            assert not failed, f"a stop is not a failure: exit codes {failed}"
        finally:
            for worker in workers.values():
                stop_process(worker, grace=0.5)  # prints what it wrote
    slowest = max(exits, key=lambda exit: exit[1])
    figures = {"sigterms": len(exits), "slowest_exit_s": round(slowest[1], 3), "slowest_worker": slowest[0],
               "median_exit_s": round(sorted(seconds for _, seconds in exits)[len(exits) // 2], 3)}
    print(json.dumps(figures))
    assert len(exits) == SIGTERMS
    assert slowest[1] < SLOWEST_ALLOWED, f"the slowest idle worker took {slowest[1]:.2f} s to exit: {figures}"
    assert broker.get_connection().smembers("rq:workers") == set(), "each one said it was gone"
