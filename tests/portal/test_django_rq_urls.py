"""django-rq's own pages must not change queue state: nothing outside our services, role-checked and audited, may
empty, delete, requeue, enqueue or stop anything (DESIGN.md, invariant 8), and reading must not clean registries.

The URL list comes from ``django_rq.urls.urlpatterns`` itself, so a URL a new django-rq version adds is requested
too. Both places django-rq can mount them are tried: our old ``include()`` at /admin/rq/ and its admin integration
(the "Django-RQ" dashboard model) at /admin/django_rq/dashboard/.
"""

import re
import time
from datetime import datetime, timedelta, timezone

import pytest
from django.urls import reverse
from django.urls.resolvers import RegexPattern, RoutePattern
from django_rq import urls as django_rq_urls
from rq.registry import (
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.worker import Worker

from monitoring.metrics.recorder import POOLS_KEY
from queues import broker
from queues.models import AuditEntry, job_id_for
from queues.services import TaskSpec, tasks_submit_many

pytestmark = pytest.mark.django_db

MOUNTS = ["/admin/rq/", "/admin/django_rq/dashboard/"]
QUEUE_INDEX = 2  # "normal" in RQ_QUEUES' order (urgent, high, normal, low): where the jobs below are


def redis_dump(connection) -> dict:
    """Every key with its type and whole content (SCAN is fine in a test's small database, never in the portal),
    but for this process' own Redis pool report (monitoring.metrics.recorder writes it every few seconds)."""
    dump = {}
    for key in connection.scan_iter(count=1000):
        if key == POOLS_KEY.encode():
            continue
        kind = connection.type(key).decode()
        if kind == "string":
            content = connection.get(key)
        elif kind == "list":
            content = connection.lrange(key, 0, -1)
        elif kind == "set":
            content = sorted(connection.smembers(key))
        elif kind == "zset":
            content = connection.zrange(key, 0, -1, withscores=True)
        elif kind == "hash":
            content = sorted(connection.hgetall(key).items())
        else:
            content = connection.dump(key)
        dump[key.decode()] = (kind, content)
    return dump


@pytest.fixture
def queue_state(redis, media_image, django_capture_on_commit_callbacks):
    """Jobs waiting in "normal", and caption jobs in each of its registries, some of them expired (so that any
    registry cleanup a page ran would move or drop them), plus a registered worker. Returns a job id of each kind."""
    with django_capture_on_commit_callbacks(execute=True):
        task_ids = tasks_submit_many(specs=[TaskSpec(media_image(), priority="normal") for _ in range(8)]).created
    assert broker.queue_lengths()["normal"] == 8
    queue = broker.get_queue("normal")
    jobs = {name: queue.fetch_job(job_id_for(task_id)) for name, task_id in zip(
        ["queued", "queued_too", "failed", "failed_expired", "started_expired", "finished_expired", "scheduled",
         "deferred"], task_ids)}
    for name, job in jobs.items():
        if not name.startswith("queued"):
            queue.remove(job)  # each job sits in one place, as rq keeps them
    expired = time.time() - 3600
    FailedJobRegistry(queue=queue).add(jobs["failed"], ttl=3600, exc_string="Traceback: boom")
    FailedJobRegistry(queue=queue).add(jobs["failed_expired"], ttl=3600, exc_string="Traceback: old boom")
    redis.zadd(FailedJobRegistry(queue=queue).key, {jobs["failed_expired"].id: expired})
    redis.zadd(StartedJobRegistry(queue=queue).key, {jobs["started_expired"].id: expired})
    redis.zadd(FinishedJobRegistry(queue=queue).key, {jobs["finished_expired"].id: expired})
    ScheduledJobRegistry(queue=queue).schedule(jobs["scheduled"], datetime.now(timezone.utc) + timedelta(hours=1))
    DeferredJobRegistry(queue=queue).add(jobs["deferred"], ttl=3600)
    # rq's plain worker registration: our CaptionWorker would also refresh its liveness key from a thread.
    worker = Worker(broker.get_queues(), connection=redis, name="default.testhost.0.rqurls")
    worker.register_birth()
    # What this process counted while setting up (the submissions) reaches Redis now, not from the metrics flusher's
    # thread in the middle of the test's before-and-after comparison.
    from monitoring.metrics.recorder import BUFFER

    BUFFER.flush()
    yield {"job_ids": [job.id for job in jobs.values()], "worker_key": worker.key}
    worker.register_death()


def urls_for(pattern, *, job_id: str, worker_key: str) -> list[str]:
    """Concrete paths (relative to a mount) for one django-rq URL pattern, its arguments filled from real state."""
    values = {"queue_index": str(QUEUE_INDEX), "job_id": job_id, "result_id": "1", "key": worker_key,
              "scheduler_index": "0", "connection_index": "0", "scheduler_name": "scheduler",
              "cron_job_name": "job/name", "token": "sometoken"}
    if isinstance(pattern, RoutePattern):
        route = str(pattern)

        def fill(match):
            if match.group(1) not in values:
                raise AssertionError(f"django-rq URL {route!r} has an argument {match.group(1)!r} this test does "
                                     "not know how to fill: add it")
            return values[match.group(1)]

        return [re.sub(r"<(?:\w+:)?(\w+)>", fill, route)]
    assert isinstance(pattern, RegexPattern), pattern
    regex = str(pattern).lstrip("^").rstrip("$")
    with_groups = re.sub(r"\(\?P<(\w+)>[^)]*\)\??", lambda match: values[match.group(1)], regex)
    without_groups = re.sub(r"\(\?P<(\w+)>[^)]*\)\??", "", regex)
    paths = {re.sub(r"/+", "/", candidate.replace("/?", "/").replace("\\", "")).lstrip("/")
             for candidate in (with_groups, without_groups)}
    return sorted(paths)


def every_django_rq_request(queue_state):
    """(method, path, data) for every django-rq URL at every mount, with each job id where the URL takes one, and
    POST bodies that would trigger each bulk action."""
    job_ids = queue_state["job_ids"]
    bulk = [{"action": action, "job_ids": job_ids, "_selected_action": job_ids, "next_url": "/admin/"}
            for action in ("delete", "requeue", "stop", "enqueue", "empty")]
    for mount in MOUNTS:
        for pattern in django_rq_urls.urlpatterns:
            takes_job = "job_id" in str(pattern.pattern)
            for job_id in (job_ids if takes_job else job_ids[:1]):
                for relative in urls_for(pattern.pattern, job_id=job_id, worker_key=queue_state["worker_key"]):
                    yield "get", mount + relative, {}
                    for data in [{}, *bulk]:
                        yield "post", mount + relative, data


@pytest.mark.parametrize("user_fixture", ["support_user", "operator_user", "admin_user", "superuser"])
def test_django_rq_pages_change_nothing_in_redis(client, request, queue_state, redis, user_fixture):
    client.force_login(request.getfixturevalue(user_fixture))
    before = redis_dump(redis)
    assert {"rq:failed:normal", "rq:wip:normal", "rq:finished:normal", "rq:scheduled:normal", "rq:deferred:normal",
            "rq:queue:normal"} <= set(before)
    answered = []
    requests = list(every_django_rq_request(queue_state))
    for index, (method, path, data) in enumerate(requests):
        response = getattr(client, method)(path, data)
        answered.append((method, path, response.status_code))
        if index + 1 == len(requests) or requests[index + 1][1] != path:  # Redis read back once per URL
            assert redis_dump(redis) == before, f"a GET or POST of {path} as {user_fixture} changed Redis"
    assert answered and all(status == 404 for _, _, status in answered), [
        entry for entry in answered if entry[2] != 404][:5]
    assert broker.queue_lengths()["normal"] == 2
    assert not AuditEntry.objects.exists()


@pytest.fixture
def superuser(django_user_model):
    return django_user_model.objects.create_superuser("root-super", "", "pw-root-super")


@pytest.mark.parametrize("user_fixture", ["admin_user", "superuser", "support_user"])
def test_admin_index_does_not_link_to_django_rq(client, request, redis, user_fixture):
    client.force_login(request.getfixturevalue(user_fixture))
    page = client.get(reverse("admin:index"))
    assert page.status_code == 200
    text = page.content.decode()
    assert "django_rq" not in text and "/admin/rq/" not in text and "Django-RQ" not in text
