"""Scrape cost of /metrics against django-rq's Prometheus collector and rq-exporter on the same Redis, and the
health API's request rate under gunicorn against a trivial view.

    .venv/bin/pip install --no-deps rq-exporter==3.1.0   # the peer (it pins redis<6; its collector runs on ours)
    python bench/metrics.py [--jobs 1000000] [--scrapes 20] [--seconds 5]

State: 1,000 and then 1,000,000 jobs queued, 10,000 dead letters, 50 workers registered. Scrape time is the median
of rendering each collector's text exposition in this process (ours: the queue collector behind /metrics); the
whole /metrics request (django-prometheus' families too) is also timed through gunicorn at the large size. The
request rate runs gunicorn (2 workers) and 8 client threads with keep-alive for a few seconds per URL.
Goals: scrape <= 50 ms, scrape(1M)/scrape(1k) <= 1.5, faster than both peers; /api/rq/health >= 0.6x /healthz.
Last line: JSON.
"""

import argparse
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("METRICS_TOKEN", "bench-metrics-token-0123456789")
from django.conf import settings  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from rq import Queue  # noqa: E402
from rq.registry import FailedJobRegistry  # noqa: E402

import bench.common as common  # noqa: E402
from monitoring.metrics.views import QUEUE_REGISTRY  # noqa: E402
from portal.embedded_redis import free_port  # noqa: E402
from queues import broker  # noqa: E402
from queues.fleet.worker import CaptionWorker  # noqa: E402


def fill_queue(total: int, start: int = 0) -> None:
    for first in range(start, start + total, 10_000):
        broker.publish([(task_id, "normal") for task_id in range(first, min(first + 10_000, start + total))],
                       fresh=True)


def scrape_ms(registry, scrapes: int) -> float:
    generate_latest(registry)
    samples = []
    for _ in range(scrapes):
        started = time.perf_counter()
        generate_latest(registry)
        samples.append((time.perf_counter() - started) * 1000)
    return common.median(samples)


def peer_registries():
    peers = {}
    from django_rq.contrib.prometheus import RQCollector as DjangoRQCollector

    registry = CollectorRegistry(auto_describe=False)
    collector = DjangoRQCollector()
    _release_summary(collector)
    registry.register(collector)
    peers["django_rq"] = registry
    try:
        from rq_exporter.collector import RQCollector as ExporterCollector
    except ImportError:
        print("rq-exporter is not installed; skipping that peer (see the docstring)", file=sys.stderr)
    else:
        registry = CollectorRegistry(auto_describe=False)
        collector = ExporterCollector(connection=broker.get_connection())
        _release_summary(collector)
        registry.register(collector)
        peers["rq_exporter"] = registry
    return peers


def _release_summary(collector) -> None:
    """Both peers register a Summary of the same name in prometheus_client's global registry when built; only
    their collect() is measured here, so take it out again to build the next one."""
    from prometheus_client import REGISTRY

    summary = getattr(collector, "summary", None)
    if summary is not None:
        try:
            REGISTRY.unregister(summary)
        except KeyError:
            pass


def measure_scrapes(scrapes: int, workers) -> dict:
    for worker in workers:  # these workers do not run their loop: renew their registration as a running one would
        worker.heartbeat()
    assert len(broker.workers()) == len(workers)
    figures = {"ours_ms": scrape_ms(QUEUE_REGISTRY, scrapes)}
    for name, registry in peer_registries().items():
        figures[f"{name}_ms"] = scrape_ms(registry, scrapes)
    return figures


def request_rate(port: int, path: str, seconds: float, headers: dict) -> float:
    counts, stop = [], threading.Event()

    def client():
        connection, done = http.client.HTTPConnection("127.0.0.1", port, timeout=10), 0
        while not stop.is_set():
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            response.read()
            assert response.status in (200, 503), response.status
            done += 1
        counts.append(done)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return sum(counts) / seconds


def http_latency_ms(port: int, path: str, headers: dict, requests: int) -> float:
    """Median time of a whole request (all metric families, HTTP included), one at a time."""
    connection, samples = http.client.HTTPConnection("127.0.0.1", port, timeout=10), []
    for _ in range(requests + 2):
        started = time.perf_counter()
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200 and b"rq_queue_length" in body, response.status
        samples.append((time.perf_counter() - started) * 1000)
    return common.median(samples[2:])


def gunicorn_rates(seconds: float) -> dict:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "portal.wsgi", "-w", "2", "-b", f"127.0.0.1:{port}", "--log-level",
         "warning"], cwd=settings.BASE_DIR, env={**os.environ, "ALLOWED_HOSTS": "127.0.0.1"})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/healthz")
                break
            except OSError:
                time.sleep(0.1)
        auth = {"Authorization": f"Bearer {settings.METRICS_TOKEN}", "Host": "127.0.0.1"}
        request_rate(port, "/healthz", 1, {"Host": "127.0.0.1"})  # warm both workers
        trivial = request_rate(port, "/healthz", seconds, {"Host": "127.0.0.1"})
        whole_scrape = http_latency_ms(port, "/metrics", auth, 20)
        health = request_rate(port, "/api/rq/health", seconds, auth)
        return {"metrics_http_ms": round(whole_scrape, 2), "healthz_rps": round(trivial),
                "api_health_rps": round(health), "health_ratio": round(health / trivial, 3)}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    connection = broker.get_connection()

    workers = [CaptionWorker(broker.get_queues(), connection=connection, name=f"bench-worker-{index}",
                             pool="default") for index in range(50)]
    for worker in workers:
        worker.register_birth()
    fill_queue(1000)
    dead_registry = FailedJobRegistry("normal", connection=connection)
    pipe = connection.pipeline(transaction=False)
    for index in range(10_000):
        pipe.zadd(dead_registry.key, {f"caption-dead-{index}": time.time() + 86400})
    pipe.execute()
    small = measure_scrapes(args.scrapes, workers)
    fill_queue(args.jobs - 1000, start=1000)
    assert Queue("normal", connection=connection).count == args.jobs
    large = measure_scrapes(args.scrapes, workers)
    rates = gunicorn_rates(args.seconds)
    for worker in workers:
        worker.register_death()
    figures = {"benchmark": "metrics", "jobs": args.jobs, "dead_letters": 10_000, "workers": 50,
               "scrape_ms": round(large["ours_ms"], 2), "scrape_1k_ms": round(small["ours_ms"], 2),
               "scrape_ratio": round(large["ours_ms"] / small["ours_ms"], 3)}
    for name in ("django_rq", "rq_exporter"):
        if f"{name}_ms" in large:
            figures[f"{name}_scrape_ms"] = round(large[f"{name}_ms"], 2)
            figures[f"{name}_scrape_1k_ms"] = round(small[f"{name}_ms"], 2)
    common.finish({**figures, **rates})


if __name__ == "__main__":
    main()
