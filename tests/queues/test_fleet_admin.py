"""Fleet pages in the admin: what each role sees, confirmations, refusals, audit rows."""

import io

import pytest
from django.urls import reverse

from queues import broker
from queues import control
from queues.fleet.worker import CaptionWorker
from queues.models import AuditEntry, FleetEvent, WorkerPool

pytestmark = pytest.mark.django_db


@pytest.fixture
def registered_worker(redis):
    """A real caption worker registered in Redis (as a running one would be), without taking jobs."""
    worker = CaptionWorker(broker.get_queues(), connection=redis, name="default.testhost.0.abc123", pool="default")
    worker.register_birth()
    yield worker
    worker.register_death()


@pytest.fixture
def pool():
    pool, _ = WorkerPool.objects.get_or_create(name="default")
    return pool


def test_pool_scale_needs_confirmation_and_validates(client, operator_user, pool, redis):
    client.force_login(operator_user)
    url = reverse("admin:queues_workerpool_scale", args=[pool.pk])
    page = client.get(url)
    assert page.status_code == 200 and "How many should run?" in page.content.decode()
    assert WorkerPool.objects.get(pk=pool.pk).desired == 2  # GET changes nothing

    refused = client.post(url, {"desired": "50"})
    assert refused.status_code == 400 and "between 2 and 10" in refused.content.decode()
    assert client.post(url, {"desired": "lots"}).status_code == 400

    done = client.post(url, {"desired": "4"}, follow=True)
    assert "scaled to 4 worker(s)" in done.content.decode()
    assert WorkerPool.objects.get(pk=pool.pk).desired == 4
    entry = AuditEntry.objects.get(action="pool_scale")
    assert (entry.user, entry.count, entry.address) == (operator_user, 4, "127.0.0.1")


def test_support_sees_pages_but_cannot_act(client, support_user, pool, redis, registered_worker):
    client.force_login(support_user)
    assert client.get(reverse("admin:queues_workerpool_changelist")).status_code == 200
    page = client.get(reverse("admin:queues_liveworker_changelist"))
    assert page.status_code == 200 and registered_worker.name in page.content.decode()
    assert "Suspend processing" not in page.content.decode()
    for name, args in [("queues_workerpool_scale", [pool.pk]), ("queues_workerpool_restart", [pool.pk]),
                       ("queues_liveworker_restart", [registered_worker.name]),
                       ("queues_liveworker_stop_job", [registered_worker.name]),
                       ("queues_liveworker_suspend", []), ("queues_liveworker_resume", [])]:
        url = reverse(f"admin:{name}", args=args)
        assert client.get(url).status_code == 403
        assert client.post(url, {"desired": "5"}).status_code == 403
    assert WorkerPool.objects.get(pk=pool.pk).desired == 2
    assert not control.processing_suspended()
    assert not AuditEntry.objects.exists() and not FleetEvent.objects.exists()


def test_outsider_is_sent_to_login(client, outsider_user, pool):
    client.force_login(outsider_user)
    response = client.get(reverse("admin:queues_liveworker_changelist"))
    assert response.status_code == 302 and "/login/" in response["Location"]


def test_live_worker_page_lists_worker_details(client, admin_user, registered_worker):
    client.force_login(admin_user)
    page = client.get(reverse("admin:queues_liveworker_changelist")).content.decode()
    assert f'data-worker="{registered_worker.name}"' in page
    assert "urgent high normal low" in page and "MB" in page  # queues and memory from the liveness key


def test_worker_restart_and_stop_job(client, operator_user, registered_worker):
    client.force_login(operator_user)
    restart = reverse("admin:queues_liveworker_restart", args=[registered_worker.name])
    assert "finishes its current task" in client.get(restart).content.decode()
    page = client.post(restart, follow=True).content.decode()
    assert "will restart after its current task" in page
    assert FleetEvent.objects.get(kind=FleetEvent.Kind.RESTART_REQUESTED).worker_name == registered_worker.name
    stop = reverse("admin:queues_liveworker_stop_job", args=[registered_worker.name])
    page = client.post(stop, {"job_id": "caption-1"}, follow=True).content.decode()
    assert "is not running a job" in page
    assert AuditEntry.objects.filter(action="worker_restart", user=operator_user).count() == 1
    unknown = reverse("admin:queues_liveworker_restart", args=["no-such-worker"])
    assert "No worker named" in client.post(unknown, follow=True).content.decode()


def test_suspend_and_resume(client, operator_user, redis):
    client.force_login(operator_user)
    client.post(reverse("admin:queues_liveworker_suspend"))
    assert control.processing_suspended()
    page = client.get(reverse("admin:queues_liveworker_changelist")).content.decode()
    assert "SUSPENDED" in page and "Resume processing" in page
    client.post(reverse("admin:queues_liveworker_resume"))
    assert not control.processing_suspended()
    assert list(AuditEntry.objects.order_by("at").values_list("action", flat=True)) == ["suspend", "resume"]


def test_fleet_history_and_audit_are_read_only(client, admin_user, pool, redis):
    from queues.fleet.services import pool_scale

    pool_scale(pool=pool, desired=3, user=admin_user)
    client.force_login(admin_user)
    history = client.get(reverse("admin:queues_fleetevent_changelist"))
    assert history.status_code == 200 and "Pool scaled" in history.content.decode()
    assert client.get(reverse("admin:queues_auditentry_changelist")).status_code == 200
    event = FleetEvent.objects.get()
    assert client.get(reverse("admin:queues_fleetevent_add")).status_code == 403
    assert client.post(reverse("admin:queues_fleetevent_delete", args=[event.pk]), {"post": "yes"}).status_code == 403
    assert FleetEvent.objects.filter(pk=event.pk).exists()


def test_pool_page_without_redis_says_so(client, admin_user, pool, unreachable_redis):
    client.force_login(admin_user)
    page = client.get(reverse("admin:queues_workerpool_changelist"), follow=True).content.decode()
    assert "Redis is unreachable" in page


def suspend_as(client, user, **headers) -> str | None:
    """Suspends processing through the admin with these request headers; returns the address audited."""
    client.force_login(user)
    client.post(reverse("admin:queues_liveworker_suspend"), **headers)
    return AuditEntry.objects.filter(action="suspend").latest("at").address


def test_audit_address_ignores_x_forwarded_for_unless_a_proxy_header_is_configured(client, operator_user, redis,
                                                                                     settings):
    settings.TRUSTED_PROXY_HEADER = None
    forged = {"HTTP_X_FORWARDED_FOR": "203.0.113.9", "REMOTE_ADDR": "192.0.2.10"}
    assert suspend_as(client, operator_user, **forged) == "192.0.2.10"


def test_audit_address_is_the_entry_the_trusted_proxy_added(client, operator_user, redis, settings):
    settings.TRUSTED_PROXY_HEADER = "HTTP_X_FORWARDED_FOR"
    settings.TRUSTED_PROXY_COUNT = 1
    proxy = {"REMOTE_ADDR": "10.0.0.5"}
    # The client forged the first entry; the proxy appended the address it saw.
    assert suspend_as(client, operator_user, HTTP_X_FORWARDED_FOR="198.51.100.66, 203.0.113.9", **proxy) == \
        "203.0.113.9"
    settings.TRUSTED_PROXY_COUNT = 2  # a CDN in front of the load balancer: two trusted hops append
    assert suspend_as(client, operator_user, HTTP_X_FORWARDED_FOR="198.51.100.66, 203.0.113.9, 10.1.1.1",
                      **proxy) == "203.0.113.9"
    # Fewer entries than trusted hops, or not an address: the peer's address, never a client's word.
    assert suspend_as(client, operator_user, HTTP_X_FORWARDED_FOR="203.0.113.9", **proxy) == "10.0.0.5"
    settings.TRUSTED_PROXY_COUNT = 1
    assert suspend_as(client, operator_user, HTTP_X_FORWARDED_FOR="203.0.113.9, not-an-ip", **proxy) == "10.0.0.5"
    assert suspend_as(client, operator_user, **proxy) == "10.0.0.5"
    assert suspend_as(client, operator_user, HTTP_X_FORWARDED_FOR="2001:db8::7", **proxy) == "2001:db8::7"


# --- stop job: the job the operator saw, never whatever the worker runs when the POST arrives ----------------

@pytest.fixture
def running_task(registered_worker, redis, media_image, django_capture_on_commit_callbacks):
    """Makes the registered worker look busy with a task's job: its row PROCESSING on that worker (what the live
    worker list reads), the job hash naming the worker and the worker's current job (what rq's stop command reads)."""
    from django.utils import timezone

    from queues.models import CaptionTask, TaskStatus
    from queues.services import task_submit

    def start(worker=registered_worker):
        with django_capture_on_commit_callbacks(execute=True):
            task = task_submit(image_ref=media_image())
        CaptionTask.objects.filter(pk=task.pk).update(status=TaskStatus.PROCESSING, worker_name=worker.name,
                                                      started_at=timezone.now())
        redis.hset(f"rq:job:{task.job_id}", "worker_name", worker.name)
        worker.set_current_job_id(task.job_id)
        return task

    return start


@pytest.fixture
def worker_commands(redis, registered_worker):
    """Commands published to the worker (rq's pubsub channel), as the worker's command listener would get them."""
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(registered_worker.pubsub_channel_name)

    def received() -> list[dict]:
        import json

        messages, deadline = [], 0
        while (message := pubsub.get_message(timeout=0.2)) is not None or deadline < 2:
            deadline += 1
            if message:
                messages.append(json.loads(message["data"]))
        return messages

    yield received
    pubsub.close()


def stop_job_link(page: str, worker_name: str) -> str:
    import html
    import re

    links = re.findall(r'href="([^"]*/liveworker/[^"]*/stop-job/[^"]*)"', page)
    assert len(links) == 1, links
    return html.unescape(links[0])


def test_stop_job_stops_the_job_shown_on_the_live_worker_page(client, operator_user, registered_worker,
                                                              running_task, worker_commands):
    task = running_task()
    client.force_login(operator_user)
    page = client.get(reverse("admin:queues_liveworker_changelist")).content.decode()
    link = stop_job_link(page, registered_worker.name)
    assert f"job_id={task.job_id}" in link
    confirmation = client.get(link).content.decode()
    assert f'<input type="hidden" name="job_id" value="{task.job_id}">' in confirmation
    assert task.job_id in confirmation and registered_worker.name in confirmation
    done = client.post(link, {"job_id": task.job_id}, follow=True).content.decode()
    assert f"Asked worker {registered_worker.name} to stop {task.job_id}." in done
    assert worker_commands() == [{"command": "stop-job", "job_id": task.job_id}]
    entry = AuditEntry.objects.get(action="job_stop")
    assert (entry.user, entry.target) == (operator_user, task.job_id)


def test_stop_job_of_a_job_whose_hash_is_gone_still_reaches_the_worker(client, operator_user, registered_worker,
                                                                      running_task, worker_commands, redis):
    """A successful caption deletes its job hash as it ends: a stop sent in that moment used to read the worker
    from the hash and fail with NoSuchJobError (HTTP 500). It goes to the worker, which ignores a job it no longer
    runs."""
    task = running_task()
    client.force_login(operator_user)
    link = stop_job_link(client.get(reverse("admin:queues_liveworker_changelist")).content.decode(),
                         registered_worker.name)
    redis.delete(f"rq:job:{task.job_id}")  # the caption ended between the page and the click
    done = client.post(link, {"job_id": task.job_id}, follow=True)
    assert done.status_code == 200
    assert f"Asked worker {registered_worker.name} to stop {task.job_id}." in done.content.decode()
    assert worker_commands() == [{"command": "stop-job", "job_id": task.job_id}]


def test_stop_job_refuses_when_the_worker_has_moved_on_to_another_job(client, operator_user, registered_worker,
                                                                       running_task, worker_commands):
    seen = running_task()
    client.force_login(operator_user)
    link = stop_job_link(client.get(reverse("admin:queues_liveworker_changelist")).content.decode(),
                         registered_worker.name)
    now_running = running_task()  # the worker finished the first task and took the next before the POST
    page = client.post(link, {"job_id": seen.job_id}, follow=True).content.decode()
    assert (f"Worker {registered_worker.name} is now running {now_running.job_id}, not {seen.job_id}; "
            "nothing stopped") in page
    assert worker_commands() == []
    assert not AuditEntry.objects.filter(action="job_stop").exists()
    assert not FleetEvent.objects.filter(kind=FleetEvent.Kind.JOB_STOP_REQUESTED).exists()


def test_stop_job_without_a_job_id_stops_nothing(client, operator_user, registered_worker, running_task,
                                                 worker_commands):
    running_task()
    client.force_login(operator_user)
    stop = reverse("admin:queues_liveworker_stop_job", args=[registered_worker.name])
    assert client.get(stop).status_code == 400
    assert client.post(stop).status_code == 400
    assert worker_commands() == []
    assert not AuditEntry.objects.filter(action="job_stop").exists()


def test_workers_command_stops_only_the_job_named(registered_worker, running_task, worker_commands):
    from django.core.management import CommandError, call_command

    seen = running_task()
    now_running = running_task()
    with pytest.raises(CommandError, match=f"is now running {now_running.job_id}, not {seen.job_id}; nothing stopped"):
        call_command("workers", "stop-job", registered_worker.name, seen.job_id)
    assert worker_commands() == []
    out = io.StringIO()
    call_command("workers", "stop-job", registered_worker.name, str(now_running.pk), stdout=out)  # a task id works too
    assert f"Asked worker {registered_worker.name} to stop {now_running.job_id}" in out.getvalue()
    assert worker_commands() == [{"command": "stop-job", "job_id": now_running.job_id}]
