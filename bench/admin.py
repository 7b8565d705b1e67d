"""Admin pages at scale: the task changelist and the queues overview with 1,000,000 tasks in the database and
1,000,000 jobs queued, against the same pages at 1,000, and django-rq's own queue statistics page on the same Redis.

    python bench/admin.py [--n 1000000] [--renders 20]

Pages are rendered through Django's test client as a logged-in admin (middleware, queries, templates, no network).
Goals: changelist <= 300 ms, overview <= 100 ms and overview(1M) / overview(1k) <= 1.5. Last line: JSON.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench.common as common  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.test import Client  # noqa: E402
from django.utils import timezone  # noqa: E402

from queues import broker  # noqa: E402
from queues.models import CaptionTask, TaskStatus  # noqa: E402
from queues.samples import ensure_samples  # noqa: E402

BATCH = 10_000
ERROR_CLASS = "TransientCaptionError"  # the bench's dead letters' error class


def add_tasks(count: int, reference: str) -> None:
    """Rows and their jobs, as bulk submission writes them (published, on the normal queue)."""
    for start in range(0, count, BATCH):
        size = min(BATCH, count - start)
        ids = CaptionTask.objects.insert_new([(reference, "normal", None)] * size, publish_after=timezone.now())
        for chunk in range(0, len(ids), 1000):
            broker.publish([(task_id, "normal") for task_id in ids[chunk:chunk + 1000]], fresh=True)
        CaptionTask.objects.filter(pk__in=ids).update(published_at=timezone.now()) if size <= 1000 else \
            CaptionTask.objects.filter(pk__gte=ids[0], pk__lte=ids[-1]).update(published_at=timezone.now())


def timed(client: Client, url: str, renders: int) -> float:
    client.get(url)  # warm
    samples = []
    for _ in range(renders):
        started = time.perf_counter()
        response = client.get(url)
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (url, response.status_code)
    return common.median(samples)


def timed_django_rq_stats(client: Client, renders: int) -> float:
    """django-rq's queue statistics page, served from bench/peer_urls.py (the portal no longer serves it)."""
    from django.test import override_settings
    from django.urls import clear_url_caches

    with override_settings(ROOT_URLCONF="bench.peer_urls"):
        clear_url_caches()
        try:
            return timed(client, "/django-rq/", renders)
        finally:
            clear_url_caches()


def measure(client: Client, renders: int, user) -> dict:
    return {
        "changelist_ms": timed(client, "/admin/queues/captiontask/", renders),
        "changelist_failed_ms": timed(client, "/admin/queues/captiontask/?status__exact=FAILED", renders),
        "changelist_error_ms": timed(client, f"/admin/queues/captiontask/?last_error_class={ERROR_CLASS}", renders),
        "overview_ms": timed(client, "/admin/queues/queueoverview/", renders),
        "django_rq_stats_ms": timed_django_rq_stats(client, renders),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--renders", type=int, default=20)
    args = parser.parse_args()
    reference = ensure_samples()[0]
    admin = get_user_model().objects.create_superuser("bench-admin", "", "bench-password")
    client = Client(SERVER_NAME="localhost")
    client.force_login(admin)

    add_tasks(1000, reference)
    small = measure(client, args.renders, admin)
    started = time.monotonic()
    add_tasks(args.n - 1000, reference)
    # 1 % dead letters, as a busy day leaves them.
    CaptionTask.objects.filter(pk__lte=CaptionTask.objects.order_by("pk").values_list("pk", flat=True)[
        args.n // 100]).update(status=TaskStatus.FAILED, last_error_class=ERROR_CLASS)
    setup_s = time.monotonic() - started
    assert broker.queue_lengths()["normal"] == args.n
    large = measure(client, args.renders, admin)
    common.finish({
        "benchmark": "admin", "tasks": args.n, "jobs_queued": args.n, "renders": args.renders,
        "changelist_ms": round(large["changelist_ms"], 1),
        "changelist_failed_filter_ms": round(large["changelist_failed_ms"], 1),
        "changelist_error_filter_ms": round(large["changelist_error_ms"], 1),
        "overview_ms": round(large["overview_ms"], 1), "overview_1k_ms": round(small["overview_ms"], 1),
        "overview_ratio": round(large["overview_ms"] / small["overview_ms"], 2),
        "changelist_1k_ms": round(small["changelist_ms"], 1),
        "django_rq_stats_ms": round(large["django_rq_stats_ms"], 1),
        "django_rq_stats_1k_ms": round(small["django_rq_stats_ms"], 1),
        "setup_s": round(setup_s),
    })


if __name__ == "__main__":
    main()
