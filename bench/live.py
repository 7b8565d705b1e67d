"""The live dashboard under many watchers: samples pushed over WebSockets by the real ASGI server, against the same
number of dashboards polling a JSON endpoint over HTTP, in the same run.

    python bench/live.py [--clients 200] [--seconds 60] [--peer-seconds 20] [--single-seconds 15] [--load 5]

Push: ``uvicorn portal.asgi:application`` (one process, as the README runs it) and ``manage.py run_sampler`` (one
live sample a second while anyone watches). --clients WebSocket connections to /ws/metrics/ from this one asyncio
process, each with a staff session cookie and the server's Origin, opened (and at the end closed)
--connect-concurrency at a time, stay connected for --seconds. Staleness of a sample = the moment a client received
it - its ``at`` (when the sampler began reading the figures), both from this machine's clock; the clients keep
listening 3 s after the window for its last samples. Messages a client receives in its first 2 s are left out (the
consumer first sends the last sample kept in Redis, up to 10 s old), as are messages other than samples. CPU (utime + stime from /proc/<pid>/stat over the measured window, as a
percent of one core) of the sampler, the ASGI server, Redis and this client process. The same again with one client
for --single-seconds: the sampler's cost should not depend on how many watch. Then the sampler's cost with nobody
watching (--idle-seconds). Last, unless --no-burst, two checks of what a restart does: all --clients connect at
once, as every open dashboard does when the ASGI server comes back (how many were accepted, why the others were
refused); and --clients connected gradually all close at once, as when the server stops (whether the channel group
and the watcher set are empty afterwards). After every phase leftovers in both are counted and removed.
``machine_cpu_pct`` is the whole machine's busy time (all processes, percent of one core), to tell other work on the
machine from ours; ``machine_busy_before_pct`` the same before anything starts.

Peer: how polling dashboards work (rq-dashboard, Flower's HTTP API): the same number of clients, each sending
``GET /api/rq/health`` with the same session cookie once a second (a fixed schedule, each client at its own phase; a
slow answer delays that client's next request, no overlap) to ``gunicorn portal.wsgi -w 2``, for --peer-seconds,
then with one client for --single-seconds. Staleness of a polled figure = receipt - the report's ``checked_at`` (the
health report is cached 1 s per worker process, so this includes the cache's age, as the push figure includes the
sampler's reading time); the response latency is reported too. Between two samples or two polls the figure on
screen ages by up to the interval more (on average half of it) in both designs. Server CPU: the sum of gunicorn's
master and workers.

Optionally (--load tasks per second, 0 for none) tasks are submitted throughout and one ``manage.py rqworker``
(the local captioner) runs them, so the samples are not all zeros.
Goals: staleness p95 <= 1,500 ms (moonshot 250 ms), sampler CPU <= 5 % of a core. Last line: JSON.
"""

import argparse
import asyncio
import collections
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import websockets  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.db import close_old_connections  # noqa: E402
from django.db import connection as db_connection
from django.test import Client  # noqa: E402
from websockets.asyncio.client import connect as ws_connect  # noqa: E402

import bench.common as common  # noqa: E402
from bench.common import cpu_seconds, machine_busy_seconds  # noqa: E402
from portal.embedded_redis import free_port  # noqa: E402

GOAL_STALENESS_P95_MS = 1500
MOONSHOT_STALENESS_P95_MS = 250
GOAL_SAMPLER_CPU_PCT = 5.0
FIRST_MESSAGES_MS = 2000  # a client's receipts this soon after it connected are left out (the kept last sample)
RECEIPT_GRACE_S = 3.0  # after the window, how long the clients keep listening for the window's samples


def log(message: str) -> None:
    print(f"[live {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- processes -------------------------------------------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """The process and its descendants (gunicorn's master and workers), from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


class CpuWindow:
    """CPU of groups of processes over a wall-clock window, as a percent of one core. The pids of each group are
    fixed when the window starts; this process's own CPU (all its threads) is the group ``client``, the whole
    machine's (every process, all cores: up to cpus x 100) ``machine``."""

    def __init__(self, groups: dict[str, list[int]]):
        self.groups = groups
        self.started = {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in groups.items()}
        times = os.times()
        self.own = times.user + times.system
        self.machine = machine_busy_seconds()
        self.wall = time.monotonic()

    def stop(self) -> dict:
        wall = max(1e-6, time.monotonic() - self.wall)
        figures = {name: round((sum(cpu_seconds(pid) for pid in pids) - self.started[name]) * 100 / wall, 2)
                   for name, pids in self.groups.items()}
        times = os.times()
        figures["client"] = round((times.user + times.system - self.own) * 100 / wall, 2)
        figures["machine"] = round((machine_busy_seconds() - self.machine) * 100 / wall, 1)
        figures["wall_s"] = round(wall, 2)
        return figures


class Processes:
    """The subprocesses this benchmark started; each one's output goes to a log file in the work directory."""

    def __init__(self):
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], **env) -> subprocess.Popen:
        log_path = common.WORKDIR / f"{name}.log"
        with open(log_path, "ab") as output:
            process = subprocess.Popen([sys.executable, *args], cwd=settings.BASE_DIR, env={**os.environ, **env},
                                       stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.running[name] = process
        log(f"started {name} (pid {process.pid}; output in {log_path})")
        return process

    def check(self, name: str) -> None:
        process = self.running[name]
        if process.poll() is not None:
            tail = (common.WORKDIR / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} exited with code {process.returncode}:\n{tail}")

    def stop(self, name: str, timeout: float = 15.0) -> None:
        process = self.running.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{name} did not stop within {timeout:g} s; killing it")
            process.kill()
            process.wait(10)

    def stop_all(self) -> None:
        for name in reversed(list(self.running)):
            self.stop(name)


def wait_http(port: int, name: str, processes: Processes, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes.check(name)
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/healthz", headers={"Host": f"127.0.0.1:{port}"})
            connection.getresponse().read()
            connection.close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{name} did not answer HTTP within {timeout:g} s")


# --- optional load: tasks submitted and captioned throughout ------------------------------------------------------

class Load:
    def __init__(self, rate: float):
        self.rate = rate
        self.stopping = threading.Event()
        self.submitted = 0
        self.errors = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from queues.samples import ensure_samples
        from queues.services import task_submit

        references = ensure_samples()
        next_at = time.monotonic()
        try:
            while not self.stopping.is_set():
                try:
                    task_submit(image_ref=references[self.submitted % len(references)])
                    self.submitted += 1
                except Exception as error:  # noqa: BLE001  (a busy database: count it, go on)
                    self.errors += 1
                    log(f"load: submission failed: {error}")
                next_at += 1 / self.rate
                self.stopping.wait(max(0.0, next_at - time.monotonic()))
        finally:
            db_connection.close()

    def completed(self) -> int:
        from queues.models import CaptionTask, TaskStatus

        close_old_connections()
        return CaptionTask.objects.filter(status=TaskStatus.COMPLETED).count()


# --- push: WebSocket clients ---------------------------------------------------------------------------------------

class PushRun:
    def __init__(self, clients: int):
        self.clients = clients
        self.connected: dict[int, float] = {}  # client -> epoch ms when its handshake completed
        self.connect_ms: list[float] = []
        self.connect_errors: collections.Counter = collections.Counter()
        self.early_closes: collections.Counter = collections.Counter()  # closes before the run ended them
        self.receipts: list[tuple[int, float, float, int]] = []  # (client, at ms, receipt ms, bytes), in window
        self.other_messages = 0
        self.window = (float("inf"), float("inf"))  # epoch ms
        self.ending = False
        self.all_settled = asyncio.Event()
        self.settled = 0

    def _settle(self):
        self.settled += 1
        if self.settled >= self.clients:
            self.all_settled.set()


async def push_client(run: PushRun, index: int, uri: str, origin: str, cookie: str, compression, handshakes):
    async with handshakes:
        begun = time.time() * 1000
        try:
            websocket = await ws_connect(uri, origin=origin, additional_headers={"Cookie": cookie}, open_timeout=60,
                                         max_size=None, compression=compression, ping_interval=None)
        except Exception as error:  # noqa: BLE001  (refused handshakes, timeouts: counted by kind)
            status = getattr(getattr(error, "response", None), "status_code", None)
            run.connect_errors[f"{type(error).__name__}" + (f" {status}" if status else "")] += 1
            run._settle()
            return
    connected = time.time() * 1000
    run.connected[index] = connected
    run.connect_ms.append(connected - begun)
    run._settle()
    try:
        async for message in websocket:
            received = time.time() * 1000
            if not isinstance(message, str) or not message.startswith('{"type":"sample"'):
                run.other_messages += 1
                continue
            if received - connected < FIRST_MESSAGES_MS:
                continue
            at = json.loads(message)["data"]["at"]
            if run.window[0] <= at < run.window[1]:  # samples read in the window, each one to every client
                run.receipts.append((index, at, received, len(message)))
    except websockets.ConnectionClosed:
        pass
    finally:
        if not run.ending:
            code = websocket.close_code
            run.early_closes[str(code)] += 1
            run.connected.pop(index, None)
        await websocket.close()


async def loop_lag(lags: list[float], stopping: asyncio.Event):
    """How late this process's event loop wakes up (a busy client would make the staleness look worse)."""
    while not stopping.is_set():
        started = time.monotonic()
        await asyncio.sleep(0.05)
        lags.append((time.monotonic() - started - 0.05) * 1000)


async def push_phase(clients: int, seconds: float, port: int, cookie: str, cpu_groups: dict, compression,
                     concurrency: int | None, dump: str | None = None, close_all_at_once: bool = False) -> dict:
    """``concurrency``: how many handshakes may be under way at once (None: all clients at once); the clients close
    as many at a time, or all at once."""
    run = PushRun(clients)
    uri, origin = f"ws://127.0.0.1:{port}/ws/metrics/", f"http://127.0.0.1:{port}"
    handshakes = asyncio.Semaphore(concurrency or clients)
    tasks = [asyncio.ensure_future(push_client(run, index, uri, origin, cookie, compression, handshakes))
             for index in range(clients)]
    started = time.monotonic()
    await asyncio.wait_for(run.all_settled.wait(), timeout=120)
    log(f"{len(run.connected)} of {clients} clients connected in {time.monotonic() - started:.2f} s"
        + (f"; refused: {dict(run.connect_errors)}" if run.connect_errors else ""))
    await asyncio.sleep(FIRST_MESSAGES_MS / 1000 + 0.1)
    lags, stopping = [], asyncio.Event()
    lag_task = asyncio.ensure_future(loop_lag(lags, stopping))
    cpu = CpuWindow(cpu_groups)
    run.window = (time.time() * 1000, float("inf"))
    await asyncio.sleep(seconds)
    run.window = (run.window[0], time.time() * 1000)
    usage = cpu.stop()
    await asyncio.sleep(RECEIPT_GRACE_S)  # the window's last samples reach the last clients
    watching = len(run.connected)
    run.ending = True
    stopping.set()
    await lag_task
    step = clients if close_all_at_once else concurrency or clients
    for first in range(0, clients, step):
        for task in tasks[first:first + step]:
            task.cancel()
        await asyncio.gather(*tasks[first:first + step], return_exceptions=True)
    if dump:
        dump_samples(run, dump)
    return figures_push(run, usage, seconds, watching, lags)


def dump_samples(run: PushRun, path: str) -> None:
    """One JSON line per sample of the window: when it was read (s into the window), how many clients had it, and
    its staleness at the first, the median and the last of them."""
    by_sample: dict[float, list[float]] = collections.defaultdict(list)
    for _, at, received, _ in run.receipts:
        by_sample[at].append(received - at)
    with open(path, "w") as handle:
        for at in sorted(by_sample):
            ages = sorted(by_sample[at])
            handle.write(json.dumps({"offset_s": round((at - run.window[0]) / 1000, 3), "clients": len(ages),
                                     "first_ms": round(ages[0], 1), "median_ms": round(common.median(ages), 1),
                                     "last_ms": round(ages[-1], 1)}) + "\n")
    log(f"per-sample figures written to {path}")


def figures_push(run: PushRun, usage: dict, seconds: float, watching: int, lags: list[float]) -> dict:
    staleness = [received - at for _, at, received, _ in run.receipts]
    by_sample: dict[float, list[float]] = collections.defaultdict(list)
    for _, at, received, _ in run.receipts:
        by_sample[at].append(received)
    connected = len(run.connect_ms)
    figures = {
        "clients_connected": connected, "clients_watching_at_end": watching,
        "connect_errors": dict(run.connect_errors), "early_closes": dict(run.early_closes),
        "connect_ms_p50": round(common.percentile(run.connect_ms, 0.5), 1) if run.connect_ms else None,
        "connect_ms_p95": round(common.percentile(run.connect_ms, 0.95), 1) if run.connect_ms else None,
        "samples_received": len(staleness), "samples_sent": len(by_sample),
        "samples_per_client_per_second": round(len(staleness) / max(1, connected) / seconds, 3) if seconds else None,
        # deliveries missing: a client that was connected for the whole window should have every sample
        "deliveries_missing": sum(max(0, watching - len(times)) for times in by_sample.values()),
        "other_messages": run.other_messages,
        "sample_bytes": int(common.median([size for *_, size in run.receipts])) if run.receipts else None,
        "sampler_cpu_pct": usage["sampler"], "asgi_cpu_pct": usage["asgi"], "redis_cpu_pct": usage["redis"],
        "load_worker_cpu_pct": usage["worker"],
        "client_cpu_pct": usage["client"], "machine_cpu_pct": usage["machine"], "window_s": usage["wall_s"],
        "client_loop_lag_p95_ms": round(common.percentile(lags, 0.95), 1) if lags else None,
    }
    if staleness:
        first = [min(times) - at for at, times in by_sample.items()]
        spread = [max(times) - min(times) for times in by_sample.values()]
        figures.update({
            "staleness_p50_ms": round(common.percentile(staleness, 0.5), 1),
            "staleness_p95_ms": round(common.percentile(staleness, 0.95), 1),
            "staleness_p99_ms": round(common.percentile(staleness, 0.99), 1),
            "staleness_max_ms": round(max(staleness), 1),
            "first_receipt_p50_ms": round(common.percentile(first, 0.5), 1),  # sample read -> first client has it
            "fanout_spread_p95_ms": round(common.percentile(spread, 0.95), 1),  # first -> last client, per sample
        })
    return figures


# --- peer: polling over HTTP ---------------------------------------------------------------------------------------

async def http_get(port: int, path: str, cookie: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: {cookie}\r\n"
                     f"Accept: application/json\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()  # gunicorn's sync workers close the connection after each response
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def poll_client(port: int, path: str, cookie: str, interval: float, begin: float, end: float,
                      results: list, errors: collections.Counter):
    next_at = begin + random.uniform(0, interval)  # dashboards opened at different moments
    while next_at < end:
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sent = time.time()
        try:
            status, body = await asyncio.wait_for(http_get(port, path, cookie), timeout=30)
        except Exception as error:  # noqa: BLE001
            errors[type(error).__name__] += 1
        else:
            received = time.time()
            checked = None
            if status in (200, 503):
                checked = datetime.fromisoformat(json.loads(body)["checked_at"]).timestamp()
            else:
                errors[f"HTTP {status}"] += 1
            results.append((sent, received, checked, len(body)))
        next_at += interval
        if next_at < time.monotonic():  # the answer took longer than the interval: ask again at once
            next_at = time.monotonic()


async def poll_phase(clients: int, seconds: float, port: int, cookie: str, cpu_groups: dict,
                     interval: float) -> dict:
    for _ in range(20):  # warm both workers (imports, the first connections)
        await asyncio.gather(*(http_get(port, "/api/rq/health", cookie) for _ in range(4)))
    results, errors = [], collections.Counter()
    cpu = CpuWindow(cpu_groups)
    begin = time.monotonic()
    end = begin + seconds
    polls = asyncio.gather(*(poll_client(port, "/api/rq/health", cookie, interval, begin, end, results, errors)
                             for _ in range(clients)))
    await asyncio.sleep(seconds)
    usage = cpu.stop()  # the requests sent in the window, and the CPU over it (answers still under way finish after)
    await polls
    latency = [(received - sent) * 1000 for sent, received, _, _ in results]
    staleness = [(received - checked) * 1000 for _, received, checked, _ in results if checked is not None]
    figures = {"clients": clients, "seconds": seconds, "interval_s": interval, "requests": len(results),
               "requests_per_s": round(len(results) / seconds, 1),
               "target_per_s": round(clients / interval, 1), "errors": dict(errors),
               "server_cpu_pct": usage["server"], "redis_cpu_pct": usage["redis"], "client_cpu_pct": usage["client"],
               "machine_cpu_pct": usage["machine"], "load_worker_cpu_pct": usage["worker"],
               "response_bytes": int(common.median([size for *_, size in results])) if results else None}
    if latency:
        figures.update({"latency_p50_ms": round(common.percentile(latency, 0.5), 1),
                        "latency_p95_ms": round(common.percentile(latency, 0.95), 1),
                        "latency_max_ms": round(max(latency), 1)})
    if staleness:
        figures.update({"staleness_p50_ms": round(common.percentile(staleness, 0.5), 1),
                        "staleness_p95_ms": round(common.percentile(staleness, 0.95), 1),
                        "staleness_max_ms": round(max(staleness), 1)})
    return figures


# --- the run ---------------------------------------------------------------------------------------------------

def session_cookie() -> str:
    user = get_user_model().objects.create_superuser("bench-live", "bench-live@example.org", "bench-live-password-1")
    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


def group_members_left(settle: float = 3.0, limit: float = 20.0) -> dict:
    """Once every client has closed: the channel group's members and the watchers still recorded (both should reach
    0), read until both are 0 or neither has changed for ``settle`` seconds (the server runs the consumers'
    disconnect handlers after the close handshakes). Leftovers are then removed so that they cannot weigh on the next
    phase; the count is reported."""
    from monitoring.live.events import METRICS_GROUP, WATCHERS_KEY
    from queues import broker

    group_key = f"{settings.CHANNEL_LAYERS['default']['CONFIG']['prefix']}:group:{METRICS_GROUP}"
    connection = broker.get_connection()
    started = changed = time.monotonic()
    last = None
    while True:
        now = (connection.zcard(group_key), connection.zcard(WATCHERS_KEY))
        if now != last:
            last, changed = now, time.monotonic()
        if now == (0, 0) or time.monotonic() - changed >= settle or time.monotonic() - started >= limit:
            break
        time.sleep(0.25)
    connection.delete(group_key, WATCHERS_KEY)
    return {"group_members_left": last[0], "watchers_left": last[1]}


def redis_pids() -> list[int]:
    return [common.REDIS.process.pid] if common.REDIS is not None and common.REDIS.process else []


def machine_busy_before(seconds: float = 2.0) -> float:
    """How busy the machine is before this benchmark starts anything (percent of one core): other work running
    alongside would show in the tails."""
    started = machine_busy_seconds()
    time.sleep(seconds)
    busy = round((machine_busy_seconds() - started) * 100 / seconds, 1)
    if busy > 25:
        log(f"warning: the machine is already {busy:g} % busy (of one core) before the benchmark starts")
    return busy


def run(args) -> dict:
    busy_before = machine_busy_before()
    cookie = session_cookie()
    processes = Processes()
    load = Load(args.load) if args.load > 0 else None
    compression = None if args.compression == "none" else "deflate"
    figures = {"benchmark": "live", "clients": args.clients, "seconds": args.seconds, "interval_s": args.interval,
               "ws": args.ws, "compression": args.compression, "connect_concurrency": args.connect_concurrency,
               "load_tasks_per_s": args.load, "machine_busy_before_pct": busy_before}
    try:
        if load is not None:
            processes.start("worker", ["manage.py", "rqworker", "--verbosity", "0"], CAPTION_BACKEND="local")
            load.thread.start()
        asgi_port = free_port()
        asgi = processes.start("asgi", ["-m", "uvicorn", "portal.asgi:application", "--host", "127.0.0.1",
                                        "--port", str(asgi_port), "--ws", args.ws, "--lifespan", "off",
                                        "--log-level", "warning", "--no-access-log"])
        wait_http(asgi_port, "asgi", processes)
        sampler = processes.start("sampler", ["manage.py", "run_sampler", "--live-interval", str(args.interval)])
        time.sleep(1.5)
        processes.check("sampler")
        worker = processes.running.get("worker")
        groups = {"sampler": [sampler.pid], "asgi": [asgi.pid], "redis": redis_pids(),
                  "worker": [worker.pid] if worker else []}

        log(f"push: {args.clients} WebSocket clients for {args.seconds:g} s")
        many = asyncio.run(push_phase(args.clients, args.seconds, asgi_port, cookie, groups, compression,
                                      args.connect_concurrency, args.dump))
        many.update(group_members_left())
        log(f"push: {json.dumps(many)}")
        figures.update(many)
        if args.single_seconds > 0:
            log(f"push: 1 WebSocket client for {args.single_seconds:g} s")
            single = asyncio.run(push_phase(1, args.single_seconds, asgi_port, cookie, groups, compression, 1))
            single.update(group_members_left())
            log(f"push (1 client): {json.dumps(single)}")
            for key in ("staleness_p50_ms", "staleness_p95_ms", "samples_per_client_per_second", "sampler_cpu_pct",
                        "asgi_cpu_pct", "redis_cpu_pct", "client_cpu_pct"):
                figures[f"single_{key}"] = single.get(key)
            figures["single_seconds"] = args.single_seconds
        if args.idle_seconds > 0:
            time.sleep(1.5)  # the sampler notices that nobody watches at its next pass
            log(f"push: nobody watching for {args.idle_seconds:g} s")
            cpu = CpuWindow(groups)
            time.sleep(args.idle_seconds)
            idle = cpu.stop()
            figures.update({"idle_sampler_cpu_pct": idle["sampler"], "idle_asgi_cpu_pct": idle["asgi"],
                            "idle_seconds": args.idle_seconds})
        if args.burst:
            # Last, so that what a failed burst leaves behind cannot touch the figures above.
            log(f"push: {args.clients} WebSocket clients connecting at once (a restart: every dashboard reconnects)")
            burst = asyncio.run(push_phase(args.clients, 0, asgi_port, cookie, groups, compression, None))
            burst.update(group_members_left())
            log(f"push (burst): connected {burst['clients_connected']}, refused {burst['connect_errors']}")
            log(f"push: {args.clients} WebSocket clients connected {args.connect_concurrency} at a time, closing at "
                "once (every dashboard, when the ASGI server stops)")
            mass = asyncio.run(push_phase(args.clients, 0, asgi_port, cookie, groups, compression,
                                          args.connect_concurrency, close_all_at_once=True))
            mass.update(group_members_left())
            log(f"push (all closing at once): {mass['clients_connected']} connected; afterwards "
                f"{mass['group_members_left']} left in the channel group, {mass['watchers_left']} in the watcher set")
            figures.update({"burst_clients_connected": burst["clients_connected"],
                            "burst_connect_errors": burst["connect_errors"],
                            "burst_connect_ms_p95": burst["connect_ms_p95"],
                            "close_burst_clients": mass["clients_connected"],
                            "close_burst_group_members_left": mass["group_members_left"],
                            "close_burst_watchers_left": mass["watchers_left"]})
            if burst["connect_errors"] or mass["group_members_left"] or mass["watchers_left"]:
                log(f"the ASGI server's log ({common.WORKDIR / 'asgi.log'}) has the failures' tracebacks")
        processes.check("sampler")
        processes.check("asgi")
        processes.stop("sampler")
        processes.stop("asgi")

        wsgi_port = free_port()
        gunicorn = processes.start("gunicorn", ["-m", "gunicorn", "portal.wsgi", "-w", str(args.peer_workers),
                                                "-b", f"127.0.0.1:{wsgi_port}", "--log-level", "warning"])
        wait_http(wsgi_port, "gunicorn", processes)
        time.sleep(1.0)  # the workers have booted
        peer_groups = {"server": process_tree(gunicorn.pid), "redis": redis_pids(),
                       "worker": groups["worker"]}
        log(f"poll: {args.clients} HTTP clients once every {args.interval:g} s for {args.peer_seconds:g} s "
            f"(gunicorn pids {peer_groups['server']})")
        poll = asyncio.run(poll_phase(args.clients, args.peer_seconds, wsgi_port, cookie, peer_groups,
                                      args.interval))
        log(f"poll: {json.dumps(poll)}")
        figures.update({f"poll_{key}": value for key, value in poll.items()})
        if args.single_seconds > 0:
            log(f"poll: 1 HTTP client for {args.single_seconds:g} s")
            single = asyncio.run(poll_phase(1, args.single_seconds, wsgi_port, cookie, peer_groups, args.interval))
            log(f"poll (1 client): {json.dumps(single)}")
            for key in ("latency_p95_ms", "staleness_p95_ms", "requests_per_s", "server_cpu_pct", "redis_cpu_pct"):
                figures[f"poll_single_{key}"] = single.get(key)
        processes.check("gunicorn")
    finally:
        if load is not None:
            load.stopping.set()
            load.thread.join(10)
        processes.stop_all()
    if load is not None:
        figures.update({"load_submitted": load.submitted, "load_completed": load.completed(),
                        "load_errors": load.errors})
    if figures.get("samples_received"):  # all the ASGI server's work over the window, per message delivered
        figures["asgi_cpu_ms_per_delivery"] = round(figures["asgi_cpu_pct"] * 10 * figures["window_s"]
                                                    / figures["samples_received"], 3)
    if figures.get("poll_requests"):
        figures["poll_server_cpu_ms_per_request"] = round(figures["poll_server_cpu_pct"] * 10 * args.peer_seconds
                                                          / figures["poll_requests"], 3)
    figures["push_server_cpu_pct"] = round(figures["sampler_cpu_pct"] + figures["asgi_cpu_pct"]
                                           + figures["redis_cpu_pct"], 2)
    figures["poll_total_server_cpu_pct"] = round(figures["poll_server_cpu_pct"] + figures["poll_redis_cpu_pct"], 2)
    figures.update({
        "goal_staleness_p95_ms": GOAL_STALENESS_P95_MS, "moonshot_staleness_p95_ms": MOONSHOT_STALENESS_P95_MS,
        "goal_sampler_cpu_pct": GOAL_SAMPLER_CPU_PCT,
        "staleness_goal_met": figures.get("staleness_p95_ms") is not None
        and figures["staleness_p95_ms"] <= GOAL_STALENESS_P95_MS
        and figures["clients_connected"] == args.clients,
        "staleness_moonshot_met": figures.get("staleness_p95_ms") is not None
        and figures["staleness_p95_ms"] <= MOONSHOT_STALENESS_P95_MS,
        "sampler_cpu_goal_met": figures["sampler_cpu_pct"] <= GOAL_SAMPLER_CPU_PCT,
    })
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0, help="the push window (all clients connected)")
    parser.add_argument("--peer-seconds", type=float, default=20.0, help="the polling window")
    parser.add_argument("--single-seconds", type=float, default=15.0,
                        help="push and poll again with one client (0: skip)")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="the sampler with nobody watching (0: skip)")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="the sampler's --live-interval and the polling interval, seconds")
    parser.add_argument("--load", type=float, default=5.0,
                        help="tasks submitted per second throughout, run by one worker (0: no load)")
    parser.add_argument("--connect-concurrency", type=int, default=20,
                        help="WebSocket handshakes under way at once while the clients connect")
    parser.add_argument("--no-burst", dest="burst", action="store_false",
                        help="skip the restart checks (all --clients connecting at once, closing at once)")
    parser.add_argument("--ws", default="auto", choices=["auto", "websockets", "websockets-sansio", "wsproto"],
                        help="uvicorn's WebSocket implementation")
    parser.add_argument("--compression", default="deflate", choices=["deflate", "none"],
                        help="what the clients offer (browsers offer permessage-deflate)")
    parser.add_argument("--dump", metavar="PATH", help="write per-sample figures of the push window (JSON lines)")
    parser.add_argument("--peer-workers", type=int, default=2, help="gunicorn workers of the polling peer")
    args = parser.parse_args()
    try:
        figures = run(args)
    except BaseException:
        if common.REDIS is not None:
            common.REDIS.stop()
        raise
    common.finish(figures)


if __name__ == "__main__":
    main()
