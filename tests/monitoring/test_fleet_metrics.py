"""The metrics seed 004 asks for beside the old system's: tasks submitted per queue, errors by class (a bounded set),
timeouts, worker crashes and restarts, and the CPU and memory of the hosts and processes that run the portal. Real
workers, a real supervisor, real Redis; the cgroup figures from files laid out as cgroup v2 lays them out."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from monitoring.metrics import hosts, recorder
from queues import broker
from queues.models import WorkerPool
from queues.services import TaskSpec, task_submit, tasks_submit_many
from tests.conftest import respond, run_worker
from tests.monitoring.test_metrics import samples, value
from tests.processes import Supervisors, live_workers, wait_for


@pytest.fixture
def staff_client(client, admin_user):
    client.force_login(admin_user)
    return client


@pytest.mark.django_db(transaction=True)
def test_submitted_tasks_are_counted_per_queue_when_they_commit(staff_client, redis, media_image):
    reference = media_image()
    tasks_submit_many(specs=[TaskSpec(reference, priority="low") for _ in range(3)]
                      + [TaskSpec(reference, priority="urgent")])
    task_submit(image_ref=reference, priority="low")
    task_submit(image_ref=reference, priority="low", idempotency_key="once")
    task_submit(image_ref=reference, priority="low", idempotency_key="once")  # the same task: not a new one
    values = samples(staff_client)
    assert value(values, "rq_tasks_submitted_total", queue="low") == 5
    assert value(values, "rq_tasks_submitted_total", queue="urgent") == 1
    assert value(values, "rq_tasks_submitted_total", queue="high") == 0


@pytest.mark.django_db(transaction=True)
def test_errors_by_class_and_timeouts(staff_client, redis, http_server, settings):
    settings.RQ_MAX_RETRIES, settings.IMAGE_FETCH_TIMEOUT = 0, 0.5
    task_submit(image_ref=http_server.route("/gone.png", respond(404, b"gone")), priority="high")
    task_submit(image_ref=http_server.route("/slow.png", respond(200, b"late", "image/png", delay=2)),
                priority="normal")
    task_submit(image_ref=http_server.route("/busy.png", respond(503, b"busy")), priority="normal")
    run_worker()
    values = samples(staff_client)
    assert value(values, "rq_task_errors_total", error_class="PermanentCaptionError") == 1
    assert value(values, "rq_task_errors_total", error_class="CaptionTimeout") == 1
    assert value(values, "rq_task_errors_total", error_class="TransientCaptionError") == 1
    assert value(values, "rq_task_errors_total", error_class="other") == 0
    assert value(values, "rq_task_timeouts_total", queue="normal") == 1
    assert value(values, "rq_task_timeouts_total", queue="high") == 0
    # Any other exception name is "other": the label set stays the same size whatever a captioner raises.
    recorder.record_attempt(queue="low", outcome="retry", processing_seconds=None, wait_seconds=None,
                            error_class="ConnectionResetByAnUnforeseenLibrary")
    assert value(samples(staff_client), "rq_task_errors_total", error_class="other") == 1
    error_classes = {labels for name, labels in samples(staff_client) if name == "rq_task_errors_total"}
    assert len(error_classes) == len(recorder.ERROR_CLASSES) + 1


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_killed_worker_counts_as_a_crash_and_its_replacement_as_a_restart(staff_client, redis):
    WorkerPool.objects.update_or_create(name="default", defaults={"queues": "urgent high normal low", "desired": 1,
                                                                  "minimum": 1, "maximum": 4})
    group = Supervisors()
    try:
        group.start()
        (first,) = wait_for(lambda: live_workers() if len(live_workers()) == 1 else None, 30, "one worker")
        os.kill(first.pid, signal.SIGKILL)
        wait_for(lambda: [row for row in live_workers() if row.pid != first.pid], 30, "the worker restarted")

        def counted():
            values = samples(staff_client)
            return (values.get(("rq_worker_crashes_total", (("pool", "default"),))),
                    values.get(("rq_worker_restarts_total", (("pool", "default"),))))
        wait_for(lambda: counted() == (1, 1), 10, "the supervisor's counts to reach Redis")
    finally:
        group.stop_all()


@pytest.mark.django_db
def test_each_process_reports_its_host_and_itself(staff_client, redis, monkeypatch):
    broker.get_connection()
    monkeypatch.setattr(hosts, "_meter", None)  # as a process that has just started
    recorder.report_pool_use()
    first = samples(staff_client)
    host = socket.gethostname()
    assert 0 < value(first, "rq_host_memory_usage_ratio", host=host) <= 1
    # No CPU figure from a meter younger than a second: its first readings would be 0 or 100 %.
    assert ("rq_host_cpu_usage_ratio", (("host", host),)) not in first
    time.sleep(hosts.CPU_INTERVAL_MIN)
    recorder.report_pool_use()
    values = samples(staff_client)
    assert 0 <= value(values, "rq_host_cpu_usage_ratio", host=host) <= 1
    assert 0 < value(values, "rq_host_memory_usage_ratio", host=host) <= 1
    kind = [labels for name, labels in values if name == "rq_portal_process_memory_bytes"]
    assert kind and all(dict(labels)["host"] == host for labels in kind)
    assert value(values, "rq_portal_process_memory_bytes", **dict(kind[0])) > 10_000_000  # a Python process
    assert value(values, "rq_portal_process_cpu_usage_cores", **dict(kind[0])) >= 0


def test_in_a_container_the_cgroup_limits_are_the_host(tmp_path, monkeypatch):
    monkeypatch.setattr(hosts, "CGROUP", tmp_path)
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("939524096\n")  # 896 MiB, of which 128 MiB inactive page cache
    (tmp_path / "memory.stat").write_text("anon 600000000\ninactive_file 134217728\nactive_file 1000\n")
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a core
    (tmp_path / "cpu.stat").write_text("usage_usec 1000000\nuser_usec 900000\n")
    assert hosts.host_memory() == 0.75  # the working set: 768 MiB of 1 GiB
    meter = hosts._CpuMeter()
    assert meter.host() == 0.0  # the first reading starts the interval
    started = time.monotonic()
    (tmp_path / "cpu.stat").write_text("usage_usec 1200000\n")  # 0.2 s of CPU since
    time.sleep(0.5)
    used = meter.host()
    elapsed = time.monotonic() - started
    assert used == pytest.approx(0.2 / elapsed / 0.5, rel=0.2) and used <= 1.0
    (tmp_path / "memory.max").write_text("max\n")  # no limit: the machine's figures
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert hosts.host_memory() == pytest.approx(hosts.psutil.virtual_memory().percent / 100, abs=0.02)
    assert 0 <= meter.host() <= 1


def test_host_use_adds_up_processes_and_takes_the_busiest_view_of_a_host():
    reports = [
        {"kind": "worker", "peak": 1, "host": "a", "rss": 100, "cpu": 0.5, "host_cpu": 0.4, "host_memory": 0.3},
        {"kind": "worker", "peak": 1, "host": "a", "rss": 50, "cpu": 0.25, "host_cpu": 0.6, "host_memory": 0.31},
        {"kind": "web", "peak": 2, "host": "b", "rss": 70, "cpu": 0.1, "host_cpu": 0.2, "host_memory": 0.9},
        {"kind": "web", "peak": 2, "host": "c"},  # a process of an older version: no host figures
    ]
    reports.append({"kind": "web", "peak": 1, "host": "d", "rss": 10, "host_memory": 0.4})  # in its first second
    machines, processes = hosts.host_use(reports)
    assert machines == {"a": {"cpu": 0.6, "memory": 0.31}, "b": {"cpu": 0.2, "memory": 0.9}, "d": {"memory": 0.4}}
    assert processes == {("worker", "a"): {"rss": 150, "cpu": 0.75, "processes": 2},
                         ("web", "b"): {"rss": 70, "cpu": 0.1, "processes": 1},
                         ("web", "d"): {"rss": 10, "cpu": 0.0, "processes": 1}}
