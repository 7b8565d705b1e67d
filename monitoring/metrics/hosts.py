"""CPU and memory of the hosts the portal's processes run on, and of the processes themselves.

Every portal process (web, supervisor, worker, sampler, commands) that talks to Redis reports its own figures with
its Redis pool use, every few seconds (monitoring.metrics.recorder); a scrape adds them up per host and per kind of
process. In a container limited by cgroup v2 (``memory.max``, ``cpu.max`` set), the host figures are the
container's: its memory against its limit, its CPU against its quota; elsewhere they are the machine's (psutil).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

CGROUP = Path("/sys/fs/cgroup")


class _CpuMeter:
    """CPU used since the previous reading, as a share of what the host (or the container's quota) offers."""

    def __init__(self):
        self.started = time.monotonic()
        self._last: tuple[float, float] | None = None  # (monotonic time, cgroup usage in seconds)
        self._process = psutil.Process(os.getpid())
        self._process.cpu_percent(None)  # the first call starts the interval
        psutil.cpu_percent(None)

    def process(self) -> float:
        """Cores this process used since the last call (1.0: one core all the time)."""
        return self._process.cpu_percent(None) / 100.0

    def host(self) -> float:
        quota = _cgroup_cpu_quota()
        usage = _cgroup_cpu_usage()
        if quota is None or usage is None:
            return psutil.cpu_percent(None) / 100.0
        now, last = time.monotonic(), self._last
        self._last = (now, usage)
        if last is None or now <= last[0]:
            return 0.0
        return max(0.0, min(1.0, (usage - last[1]) / (now - last[0]) / quota))


def _read(name: str) -> str | None:
    try:
        return (CGROUP / name).read_text().strip()
    except OSError:
        return None


def _cgroup_cpu_quota() -> float | None:
    """Cores the container may use (cgroup v2 ``cpu.max``), None without a quota."""
    value = _read("cpu.max")
    if not value:
        return None
    quota, _, period = value.partition(" ")
    if quota == "max" or not period:
        return None
    try:
        return int(quota) / int(period)
    except ValueError:
        return None


def _cgroup_cpu_usage() -> float | None:
    value = _read("cpu.stat")
    for line in (value or "").splitlines():
        name, _, amount = line.partition(" ")
        if name == "usage_usec":
            return int(amount) / 1e6
    return None


def _inactive_file() -> int:
    for line in (_read("memory.stat") or "").splitlines():
        name, _, amount = line.partition(" ")
        if name == "inactive_file":
            return int(amount)
    return 0


def host_memory() -> float:
    """Memory in use over what the host (or the container's limit) has, 0..1. In a container, the working set as
    the kubelet counts it (usage less the inactive page cache, which the kernel reclaims before it kills anyone)."""
    limit, current = _read("memory.max"), _read("memory.current")
    if limit and current and limit != "max":
        try:
            return min(1.0, max(0, int(current) - _inactive_file()) / int(limit))
        except (ValueError, ZeroDivisionError):
            pass
    return psutil.virtual_memory().percent / 100.0


_meter: _CpuMeter | None = None
_meter_pid: int | None = None


# CPU shares need an interval: a meter younger than this reports none yet (its first readings would be 0 or 100 %).
CPU_INTERVAL_MIN = 1.0


def figures() -> dict:
    """This process' report: its resident memory and its host's memory, and once its meter has run for a second,
    its own CPU and its host's since the previous report."""
    global _meter, _meter_pid
    if _meter is None or _meter_pid != os.getpid():  # a forked child measures itself afresh
        _meter, _meter_pid = _CpuMeter(), os.getpid()
    report = {"rss": psutil.Process(os.getpid()).memory_info().rss, "host_memory": round(host_memory(), 4)}
    if time.monotonic() - _meter.started >= CPU_INTERVAL_MIN:
        report.update(cpu=round(min(_meter.process(), float(os.cpu_count() or 1)), 4),
                      host_cpu=round(_meter.host(), 4))
    else:
        _meter.host()  # starts the container's interval (psutil's started with the meter)
    return report


def host_use(reports: list[dict]) -> tuple[dict[str, dict], dict[tuple[str, str], dict]]:
    """From the live processes' reports: {host: {"memory", and "cpu" once a process has measured it}} (the highest
    any of its processes saw in its last interval) and {(kind, host): {"rss", "cpu", "processes"}} (summed)."""
    hosts: dict[str, dict] = {}
    kinds: dict[tuple[str, str], dict] = {}
    for report in reports:
        host = str(report.get("host") or "")
        if not host or "host_memory" not in report:
            continue  # a report of a version without host figures
        figures_of_host = hosts.setdefault(host, {"memory": 0.0})
        if "host_cpu" in report:
            figures_of_host["cpu"] = max(figures_of_host.get("cpu", 0.0), float(report["host_cpu"]))
        figures_of_host["memory"] = max(figures_of_host["memory"], float(report["host_memory"]))
        kind = kinds.setdefault((str(report["kind"]), host), {"rss": 0, "cpu": 0.0, "processes": 0})
        kind["rss"] += int(report.get("rss") or 0)
        kind["cpu"] += float(report.get("cpu") or 0.0)
        kind["processes"] += 1
    return hosts, kinds
