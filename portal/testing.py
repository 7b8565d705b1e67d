"""``python -m portal.testing [pytest args]``: the test command's second half (``dev.py test`` runs it).

Starts throw-away real Redis servers on free loopback ports (unless TEST_REDIS_URL names one to use), points
REDIS_URL at them, runs pytest and stops the servers. pytest's exit code is returned, so no tests run (exit code 5)
or any failure fails the command.

The suite runs in ``TEST_PROCESSES`` pytest-xdist workers (default: 3, or 1 on a single CPU), each with a Redis
server of its own (``TEST_REDIS_URLS``; tests/conftest.py points each worker at its own, or at its own database
number of TEST_REDIS_URL) and a database of its own (pytest-django's per-worker suffix). Most of the suite's time is
spent waiting on real processes (timeouts, leases, captions that take a while), so three workers cut it by a third
even on two cores. ``TEST_PROCESSES=1`` (or ``-n`` given explicitly, or ``-p no:xdist``) runs it as one process.

Tests marked ``alone`` measure timings under a load they set up themselves (the exit drill's two CPU burners): they
run afterwards, in a second pytest run of one process, so the rest of the suite is not part of their load. A run
whose selection holds no test of one of the two halves counts only the other (pytest's "no tests ran" is an error
only when neither ran any). An explicit ``-m`` runs one pytest as asked.
"""

import os
import subprocess
import sys
import tempfile

from portal.embedded_redis import RedisServer, free_port


def main(argv: list[str]) -> int:
    environment = dict(os.environ)
    environment.setdefault("IMAGE_FETCH_ALLOW_PRIVATE", "true")
    environment.setdefault("NOTIFY_ALLOW_PRIVATE", "true")  # the tests' receivers listen on 127.0.0.1
    environment.setdefault("PORTAL_LOCAL", "true")
    environment.pop("RQ_REDIS_URL", None)
    processes = int(environment.get("TEST_PROCESSES") or (3 if (os.cpu_count() or 1) > 1 else 1))
    explicit = any(arg == "-n" or arg.startswith("--numprocesses") or arg.startswith("-n") and arg[2:].isdigit()
                   or arg == "no:xdist" for arg in argv)
    if processes > 1 and not explicit:
        # worksteal: each worker starts with an even share of the tests, and one that runs out takes half of what
        # the busiest has left. xdist's default (load) hands out runs of consecutive tests, so the drills of one
        # file (30 to 95 s each) could queue up on one worker while the others sat idle at the end.
        parallel = ["-n", str(processes), "--dist", "worksteal"]
    else:
        processes, parallel = 1, []
    if any(arg == "-m" or arg.startswith("-m") and len(arg) > 2 for arg in argv):
        runs = [[*parallel, *argv]]
    else:
        runs = [[*parallel, "-m", "not alone", *argv], ["-p", "no:xdist", "-m", "alone", *argv]]
    with tempfile.TemporaryDirectory(prefix="portal-test-") as directory:
        environment.setdefault("PORTAL_VAR_DIR", os.path.join(directory, "var"))
        servers = []
        if environment.get("TEST_REDIS_URL"):
            base = environment["TEST_REDIS_URL"].rstrip("/")
            base = base.rsplit("/", 1)[0] if base.rsplit("/", 1)[-1].isdigit() else base
            urls = [f"{base}/{index}" for index in range(processes)]
        else:
            servers = [RedisServer(os.path.join(directory, f"redis-{index}"), port=free_port(),
                                   appendonly=False).start() for index in range(processes)]
            urls = [server.url for server in servers]
            print(f"Test Redis: {', '.join(urls)} ({servers[0].command()[0]})", flush=True)
        environment["REDIS_URL"] = urls[0]
        environment["TEST_REDIS_URLS"] = ",".join(urls)
        try:
            codes = []
            for arguments in runs:
                if len(runs) > 1:
                    print(f"=== pytest {' '.join(arguments[:len(arguments) - len(argv)])} ===", flush=True)
                codes.append(subprocess.call([sys.executable, "-m", "pytest", *arguments], env=environment))
            return combined(codes)
        finally:
            for server in servers:
                server.stop()


NO_TESTS = 5  # pytest's exit code when the selection held no test


def combined(codes: list[int]) -> int:
    """One exit code for the runs: the first failure's; "no tests ran" only when no run ran any."""
    failures = [code for code in codes if code not in (0, NO_TESTS)]
    if failures:
        return failures[0]
    return 0 if 0 in codes else NO_TESTS


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
