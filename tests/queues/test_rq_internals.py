"""The private and internal parts of rq the worker, the broker and the reconciler depend on (README, "rq's own tools
and rq's internals"). Each is pinned here by name and by the parameters we pass, so an rq upgrade that changes one
fails with its name instead of somewhere in a drill. The behaviour behind each is exercised by the worker, slot and
drill tests; this file says which parts of rq those rest on.
"""

from __future__ import annotations

import inspect
import logging

import pytest
import rq
from rq import worker_registration
from rq.command import parse_payload, send_command
from rq.executions import Execution
from rq.job import Job, _job_stack
from rq.queue import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.timeouts import TimerDeathPenalty
from rq.utils import now, utcformat, utcparse
from rq.worker import BaseWorker, SimpleWorker, Worker, WorkerStatus

# (object, attribute, parameters our calls pass or our overrides receive)
CALLED = [
    (Execution, "create", ["job", "ttl", "pipeline", "worker_name"]),  # worker_name: rq 2.11+
    (Execution, "delete", ["job", "pipeline"]),
    (Job, "prepare_for_execution", ["worker_name", "pipeline"]),
    (Job, "_execute", []),
    (BaseWorker, "handle_execution_ended", ["job", "queue", "heartbeat_ttl"]),
    (BaseWorker, "handle_exception", ["job"]),
    (BaseWorker, "handle_job_failure", ["job", "queue", "started_job_registry", "exc_string"]),
    (SimpleWorker, "get_heartbeat_ttl", ["job"]),
    (BaseWorker, "procline", ["message"]),
    (BaseWorker, "reorder_queues", ["reference_queue"]),
    (BaseWorker, "run_maintenance_tasks", []),
    (BaseWorker, "stop_scheduler", []),
    (BaseWorker, "register_birth", []),
    (BaseWorker, "register_death", []),
    (BaseWorker, "serialize", []),
    (Queue, "dequeue_any", ["queues", "timeout", "connection", "job_class", "serializer", "death_penalty_class"]),
    (Queue, "lmove", ["connection", "queue_key", "timeout"]),
    (Queue, "lpop", ["queue_keys", "timeout", "connection"]),
    (StartedJobRegistry, "remove_executions", ["job"]),
    (FailedJobRegistry, "add", ["job", "ttl", "exc_string", "pipeline"]),
    (worker_registration, "register", ["worker", "pipeline"]),
    (worker_registration, "unregister", ["worker", "pipeline"]),
]

# Methods of rq's worker the CaptionWorker replaces, with what rq calls them with.
OVERRIDDEN = [
    (BaseWorker, "_shutdown", []),
    (BaseWorker, "_install_signal_handlers", []),
    (BaseWorker, "request_stop", ["signum", "frame"]),
    (BaseWorker, "request_force_stop", ["signum", "frame"]),
    (BaseWorker, "handle_payload", ["message"]),
    (BaseWorker, "check_for_suspension", ["burst"]),
    (BaseWorker, "heartbeat", ["timeout", "pipeline"]),
    (BaseWorker, "set_state", ["state", "pipeline"]),
    (BaseWorker, "set_current_job_id", ["job_id", "pipeline"]),
    (BaseWorker, "dequeue_job_and_maintain_ttl", ["timeout", "max_idle_time"]),
    (BaseWorker, "bootstrap", []),
    (BaseWorker, "teardown", []),
    (BaseWorker, "subscribe", []),
    (BaseWorker, "unsubscribe", []),
    (BaseWorker, "kill_horse", ["sig"]),
    (SimpleWorker, "execute_job", ["job", "queue"]),
    (BaseWorker, "perform_job", ["job", "queue"]),
]


@pytest.mark.parametrize(("owner", "name", "parameters"), CALLED + OVERRIDDEN,
                         ids=[f"{getattr(owner, '__name__', owner)}.{name}" for owner, name, _ in CALLED + OVERRIDDEN])
def test_rq_still_has_what_we_call_or_override(owner, name, parameters):
    function = getattr(owner, name, None)
    assert callable(function), f"rq {rq.__version__}: {owner.__name__}.{name} is gone"
    accepted = inspect.signature(function).parameters
    missing = [parameter for parameter in parameters if parameter not in accepted]
    assert not missing, f"rq {rq.__version__}: {owner.__name__}.{name} no longer takes {missing}"


def test_rq_still_has_the_state_and_names_we_rely_on(redis):
    """Attributes the worker writes or reads (rq's _shutdown decides on _state; handle_job_failure reads
    _stopped_job_id), the job stack get_current_job() reads, the key prefixes and job hash fields the Lua script and
    the reconciler read, and the function name our dequeue log filter matches."""
    worker = SimpleWorker([Queue("pin", connection=redis)], connection=redis, name="pin")
    for attribute in ("_state", "_stop_requested", "_stopped_job_id", "_ordered_queues", "last_heartbeat",
                      "current_job_working_time", "pubsub", "pubsub_thread", "scheduler", "worker_ttl"):
        assert hasattr(worker, attribute), f"rq {rq.__version__}: workers have no {attribute}"
    assert hasattr(_job_stack, "push") and hasattr(_job_stack, "pop")
    assert Worker.redis_worker_namespace_prefix == "rq:worker:" and worker_registration.REDIS_WORKER_KEYS == "rq:workers"
    assert Job.redis_job_namespace_prefix == "rq:job:"
    job = Queue("pin", connection=redis).enqueue(print, job_id="pin-job")
    assert job.execution_registry.key == "rq:executions:pin-job"
    assert {b"status", b"origin", b"enqueued_at"} <= set(redis.hkeys(job.key))
    assert {"worker_name", "started_at"} <= set(job.to_dict())  # reset by a new publication (the Lua compares them)
    assert Worker.redis_workers_keys == "rq:workers"
    assert hasattr(TimerDeathPenalty, "handle_death_penalty") and hasattr(TimerDeathPenalty(1), "_exception")
    assert {WorkerStatus.IDLE, WorkerStatus.BUSY, WorkerStatus.SUSPENDED} == {"idle", "busy", "suspended"}
    assert utcparse(utcformat(now())) is not None
    assert parse_payload({"data": b'{"command": "stop-job", "job_id": "x"}'}) == {"command": "stop-job",
                                                                                   "job_id": "x"}
    assert "connection" in inspect.signature(send_command).parameters
    source = inspect.getsource(BaseWorker.dequeue_job_and_maintain_ttl)
    assert "self.log.info(" in source, "rq's dequeue line moved: queues.fleet.worker._RqDequeueLine filters by function"
    assert logging.getLogger("rq.worker").filters, "the dequeue line filter is installed"


def test_rqs_work_loop_still_installs_handlers_right_before_its_try_and_reads_the_stop_flag_each_turn():
    """CaptionWorker.bootstrap installs its stop handlers first and lets _install_signal_handlers (called by work()
    just before its loop's try) end the start-up window; the loop must still stop at its top on _stop_requested and
    take a None from the dequeue as the end."""
    source = inspect.getsource(BaseWorker.work)
    assert source.index("self._install_signal_handlers()") < source.index("while True")
    assert "if self._stop_requested" in source
    assert "except StopRequested" in source
    assert "result is None" in source


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "published-again"])
def test_a_published_job_has_the_hash_rqs_enqueue_many_writes(redis, settings, fresh):
    """broker.publish writes job hashes itself (one script call per queue, PUBLISH_SCRIPT) from a job rq built: every
    field must be the one rq's own ``Queue.enqueue_many`` writes for the same job, so rq's workers, its tools and
    django-rq read them as their own. Only the two timestamps of the moment differ."""
    from queues import broker

    prepared = [Queue.prepare_data(broker.CAPTION_CALLABLE, args=(task_id,), job_id=f"caption-{task_id}",
                                   timeout=broker.job_timeout(), result_ttl=settings.RQ_RESULT_TTL,
                                   failure_ttl=settings.RQ_FAILURE_TTL, description=f"caption task {task_id}",
                                   meta={"correlation_id": "c-7"} if task_id == 7 else None)
                for task_id in (7, 8)]
    broker.get_queue("low", redis).enqueue_many(prepared)
    by_rq = {task_id: redis.hgetall(f"rq:job:caption-{task_id}") for task_id in (7, 8)}
    redis.flushdb()
    if not fresh:  # a job left from an earlier run: an expiry and a place in the failed-job registry
        redis.hset("rq:job:caption-7", mapping={"status": "failed", "exc_info": "x"})
        redis.expire("rq:job:caption-7", 100)
        redis.zadd(FailedJobRegistry("low", connection=redis).key, {"caption-7": 1})
    assert broker.publish([(7, "low"), (8, "low")], fresh=fresh, correlation_ids={7: "c-7"}) == 2
    for task_id in (7, 8):
        ours = redis.hgetall(f"rq:job:caption-{task_id}")
        if not fresh and task_id == 7:
            assert ours.pop(b"exc_info") == b"x"  # rq's save leaves a field it does not write as it was, too
        moments = (b"created_at", b"enqueued_at")
        assert {key: value for key, value in ours.items() if key not in moments} == \
               {key: value for key, value in by_rq[task_id].items() if key not in moments}
        assert all(utcparse(ours[moment].decode()) for moment in moments)
        job = broker.CaptionJob.fetch(f"caption-{task_id}", connection=redis)
        assert (job.func_name, job.args, job.origin, job.get_status()) == (broker.CAPTION_CALLABLE, [task_id], "low",
                                                                            "queued")
    assert redis.lrange("rq:queue:low", 0, -1) == [b"caption-7", b"caption-8"]
    assert redis.smembers("rq:queues") == {b"rq:queue:low"}
    assert redis.ttl("rq:job:caption-7") == -1
    assert redis.zcard(FailedJobRegistry("low", connection=redis).key) == 0
    assert broker.CaptionJob.fetch("caption-7", connection=redis).meta == {"correlation_id": "c-7"}


@pytest.mark.django_db(transaction=True)  # the pauses are rows, read as a worker does (outside a transaction)
def test_the_worker_pops_a_job_with_its_hash_in_one_call_and_passes_over_ids_whose_hash_is_gone(redis):
    """CaptionQueue.dequeue_any reads the next job and its hash in one script call (rq's LPOP then HGETALL); an id
    without a hash is dropped as rq's own dequeue drops it, and the queues are taken in the order given."""
    from queues import broker

    redis.rpush("rq:queue:normal", "caption-404")  # its hash was deleted
    broker.publish([(5, "normal"), (6, "high")], fresh=True)
    queues = broker.get_queues(redis)
    order = []
    for _ in range(2):
        job, queue = broker.CaptionQueue.dequeue_any(queues, None, connection=redis, job_class=broker.CaptionJob)
        order.append((queue.name, job.id, job.args, job.origin))
    assert order == [("high", "caption-6", [6], "high"), ("normal", "caption-5", [5], "normal")]
    assert broker.CaptionQueue.dequeue_any(queues, None, connection=redis, job_class=broker.CaptionJob) is None
    assert redis.llen("rq:queue:normal") == 0
