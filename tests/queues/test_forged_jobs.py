"""Jobs written into Redis by someone else must not run: other callables, pickled data, callbacks."""

import os
import pickle
import subprocess
import sys
import zlib

import pytest
from django.conf import settings
from rq import Queue
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from tests.conftest import run_worker, subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)


class RunsOnUnpickle:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def forge_jobs(redis, marker_dir):
    """Three forged jobs: a JSON job naming os.system, a pickled job, and a job whose data unpickles to a call."""
    json_queue = Queue("normal", connection=redis, serializer=JSONSerializer)
    json_queue.enqueue_call("os.system", args=(f"touch {marker_dir / 'json'}",), job_id="forged-json")
    pickle_queue = Queue("normal", connection=redis)  # rq's default serializer: pickle
    pickle_queue.enqueue_call("os.system", args=(f"touch {marker_dir / 'pickle'}",), job_id="forged-pickle")
    job = json_queue.enqueue_call("queues.jobs.caption_task", args=(1,), job_id="forged-payload")
    payload = pickle.dumps((RunsOnUnpickle(marker_dir / "payload"), None, (), {}))
    redis.hset(job.key, "data", zlib.compress(payload))
    # An allowed function, but with a callback that names os.system.
    job = json_queue.enqueue_call("queues.jobs.caption_task", args=(999999,), job_id="forged-callback")
    redis.hset(job.key, mapping={"success_callback_name": "os.system", "failure_callback_name": "os.system"})
    return ["forged-json", "forged-pickle", "forged-payload"]


def test_worker_refuses_forged_jobs(redis, tmp_path):
    failing = forge_jobs(redis, tmp_path)
    run_worker()
    assert list(tmp_path.iterdir()) == []  # nothing ran
    registry = FailedJobRegistry("normal", connection=redis)
    assert sorted(registry.get_job_ids(cleanup=False)) == sorted(failing)
    json_job = registry.job_class.fetch("forged-json", connection=redis, serializer=JSONSerializer)
    assert "not an allow-listed callable" in json_job.latest_result().exc_string


def test_manage_py_rqworker_refuses_forged_jobs_too(redis, tmp_path):
    forge_jobs(redis, tmp_path)
    environment = subprocess_env()
    # Even asked for rq's default (pickle) serializer, the command will not unpickle anything.
    result = subprocess.run(
        [sys.executable, "manage.py", "rqworker", "--burst", "urgent", "high", "normal", "low"],
        cwd=settings.BASE_DIR, env=environment, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []
    assert FailedJobRegistry("normal", connection=redis).get_job_count(cleanup=False) == 3


@pytest.mark.parametrize("option, message", [
    (["--worker-class", "rq.Worker"], "must be queues.fleet.worker.CaptionWorker"),
    (["--serializer", "rq.serializers.DefaultSerializer"], "--serializer cannot be changed"),
    (["--job-class", "rq.job.Job"], "--job-class cannot be changed"),
    (["nowhere"], "Unknown queue(s): nowhere"),
])
def test_rqworker_refuses_options_that_bypass_the_allow_list(redis, option, message):
    environment = subprocess_env()
    result = subprocess.run([sys.executable, "manage.py", "rqworker", "--burst", *option], cwd=settings.BASE_DIR,
                            env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
