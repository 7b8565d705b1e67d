"""Fixtures of the migration tests: database-dispatched tasks, RQ workers alive or at work."""

import subprocess
import sys

import pytest
from django.conf import settings
from django.utils import timezone

from queues import broker
from queues.fleet.worker import CaptionWorker
from queues.models import CaptionTask, Dispatch
from tests.conftest import subprocess_env
from tests.processes import start_command, stop_process, wait_for


@pytest.fixture
def database_tasks(db, media_image):
    """Inserts ``count`` queued tasks dispatched to the database poller; returns their ids."""

    def insert(count: int, *, priority: str = "normal") -> list[int]:
        reference = media_image()
        return CaptionTask.objects.insert_new([(reference, priority, None)] * count, publish_after=timezone.now(),
                                              dispatch=[Dispatch.DATABASE] * count)

    return insert


@pytest.fixture
def registered_worker(redis):
    """An RQ worker that is alive (registered, liveness key) but takes no jobs: tasks stay queued in Redis."""
    worker = CaptionWorker(broker.get_queues(), connection=broker.get_connection(), name="idle-worker")
    worker.register_birth()
    yield worker
    worker.register_death()


@pytest.fixture
def rq_worker_process(redis, tmp_path):
    process = start_command("rqworker", "urgent", "high", "normal", "low", "--name", "migration-test-worker",
                            "--verbosity", "0")
    try:
        wait_for(lambda: any(w.name == "migration-test-worker" for w in broker.workers()), 30, "the RQ worker started")
        yield process
    finally:
        stop_process(process, grace=30)


@pytest.fixture
def slow_poller(database_tasks, http_server, png_bytes):
    """``start(name, count, delay)``: ``count`` database tasks whose captions take ``delay`` s (a local Ollama
    stand-in) and a ``manage.py run_legacy_worker --name NAME`` process on them; returns (process, task ids). The
    test stops the process."""
    from tests.processes import slow_ollama

    def start(name: str, count: int, delay: float) -> tuple[subprocess.Popen, list[int]]:
        url = slow_ollama(http_server, png_bytes, delay=delay)
        ids = database_tasks(count)
        CaptionTask.objects.filter(pk__in=ids).update(image_ref=url)
        env = subprocess_env(CAPTION_BACKEND="ollama", OLLAMA_URL=http_server.url, IMAGE_FETCH_ALLOW_PRIVATE="true")
        process = subprocess.Popen([sys.executable, "manage.py", "run_legacy_worker", "--name", name,
                                    "--interval", "0.05"], cwd=settings.BASE_DIR, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return process, ids

    return start

