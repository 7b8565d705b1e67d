"""Metric history: the sampler, its single-writer guarantee, performance figures and the capacity report."""

import json
import threading
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from monitoring.metrics.recorder import BUFFER, PROCESSING_BUCKETS, record_attempt
from monitoring.metrics.sampler import capacity_report, performance, quantile, sample_take, samples_compact
from monitoring.models import MetricSample


def test_quantile_interpolates_within_buckets():
    # 10 observations in (0.5, 1.0], 10 in (1.0, 2.5]
    counts = {"b3": 10.0, "b4": 10.0}
    assert quantile(PROCESSING_BUCKETS, counts, 0.5) == pytest.approx(1.0)
    assert quantile(PROCESSING_BUCKETS, counts, 0.95) == pytest.approx(1.0 + 1.5 * 0.9)
    assert quantile(PROCESSING_BUCKETS, {}, 0.5) is None
    assert quantile(PROCESSING_BUCKETS, {"inf": 3.0}, 0.5) == PROCESSING_BUCKETS[-1]


@pytest.mark.django_db
def test_sampler_records_a_minute_of_real_counters(redis):
    start = timezone.now().replace(second=5, microsecond=0)
    BUFFER.take()
    assert sample_take(now=start) == []  # the baseline
    for seconds in (0.3, 0.3, 0.7, 4.0):
        record_attempt(queue="normal", outcome="completed", processing_seconds=seconds, wait_seconds=0.02)
    record_attempt(queue="low", outcome="failed", processing_seconds=1.5, wait_seconds=3.0)
    record_attempt(queue="low", outcome="retry", processing_seconds=0.2, wait_seconds=0.5)
    record_attempt(queue="low", outcome="worker_lost", processing_seconds=None, wait_seconds=None)
    rows = sample_take(now=start + timedelta(minutes=1))
    by_queue = {row.queue: row for row in rows}
    normal, fleet = by_queue["normal"], by_queue[""]
    assert normal.completed == 4 and normal.at == start.replace(second=0)
    assert (normal.failed, normal.retried) == (0, 0)
    low = by_queue["low"]  # failures and retries are counted per queue too
    assert (low.completed, low.failed, low.retried) == (0, 1, 2)
    assert 0.25 < normal.processing_p50 <= 0.5 and 2.5 < normal.processing_p95 <= 5.0
    assert normal.processing_sum == pytest.approx(5.3)
    assert fleet.completed == 4 and fleet.failed == 1 and fleet.retried == 2
    # Every timed attempt, failed ones included, is in the processing figures and their count.
    assert fleet.processing_count == 6 and fleet.processing_sum == pytest.approx(7.0)
    assert MetricSample.objects.count() == 5  # four queues and the fleet


@pytest.mark.django_db(transaction=True)
def test_only_one_sampler_writes_each_minute(redis):
    now = timezone.now()
    sample_take(now=now - timedelta(minutes=1))  # baseline
    results = []
    threads = [threading.Thread(target=lambda: results.append(sample_take(now=now))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(1 for result in results if result is not None) == 1
    assert MetricSample.objects.filter(queue="").count() == 1


def fleet_rows(start, values):
    """One fleet sample per minute: (completed, failed, processing_p95, depth)."""
    for index, (completed, failed, p95, depth) in enumerate(values):
        MetricSample.objects.create(at=start + timedelta(minutes=index), queue="", completed=completed,
                                    failed=failed, processing_p95=p95, processing_sum=(completed + failed) * 0.5,
                                    processing_count=completed + failed,
                                    depth=depth, wait_p50=0.1, wait_p95=0.4, workers=4, busy_ratio=0.8)


@pytest.mark.django_db
def test_performance_comes_from_recorded_samples(client, admin_user):
    now = timezone.now().replace(second=0, microsecond=0)
    fleet_rows(now - timedelta(minutes=60), [(10, 0, 1.0, 5)] * 30 + [(30, 2, 2.0, 40)] * 30)
    report = performance(window="1h", now=now)
    assert report["samples"] == 60
    assert report["throughput_per_minute"] == pytest.approx(20.0)
    assert report["error_rate"] == pytest.approx(60 / 1260)
    assert report["processing_seconds"] == {"average": pytest.approx(0.5), "p95": 2.0}
    assert report["trends"] == {"throughput": "increasing", "processing_p95": "increasing",
                                "queue_depth": "increasing", "throughput_trend": "increasing",
                                "processing_time_trend": "increasing", "error_rate_trend": "increasing"}
    # The old system's names and units: error rate in percent, the period in words.
    assert report["period"] == "1 hour" and report["metrics"] == {
        "avg_processing_time": pytest.approx(0.5), "throughput": pytest.approx(20.0),
        "error_rate": pytest.approx(100 * 60 / 1260), "queue_wait_time": report["queue_wait_seconds"]["p50"]}
    client.force_login(admin_user)
    body = client.get(reverse("api-performance"), {"window": "1h"}).json()
    assert body["samples"] in (59, 60)  # the live window starts at a second within the first minute
    assert body["trends"]["throughput"] == "increasing"
    bad = client.get(reverse("api-performance"), {"window": "1 fortnight"})
    assert bad.status_code == 400 and bad.json()["field"] == "window" and "15m, 1h" in bad.json()["error"]


@pytest.mark.django_db
def test_performance_without_samples_says_so(client, admin_user):
    report = performance(window="15m")
    assert report["samples"] == 0 and report["throughput_per_minute"] is None
    assert report["trends"]["throughput"] == "stable"


@pytest.mark.django_db
def test_old_minutes_fold_into_hours_and_expire(settings):
    settings.METRICS_RETENTION_DAYS = 3
    now = timezone.now()
    two_days_ago = (now - timedelta(days=2)).replace(minute=0, second=0, microsecond=0)
    fleet_rows(two_days_ago, [(5, 1, 1.0, 3)] * 60)
    fleet_rows((now - timedelta(days=5)).replace(minute=0, second=0, microsecond=0), [(1, 0, 1.0, 1)] * 3)
    fleet_rows(now - timedelta(minutes=10), [(7, 0, 1.0, 2)] * 5)
    result = samples_compact(now=now)
    hourly = MetricSample.objects.get(resolution="1h", at=two_days_ago)
    assert (hourly.completed, hourly.failed, hourly.depth) == (300, 60, 3)
    assert hourly.processing_count == 360 and hourly.processing_sum == pytest.approx(180.0)
    assert result["folded"] == 63 and result["deleted"] == 1  # the five-day-old hour is folded, then expired
    assert MetricSample.objects.filter(resolution="1m").count() == 5


@pytest.mark.django_db
def test_capacity_report_against_targets(capsys):
    now = timezone.now().replace(second=0, microsecond=0)
    fleet_rows(now - timedelta(minutes=30), [(60, 0, 1.0, 80)] * 30)
    MetricSample.objects.update(busy_ratio=0.95)
    report = capacity_report(days=7, now=now)
    checks = {check["target"]: check["ok"] for check in report["checks"]}
    assert checks == {"throughput >= 50 tasks/min at peak": True, "backlog < 50": False,
                      "utilisation 70-85 %": False, "pickup < 2 min": True}
    assert report["advice"][0].startswith("Scale up: about 5 workers")
    call_command("capacity_report", "--days", "7")
    out = capsys.readouterr().out
    assert "MISS backlog < 50" in out and "Scale up" in out
    call_command("capacity_report", "--json")
    assert json.loads(capsys.readouterr().out)["measured"]["peak_backlog"] == 80


@pytest.mark.django_db
def test_capacity_report_rejects_bad_days():
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="--days must be between 1 and 365"):
        call_command("capacity_report", "--days", "0")


@pytest.mark.django_db
def test_run_sampler_once(redis, capsys):
    call_command("run_sampler", "--once")
    assert "Wrote 0 sample(s)." in capsys.readouterr().out  # the first minute sets the baseline
    call_command("run_sampler", "--once")
    assert "already sampled" in capsys.readouterr().out


def minute_rows(start, count, *, skip=()):
    """``count`` fleet minute samples from ``start`` with varied figures; minutes in ``skip`` have none (the sampler
    was down). Returns the rows written."""
    rows = []
    for index in range(count):
        if index in skip:
            continue
        completed, failed = index % 7 + 1, index % 3 == 0
        rows.append(MetricSample.objects.create(
            at=start + timedelta(minutes=index), queue="", completed=completed, failed=failed, retried=index % 2,
            processing_count=completed + failed, processing_sum=(completed + failed) * (0.5 + index % 4),
            processing_p50=0.5 + index % 4, processing_p95=2.0 + index % 5, depth=index % 11, workers=3,
            busy_ratio=0.5, wait_p50=0.1, wait_p95=0.4))
    return rows


@pytest.mark.django_db
def test_folding_twice_keeps_every_minute_of_every_hour():
    now = timezone.now().replace(minute=23, second=0, microsecond=0)
    # 14 hours of minutes from 34 h ago (starting at :40, so the first and last hours are partial), with a gap.
    start = (now - timedelta(hours=34)).replace(minute=40)
    rows = minute_rows(start, 14 * 60 + 7, skip=range(200, 260))
    for moment in (now, now + timedelta(minutes=37), now + timedelta(hours=2, minutes=5)):
        samples_compact(now=moment)
    later = now + timedelta(hours=2, minutes=5)
    assert MetricSample.objects.filter(resolution="1h").exists()
    # What is left at minute resolution is only what is younger than the last fold's whole-hour cutoff.
    cutoff = (later - timedelta(days=1)).replace(minute=0)
    assert not MetricSample.objects.filter(resolution="1m", at__lt=cutoff).exists()

    report = performance(window="7d", now=later)
    assert report["totals"] == {"completed": sum(row.completed for row in rows),
                                "failed": sum(row.failed for row in rows),
                                "retried": sum(row.retried for row in rows), "minutes": len(rows)}
    assert report["throughput_per_minute"] == pytest.approx(sum(row.completed for row in rows) / len(rows))
    assert report["processing_seconds"]["average"] == pytest.approx(
        sum(row.processing_sum for row in rows) / sum(row.processing_count for row in rows))


@pytest.mark.django_db
def test_folding_into_an_existing_hour_adds_to_it():
    hour = (timezone.now() - timedelta(days=3)).replace(minute=0, second=0, microsecond=0)
    MetricSample.objects.create(at=hour, resolution="1h", queue="", minutes=30, completed=100, failed=4, retried=2,
                                processing_count=104, processing_sum=104.0, processing_p50=1.0, processing_p95=2.0,
                                wait_p50=0.2, wait_p95=0.5, depth=9, workers=2, busy_ratio=0.4)
    for index in range(30):  # the other half of the hour, still at minute resolution
        MetricSample.objects.create(at=hour + timedelta(minutes=30 + index), queue="", completed=2, failed=0,
                                    processing_count=2, processing_sum=6.0, processing_p50=3.0, processing_p95=5.0,
                                    wait_p50=0.6, wait_p95=0.7, depth=4, workers=3, busy_ratio=0.8)
    samples_compact()
    hourly = MetricSample.objects.get(resolution="1h", at=hour, queue="")
    assert (hourly.minutes, hourly.completed, hourly.failed, hourly.retried) == (60, 160, 4, 2)
    assert (hourly.processing_count, hourly.processing_sum) == (164, pytest.approx(284.0))
    assert hourly.processing_p50 == pytest.approx((1.0 * 104 + 3.0 * 60) / 164)  # weighted by attempts timed
    assert hourly.processing_p95 == 5.0 and hourly.wait_p95 == 0.7
    assert hourly.wait_p50 == pytest.approx((0.2 * 100 + 0.6 * 60) / 160)
    assert hourly.busy_ratio == pytest.approx(0.6)  # weighted by the minutes each part covers
    assert (hourly.depth, hourly.workers) == (9, 3)
    assert not MetricSample.objects.filter(resolution="1m").exists()


@pytest.mark.django_db
def test_a_sampler_gap_is_booked_over_the_minutes_it_covers(redis):
    start = timezone.now().replace(second=5, microsecond=0) - timedelta(minutes=10)
    BUFFER.take()
    assert sample_take(now=start) == []  # the baseline
    for _ in range(35):
        record_attempt(queue="normal", outcome="completed", processing_seconds=0.3, wait_seconds=0.02)
    # The sampler was down for six minutes: the next sample holds seven minutes of counts and says so.
    rows = {row.queue: row for row in sample_take(now=start + timedelta(minutes=7))}
    assert (rows[""].at, rows[""].minutes, rows[""].completed) == (start.replace(second=0), 7, 35)
    assert (rows["normal"].minutes, rows["normal"].completed) == (7, 35)
    rows = {row.queue: row for row in sample_take(now=start + timedelta(minutes=8))}
    assert (rows[""].at, rows[""].minutes) == (start.replace(second=0) + timedelta(minutes=7), 1)
    report = performance(window="15m", now=start + timedelta(minutes=8, seconds=30))
    assert report["totals"]["minutes"] == 8 and report["totals"]["completed"] == 35
    assert report["throughput_per_minute"] == pytest.approx(35 / 8)
    assert capacity_report(days=1, now=start + timedelta(minutes=9))["measured"]["peak_throughput_per_minute"] == \
        pytest.approx(5.0)  # 35 over the seven minutes they were done in, not 35 in one minute
