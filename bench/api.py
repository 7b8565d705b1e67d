"""Single-task submission through the HTTP API under concurrent clients, against a bare Django view that enqueues
with raw rq, both behind the same gunicorn in the same run.

    python bench/api.py [--clients 20] [--seconds 20] [--rounds 3] [--web-workers N]

The web server is the deployed one (gunicorn, sync workers: ``--web-workers`` of them, deploy/Procfile's
WEB_CONCURRENCY; by default 2 on SQLite and 4 on MariaDB) on the benchmark's database and Redis. Each client is a
closed loop: one request at a time, a new connection each (gunicorn's sync workers close it after the answer), the
next as soon as the last is answered. Ours: ``POST /api/v1/tasks`` with an Operator's token: token, role and rate
checks, the task row and its audit entry in one commit, then the job published to Redis. The peer: ``POST
/peer/raw-enqueue`` (bench/peer_urls.py), a bare view that enqueues one job with raw rq, no token, row or audit.
Rounds alternate; the first two seconds of each are warm-up and not counted. Afterwards every task answered 201 is
checked in the database and in its queue.

Last line: JSON with, per side, latency p50/p95/p99 (ms, over every request of every round), successes and
requests a second (median of the rounds); ``p95_ms`` goal < 100 and ``success`` goal >= 0.99 for ours.
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench.common as common  # noqa: E402  (configures Django, Redis, the database)
from django.contrib.auth import get_user_model  # noqa: E402
from django.contrib.auth.models import Group  # noqa: E402
from django.db import connection  # noqa: E402

from portal.embedded_redis import free_port  # noqa: E402
from queues import broker  # noqa: E402
from queues.models import ApiToken, AuditEntry, CaptionTask  # noqa: E402
from queues.roles import sync_roles  # noqa: E402
from queues.samples import ensure_samples  # noqa: E402

WARM_UP = 2.0


async def _request(port: int, raw: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await reader.readexactly(length)
        writer.close()
        return status, time.perf_counter() - started
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
        return 0, time.perf_counter() - started


def _raw_post(path: str, body: dict, token: str | None) -> bytes:
    payload = json.dumps(body).encode()
    headers = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
               f"Content-Length: {len(payload)}", "Connection: close"]
    if token:
        headers.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + payload


async def _load(port: int, raw: bytes, clients: int, seconds: float) -> list[tuple[int, float, float]]:
    """(status, latency, when it ended) of every request of ``clients`` closed loops for ``seconds``."""
    deadline = time.perf_counter() + seconds
    results = []

    async def client():
        while time.perf_counter() < deadline:
            status, latency = await _request(port, raw)
            results.append((status, latency, time.perf_counter()))

    await asyncio.gather(*(client() for _ in range(clients)))
    return results


def run_round(port: int, raw: bytes, clients: int, seconds: float) -> dict:
    started = time.perf_counter()
    results = asyncio.run(_load(port, raw, clients, WARM_UP + seconds))
    counted = [(status, latency) for status, latency, ended in results if ended - started >= WARM_UP]
    return {"latencies": [latency for _, latency in counted], "ok": sum(status == 201 for status, _ in counted),
            "requests": len(counted), "per_second": len(counted) / seconds,
            "created": sum(status == 201 for status, _, _ in results)}


def summary(rounds: list[dict]) -> dict:
    latencies = [value for one in rounds for value in one["latencies"]]
    requests = sum(one["requests"] for one in rounds)
    return {"p50_ms": round(common.percentile(latencies, 0.50) * 1000, 1),
            "p95_ms": round(common.percentile(latencies, 0.95) * 1000, 1),
            "p99_ms": round(common.percentile(latencies, 0.99) * 1000, 1),
            "success": round(sum(one["ok"] for one in rounds) / requests, 4) if requests else 0.0,
            "requests": requests, "per_second": round(common.median([one["per_second"] for one in rounds]), 1),
            "per_second_rounds": [round(one["per_second"], 1) for one in rounds]}


def start_web(workers: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = tempfile.TemporaryFile()
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "bench.peer_settings", "LOG_LEVEL": "WARNING"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:portal.gunicorn_config", "portal.wsgi", "--workers",
         str(workers), "--bind", f"127.0.0.1:{port}"], cwd=common.ROOT, env=environment, stdout=log,
        stderr=subprocess.STDOUT)
    process.log = log

    def answers():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/schema/", timeout=2):
                return True
        except OSError:
            if process.poll() is not None:
                log.seek(0)
                sys.exit(f"gunicorn exited:\n{log.read().decode(errors='replace')}")
            return False

    common.wait_for(answers, timeout=60, interval=0.2)
    return process, port


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--web-workers", type=int, default=None,
                        help="gunicorn workers (default: 2 on SQLite, whose one writer at a time leaves more "
                             "processes queueing for its lock; 4, deploy/Procfile's WEB_CONCURRENCY, on MariaDB)")
    args = parser.parse_args()
    if args.web_workers is None:
        args.web_workers = 2 if connection.vendor == "sqlite" else 4
    reference = ensure_samples()[0]
    sync_roles()
    user = get_user_model().objects.create_user("bench-operator", password="x", is_staff=True)
    user.groups.add(Group.objects.get(name="Operators"))
    token = ApiToken.issue(name="bench", user=user, rate_limit=10000)[1]
    process, port = start_web(args.web_workers)
    try:
        ours_raw = _raw_post("/api/v1/tasks", {"image_ref": reference}, token)
        peer_raw = _raw_post("/peer/raw-enqueue", {"image_ref": reference}, None)
        ours, peer = [], []
        for _ in range(args.rounds):
            ours.append(run_round(port, ours_raw, args.clients, args.seconds))
            peer.append(run_round(port, peer_raw, args.clients, args.seconds))
            print(f"ours {ours[-1]['per_second']:.0f}/s, raw rq view {peer[-1]['per_second']:.0f}/s", flush=True)
    finally:
        process.terminate()
        process.wait(30)
    created = sum(one["created"] for one in ours)
    # Every 201 is a committed row with its audit entry, and its job waits in Redis (no worker runs here).
    assert CaptionTask.objects.count() == created, (CaptionTask.objects.count(), created)
    assert AuditEntry.objects.filter(action="task_submit").count() == created
    common.wait_for(lambda: broker.queue_lengths()["normal"] == created, timeout=30)
    figures = {"benchmark": "api_submit", "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
               "web_workers": args.web_workers, "ours": summary(ours), "raw_rq_view": summary(peer)}
    figures["ratio_per_second"] = round(figures["ours"]["per_second"] / figures["raw_rq_view"]["per_second"], 2)
    figures["p95_goal_met"] = figures["ours"]["p95_ms"] < 100 and figures["ours"]["success"] >= 0.99
    common.finish(figures)


if __name__ == "__main__":
    main()
