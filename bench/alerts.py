"""Alert evaluation and the alert history page at scale.

    python bench/alerts.py [--n 1000000] [--alerts 100000] [--passes 30] [--renders 10]

Evaluation: one pass of every seeded rule (monitoring.alerts.evaluate.alerts_evaluate with a fresh Readings: the metrics
snapshot, health, the minute samples of the window, the oldest PROCESSING task), at 1,000 and at --n tasks in the
database with as many jobs queued, 10 tasks PROCESSING and ten minutes of samples. The peer is the old system's way:
its alert endpoint recomputed the figures from the task table on every request (tasks per status with GROUP BY,
the average caption time of the last hour, the error rate of the last five minutes, PROCESSING tasks older than
2 h), timed on the same database in the same run.

Then evaluation again, and the notification plan (monitoring.alerts.notify.notifications_plan), once the history
holds --alerts rows (about 0.1 % of them firing) with one route.

History: the admin alert list (/admin/monitoring/alert/, as an admin, through Django's test client) with --alerts
rows, newest first, filtered to firing, and filtered by a rare label (queue, an indexed column; instance, the
JSON); the peer is a plain ModelAdmin of the same rows (bench/peer_urls.py).
Goals: eval <= 50 ms and flat (eval_1m / eval_1k <= 1.5); history <= 300 ms. Last line: JSON.
"""

import argparse
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from django.contrib.auth import get_user_model  # noqa: E402
from django.db.models import Avg, Count, F, Q  # noqa: E402
from django.test import Client, override_settings  # noqa: E402
from django.urls import clear_url_caches  # noqa: E402
from django.utils import timezone  # noqa: E402

import bench.common as common  # noqa: E402
from bench.admin import add_tasks, timed  # noqa: E402
from monitoring.alerts.evaluate import alerts_evaluate  # noqa: E402
from monitoring.alerts.notify import notifications_plan  # noqa: E402
from monitoring.alerts.rules import Readings  # noqa: E402
from monitoring.models import Alert, AlertRule, MetricSample, NotificationChannel, NotificationRoute  # noqa: E402
from queues.models import CaptionTask, TaskStatus  # noqa: E402
from queues.samples import ensure_samples  # noqa: E402


def evaluation_ms(passes: int) -> float:
    alerts_evaluate()  # warm: connections, the first alert rows
    samples = []
    for _ in range(passes):
        started = time.perf_counter()
        alerts_evaluate(readings=Readings())
        samples.append((time.perf_counter() - started) * 1000)
    return common.median(samples)


def recompute_from_tasks() -> dict:
    """The old endpoint's approach: every figure from the task table, on every request."""
    now = timezone.now()
    by_status = dict(CaptionTask.objects.order_by().values_list("status").annotate(count=Count("id")))
    hour = CaptionTask.objects.filter(status=TaskStatus.COMPLETED, finished_at__gte=now - timedelta(hours=1))
    average = hour.aggregate(seconds=Avg(F("finished_at") - F("started_at")))["seconds"]
    recent = CaptionTask.objects.filter(finished_at__gte=now - timedelta(minutes=5)).aggregate(
        failed=Count("id", filter=Q(status=TaskStatus.FAILED)), ended=Count("id"))
    stuck = CaptionTask.objects.filter(status=TaskStatus.PROCESSING, started_at__lt=now - timedelta(hours=2)).count()
    return {"by_status": by_status, "average": average, "recent": recent, "stuck": stuck}


def recompute_ms(passes: int) -> float:
    recompute_from_tasks()
    samples = []
    for _ in range(passes):
        started = time.perf_counter()
        recompute_from_tasks()
        samples.append((time.perf_counter() - started) * 1000)
    return common.median(samples)


def labels_of(rule, index: int) -> dict:
    """The rule's labels with a queue and an instance, one row in a thousand on a rare one of each (the filters'
    worst case: newest first, a rare value walks the whole started_at index unless its own index leads)."""
    rare = index % 1000 == 500
    return {**rule.all_labels(), "queue": "rare" if rare else ("normal", "high", "low")[index % 3],
            "instance": "web-rare" if rare else f"web-{index % 4}"}


def add_alerts(count: int) -> None:
    """Alert rows as months of history leave them: mostly resolved, a few firing, over the seeded rules."""
    rules = list(AlertRule.objects.all())
    admin = get_user_model().objects.first()
    now = timezone.now()
    batch = []
    for index in range(count):
        rule = rules[index % len(rules)]
        started = now - timedelta(minutes=5 * (count - index))
        firing = index % 997 == 0
        batch.append(Alert(
            rule=rule, name=rule.name, fingerprint=f"bench{index:027d}", open_key=f"bench{index:027d}" if firing
            else None, state=Alert.State.FIRING if firing else Alert.State.RESOLVED, severity=rule.severity,
            component=rule.component, summary=rule.title, labels=labels_of(rule, index), value=1.0,
            threshold=rule.threshold, started_at=started, holding_since=started, fired_at=started,
            resolved_at=None if firing else started + timedelta(minutes=3), last_seen_at=started,
            resolved_notified=not firing, notified_at=started, queue=labels_of(rule, index)["queue"],
            acknowledged_at=started + timedelta(minutes=1) if index % 3 == 0 else None,
            acknowledged_by=admin if index % 3 == 0 else None))
        if len(batch) == 5000:
            Alert.objects.bulk_create(batch)
            batch = []
    Alert.objects.bulk_create(batch)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--alerts", type=int, default=100_000)
    parser.add_argument("--passes", type=int, default=30)
    parser.add_argument("--renders", type=int, default=10)
    args = parser.parse_args()
    reference = ensure_samples()[0]
    admin = get_user_model().objects.create_superuser("bench-admin", "", "bench-password")
    now = timezone.now().replace(second=0, microsecond=0)
    MetricSample.objects.bulk_create([
        MetricSample(at=now - timedelta(minutes=minute), queue="", completed=120, failed=2, retried=3,
                     processing_count=125, processing_p95=4.2, wait_p95=0.8) for minute in range(1, 11)])

    add_tasks(1000, reference)
    first_ten = list(CaptionTask.objects.order_by("pk").values_list("pk", flat=True)[:10])  # (MariaDB: no LIMIT in IN)
    CaptionTask.objects.filter(pk__in=first_ten).update(
        status=TaskStatus.PROCESSING, started_at=timezone.now())
    small = {"eval": evaluation_ms(args.passes), "peer": recompute_ms(args.passes)}
    started = time.monotonic()
    add_tasks(args.n - 1000, reference)
    ids = CaptionTask.objects.filter(status=TaskStatus.QUEUED).order_by("pk").values_list("pk", flat=True)
    CaptionTask.objects.filter(pk__lte=ids[args.n // 2]).update(
        status=TaskStatus.COMPLETED, started_at=F("created_at"), finished_at=timezone.now())
    CaptionTask.objects.filter(pk__lte=ids[args.n // 100], status=TaskStatus.QUEUED).update(
        status=TaskStatus.FAILED, finished_at=timezone.now())
    setup_s = time.monotonic() - started
    large = {"eval": evaluation_ms(args.passes), "peer": recompute_ms(max(3, args.passes // 10))}

    add_alerts(args.alerts)
    # The notification plan at that history: one route to a webhook (nothing is sent: only planned).
    route = NotificationRoute.objects.create(name="bench", group_wait_seconds=0)
    route.channels.add(NotificationChannel.objects.create(name="bench", kind="webhook",
                                                          config={"url": "http://127.0.0.1:9/hook"}))
    notifications_plan()
    plan_samples = []
    for _ in range(args.passes):
        started = time.perf_counter()
        notifications_plan()
        plan_samples.append((time.perf_counter() - started) * 1000)
    eval_history = evaluation_ms(args.passes)  # with the history in the table
    client = Client(SERVER_NAME="localhost")
    client.force_login(admin)
    history = timed(client, "/admin/monitoring/alert/", args.renders)
    history_firing = timed(client, "/admin/monitoring/alert/?state__exact=firing", args.renders)
    # A label filter: the queue through its indexed column, another label through the JSON (the way both went).
    history_queue = timed(client, "/admin/monitoring/alert/?label=queue%3Drare", args.renders)
    history_json_label = timed(client, "/admin/monitoring/alert/?label=instance%3Dweb-rare", args.renders)
    with override_settings(ROOT_URLCONF="bench.peer_urls"):
        clear_url_caches()
        try:
            plain = timed(client, "/plain-admin/monitoring/alert/", args.renders)
        finally:
            clear_url_caches()
    common.finish({
        "benchmark": "alerts", "tasks": args.n, "alert_rows": Alert.objects.count(), "passes": args.passes,
        "rules": AlertRule.objects.filter(enabled=True).count(),
        "eval_ms": round(small["eval"], 2), "eval_1m_ms": round(large["eval"], 2),
        "eval_ratio": round(large["eval"] / small["eval"], 2),
        "recompute_peer_1k_ms": round(small["peer"], 2), "recompute_peer_1m_ms": round(large["peer"], 1),
        "eval_history_ms": round(eval_history, 2), "plan_ms": round(common.median(plan_samples), 2), "open_alerts": Alert.objects.open().count(),
        "history_ms": round(history, 1), "history_firing_ms": round(history_firing, 1),
        "history_label_queue_ms": round(history_queue, 1), "history_label_json_ms": round(history_json_label, 1),
        "plain_admin_peer_ms": round(plain, 1), "setup_s": round(setup_s),
    })


if __name__ == "__main__":
    main()
