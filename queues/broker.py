"""The one module that talks to rq and Redis for queue work.

Jobs carry only a task id, are JSON-serialised, and have the id ``caption-<task id>``. ``CaptionJob`` refuses to run
anything but the allow-listed callables, so a job forged in Redis (another function, pickled data, callbacks or
webhooks) fails without running; ``queues.fleet.worker.CaptionWorker`` makes every worker use it.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Iterable

import redis
from django.conf import settings
from django_rq.queues import DjangoRQ
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import import_attribute

from portal import redis_pools
from queues.errors import BrokerUnavailable
from queues.models import job_id_for

CAPTION_CALLABLE = "queues.jobs.caption_task"
QUEUE_NAMES: tuple[str, ...] = ("urgent", "high", "normal", "low")
# Redis errors that mean "not reachable right now", as opposed to a bug in how we call it.
UNAVAILABLE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
# Everything Redis can answer instead of doing what was asked: besides the above, out of memory under
# ``noeviction`` (OOM), a replica after a failover (READONLY), a failed snapshot (MISCONF), a server still
# loading its data (LOADING). Publishing and the fleet's duties treat each like an outage: the database row stays
# unpublished and is published once Redis takes writes again.
REDIS_ERRORS = (redis.exceptions.RedisError, OSError)


class ForbiddenJobError(Exception):
    """A job in Redis names a callable, callback or serializer that this portal does not run."""


class CaptionJob(Job):
    """An rq job that can only run allow-listed callables, always with the JSON serializer."""

    def __init__(self, *args, **kwargs):
        kwargs["serializer"] = JSONSerializer
        super().__init__(*args, **kwargs)

    @property
    def func(self):
        name = self.func_name  # raises DeserializationError for data that is not our JSON
        if name not in settings.RQ_ALLOWED_CALLABLES:
            raise ForbiddenJobError(f"job {self.id} names {name!r}, which is not an allow-listed callable")
        if self.instance is not None:
            raise ForbiddenJobError(f"job {self.id} carries an instance; only plain functions are allowed")
        return import_attribute(name)

    # Callbacks and webhooks are named in the job hash, so a forged job could use them to run or reach anything.
    # Caption jobs use neither; whatever a job hash says, there are none.
    @property
    def success_callback(self):
        return None

    @property
    def failure_callback(self):
        return None

    @property
    def stopped_callback(self):
        return None

    def send_webhooks(self, *args, **kwargs):
        return None

    persisted = False  # the worker cleared the hash's expiry in its start-of-job pipeline

    def perform(self):
        if not self.persisted:
            return super().perform()
        from rq.job import _job_stack

        _job_stack.push(self)  # get_current_job() inside the job
        try:
            self._result = self._execute()
        finally:
            _job_stack.pop()
        return self._result


ALIVE_PREFIX = "portal:fleet:alive:"


# A restart asked of a worker that had not read it within this many seconds (it died meanwhile) is forgotten.
RESTART_PREFIX = "portal:worker:restart:"
RESTART_REQUEST_TTL = 600


def alive_key(worker_name: str) -> str:
    """The key a worker's liveness thread refreshes (for display: pid, host, pool, rss, current job)."""
    return ALIVE_PREFIX + worker_name


# The first id in the queues (KEYS, in order) popped, with its job's hash: {queue key, id, hash as a flat list}.
POP_AND_READ_SCRIPT = """
for _, key in ipairs(KEYS) do
  local id = redis.call('LPOP', key)
  if id then return {key, id, redis.call('HGETALL', 'rq:job:' .. id)} end
end
return nil
"""


class CaptionQueue(DjangoRQ):
    """rq's queue (as django-rq builds it) with pausing: workers do not take jobs from paused queues (the
    database's ``QueueState`` rows, through queues.control); their jobs wait. Jobs are published through
    ``publish`` below, never through django-rq's deferred enqueue."""

    @classmethod
    def dequeue_any(cls, queues, timeout, connection=None, **kwargs):
        from rq.exceptions import DequeueTimeout

        from queues import control

        connection = connection or queues[0].connection
        paused = control.paused_queues_cached()
        active = [queue for queue in queues if queue.name not in paused]
        if paused and timeout is not None:
            timeout = min(timeout, 1)  # look at the pauses again soon, so a resume takes effect within ~1 s
        if not active:
            if timeout is None:
                return None
            time.sleep(timeout)
            raise DequeueTimeout(timeout, [queue.key for queue in queues])
        # The next job and its hash in one round trip while there is work; the blocking pop (and rq's HGETALL
        # after it) only when every active queue is empty.
        result = cls._pop_and_read(active, connection=connection, **kwargs)
        if result is None and timeout is not None:
            result = super().dequeue_any(active, timeout, connection=connection, **kwargs)
        if result is not None and paused:
            control.clear_cache()
            if result[1].name in control.paused_queues_cached():
                # Paused between our check and the pop: put the job back at the front, untouched.
                connection.lpush(result[1].key, result[0].id)
                if timeout is None:
                    return None
                raise DequeueTimeout(timeout, [queue.key for queue in queues])
        return result

    @classmethod
    def _pop_and_read(cls, queues, *, connection, job_class=None, serializer=None, death_penalty_class=None):
        """rq's non-blocking dequeue (LPOP from each queue in order, then HGETALL of the job) in one script call. An
        id whose hash is gone is passed over, as rq does. Returns (job, queue) or None when the queues are empty."""
        keys = [queue.key for queue in queues]
        job_class = job_class or CaptionJob
        while True:
            popped = connection.eval(POP_AND_READ_SCRIPT, len(keys), *keys)
            if popped is None:
                return None
            queue_key, job_id, fields = popped
            queue = cls.from_queue_key(queue_key.decode(), connection=connection, job_class=job_class,
                                       serializer=serializer, death_penalty_class=death_penalty_class)
            job = job_class(job_id.decode(), connection=connection, serializer=serializer)
            try:
                job.restore(dict(zip(fields[::2], fields[1::2])))  # NoSuchJobError for an empty hash
            except NoSuchJobError:
                continue  # deleted since it was pushed, or not a job: rq's dequeue passes over such ids too
            except Exception as error:
                error.job_id, error.queue = job.id, queue  # as rq's dequeue reports it
                raise
            return job, queue

    @classmethod
    def lmove(cls, connection, queue_key, timeout):
        """rq pops from a single queue with LMOVE into an ``:intermediate`` list, and only a worker that listens to
        one queue removes the entry again; ours listen to several and may have one left active when the others are
        paused, which left ids behind that rq's maintenance later filed as failed. A plain pop instead: the database
        row, not an intermediate list, is what recovers a job popped by a worker that died."""
        return cls.lpop([queue_key], timeout, connection=connection)


class _ProcessConnection:
    client: redis.Redis | None = None
    pid: int | None = None
    lock = threading.Lock()


_process = _ProcessConnection()
# Called when this process opens its connection pool (monitoring.metrics.recorder starts its flusher, which reports the
# pool's use): a hook rather than an import, since monitoring builds on this module.
CONNECTION_HOOKS: list = []


def get_connection() -> redis.Redis:
    """This process's Redis client: one pool for all of its threads (capped at REDIS_MAX_CONNECTIONS), created
    again after a fork."""
    connection = _process.client
    if connection is not None and _process.pid == os.getpid():
        return connection
    with _process.lock:
        if _process.client is None or _process.pid != os.getpid():
            if settings.EMBEDDED_REDIS:
                from portal.embedded_redis import ensure_embedded_running

                try:
                    ensure_embedded_running(settings.VAR_DIR, settings.EMBEDDED_REDIS_PORT)
                except Exception as error:
                    raise BrokerUnavailable(f"the embedded Redis server could not start: {error}") from error
            _process.client = redis_pools.client(socket_timeout=10,
                                                health_check_interval=settings.REDIS_HEALTH_CHECK_INTERVAL)
            _process.pid = os.getpid()
            for hook in CONNECTION_HOOKS:
                hook()
        return _process.client


def dedicated_connection(*, socket_timeout: float) -> redis.Redis:
    """A connection of its own with a short timeout, for a loop that must never wait long on Redis (the
    supervisor's lease renewal: a frozen or unreachable Redis must not hold it past the lease)."""
    get_connection()  # starts the embedded server if this portal uses one
    return redis_pools.client(socket_timeout=socket_timeout, max_connections=2)


def reset_connection() -> None:
    """Forget this process's connection (tests point REDIS_URL at another server)."""
    with _process.lock:
        connection, _process.client = _process.client, None
    if connection is not None and _process.pid == os.getpid():
        connection.close()


def get_queue(name: str, connection: redis.Redis | None = None) -> Queue:
    if name not in QUEUE_NAMES:
        raise ValueError(f"unknown queue {name!r}; queues are {', '.join(QUEUE_NAMES)}")
    return CaptionQueue(
        name, connection=connection or get_connection(), serializer=JSONSerializer, job_class=CaptionJob,
        default_timeout=job_timeout(),
    )


def get_queues(connection: redis.Redis | None = None) -> list[Queue]:
    """The caption queues in the order workers drain them."""
    connection = connection or get_connection()
    return [get_queue(name, connection) for name in QUEUE_NAMES]


def job_timeout() -> int:
    """rq's hard limit on one job. The captioner enforces RQ_DEFAULT_TIMEOUT itself; this is the backstop that
    leaves the job time to record the timeout in the database after it."""
    return settings.RQ_DEFAULT_TIMEOUT + 30


def _correlation_meta(correlation_id: str) -> dict | None:
    return {"correlation_id": correlation_id} if correlation_id else None


# One call per queue publishes a batch: each job's hash and one RPUSH of every id (rq's enqueue_many sends an HSET of
# about twenty fields, an HSET of the status and an RPUSH per job; packing those arguments is most of its cost).
# KEYS: the queue's list, rq's set of queues, the queue's failed-job registry. ARGV: the queue's key, whether earlier
# jobs may share these ids (1: clear their expiry and take them out of the failed-job registry), the number of
# fields every job shares, those fields and values, then per job its id, data, description and meta ("" for none).
PUBLISH_SCRIPT = """
local shared = tonumber(ARGV[3])
local mapping = {}
for i = 4, 3 + shared * 2 do mapping[#mapping + 1] = ARGV[i] end
local ids = {}
for i = 4 + shared * 2, #ARGV, 4 do
  local key = 'rq:job:' .. ARGV[i]
  local fields = {'data', ARGV[i + 1], 'description', ARGV[i + 2]}
  if ARGV[i + 3] ~= '' then fields[5] = 'meta'; fields[6] = ARGV[i + 3] end
  redis.call('HSET', key, unpack(mapping))
  redis.call('HSET', key, unpack(fields))
  if ARGV[2] == '1' then redis.call('PERSIST', key); redis.call('ZREM', KEYS[3], ARGV[i]) end
  ids[#ids + 1] = ARGV[i]
end
redis.call('RPUSH', KEYS[1], unpack(ids))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""
# Jobs per script call: one call holds Redis for a few milliseconds at most.
PUBLISH_CHUNK = 1000
# Per job: what differs from one caption job to the next; the rest of the hash is the same for a whole batch.
_PER_JOB_FIELDS = ("data", "description", "meta")


def _publish_arguments(queue: Queue, task_ids: list[int], *, republish: bool, correlation_id: str,
                       correlation_ids: dict[int, str] | None) -> tuple[list, list]:
    """The script's keys and arguments for one queue. The hash is rq's own: one job built by rq for the batch gives
    the shared fields (``Job.to_dict``), and each job's data is rq's serialisation of its call, compressed as rq
    does; ``tests/queues/test_rq_internals.py`` compares the result field by field with ``Queue.enqueue_many``'s."""
    job = queue.create_job(CAPTION_CALLABLE, args=(task_ids[0],), job_id=job_id_for(task_ids[0]),
                           timeout=job_timeout(), result_ttl=settings.RQ_RESULT_TTL,
                           failure_ttl=settings.RQ_FAILURE_TTL, status=JobStatus.QUEUED)
    job.origin = queue.name
    job.enqueued_at = job.created_at
    shared = [item for name, value in job.to_dict().items() if name not in _PER_JOB_FIELDS for item in (name, value)]
    arguments = [queue.key, "1" if republish else "0", len(shared) // 2, *shared]
    metas: dict[str, bytes] = {}
    for task_id in task_ids:
        job.args = (task_id,)  # rq's setter: the job's data is serialised again from it
        correlation = (correlation_ids or {}).get(task_id, correlation_id)
        if correlation and correlation not in metas:
            metas[correlation] = job.serializer.dumps(_correlation_meta(correlation))
        arguments += [job_id_for(task_id), zlib.compress(job.data), f"caption task {task_id}",
                      metas[correlation] if correlation else ""]
    keys = [queue.key, Queue.redis_queues_keys, FailedJobRegistry(queue.name, connection=queue.connection).key]
    return keys, arguments


def publish(tasks: Iterable[tuple[int, str]], *, fresh: bool = False, atomic: bool = False,
            correlation_id: str = "", correlation_ids: dict[int, str] | None = None) -> int:
    """Enqueues ``caption-<id>`` jobs for (task id, priority) pairs in one round trip: per queue, one script call
    that writes each job's hash and pushes the ids in order (``PUBLISH_SCRIPT``).

    ``correlation_id``: the submitting request's, kept in each job's meta (the worker logs under it from the
    moment it takes the job); ``correlation_ids``: {task id: its own} instead, for tasks published again.
    ``fresh``: the tasks are new, so no earlier job with their ids exists (saves two commands per job).
    ``atomic``: in one MULTI/EXEC, so that either every job is enqueued or none (the migration's batches: a
    process killed while sending leaves nothing half-published). Each script call (up to ``PUBLISH_CHUNK`` jobs of
    one queue) is atomic in itself.

    Raises BrokerUnavailable when Redis cannot be reached or refuses the writes (out of memory, read-only replica,
    failed snapshot); then nothing is known to be published.
    """
    by_queue: dict[str, list[int]] = defaultdict(list)
    for task_id, priority in tasks:
        by_queue[priority].append(task_id)
    if not by_queue:
        return 0
    try:
        connection = get_connection()
        calls = [(queue_name, task_ids[start:start + PUBLISH_CHUNK]) for queue_name, task_ids in by_queue.items()
                 for start in range(0, len(task_ids), PUBLISH_CHUNK)]
        pipe = connection.pipeline(transaction=atomic and len(calls) > 1)
        for queue_name, task_ids in calls:
            # A task published again (a retry, a requeue) reuses its job id; the key may still carry the expiry rq
            # gave the previous run's result, so it is cleared and the queued job cannot expire before it runs. An
            # earlier run that rq filed as failed (a worker that exited in the middle) is not a dead letter any more.
            keys, arguments = _publish_arguments(get_queue(queue_name, connection), task_ids, republish=not fresh,
                                                 correlation_id=correlation_id, correlation_ids=correlation_ids)
            # EVAL, not EVALSHA: a pipeline with a registered script asks SCRIPT EXISTS first, one more round trip.
            pipe.eval(PUBLISH_SCRIPT, len(keys), *keys, *arguments)
        pipe.execute()
        return sum(len(task_ids) for task_ids in by_queue.values())
    except REDIS_ERRORS as error:
        raise BrokerUnavailable(str(error) or error.__class__.__name__) from error


def ping() -> bool:
    try:
        return bool(get_connection().ping())
    except (BrokerUnavailable, *UNAVAILABLE_ERRORS):
        return False


def jobs_waiting(tasks: list[tuple[int, str]]) -> list[bool]:
    """Whether each (task id, queue) has a live job: its hash says ``queued`` and its id is in the queue's list, or
    says ``started`` (a worker has just popped it). A hash left from the task's earlier life (a dead letter, a
    finished job) does not count. One pipeline of HGET and LPOS. Raises BrokerUnavailable."""
    if not tasks:
        return []
    try:
        pipe = get_connection().pipeline(transaction=False)
        for task_id, queue in tasks:
            pipe.hget(CaptionJob.redis_job_namespace_prefix + job_id_for(task_id), "status")
            pipe.execute_command("LPOS", Queue.redis_queue_namespace_prefix + queue, job_id_for(task_id))
        answers = pipe.execute()
    except REDIS_ERRORS as error:
        raise BrokerUnavailable(str(error) or error.__class__.__name__) from error
    return [status == b"started" or (status == b"queued" and position is not None)
            for status, position in zip(answers[::2], answers[1::2])]


def queue_entries_remove(queue_name: str, task_ids: list[int]) -> int:
    """Takes these tasks' entries out of a queue's list (LREM), and deletes their job hashes where they still say
    ``queued`` (a dead letter's hash, ``failed``, stays in its registry). Returns how many entries were removed.
    Raises BrokerUnavailable."""
    get_queue(queue_name)
    key = Queue.redis_queue_namespace_prefix + queue_name
    removed = 0
    try:
        connection = get_connection()
        for start in range(0, len(task_ids), 1000):
            chunk = task_ids[start:start + 1000]
            pipe = connection.pipeline(transaction=False)
            for task_id in chunk:
                pipe.lrem(key, 0, job_id_for(task_id))
                pipe.hget(CaptionJob.redis_job_namespace_prefix + job_id_for(task_id), "status")
            answers = pipe.execute()
            removed += sum(int(count) for count in answers[::2])
            queued = [task_id for task_id, status in zip(chunk, answers[1::2]) if status == b"queued"]
            if queued:
                connection.unlink(*(CaptionJob.redis_job_namespace_prefix + job_id_for(pk) for pk in queued))
    except REDIS_ERRORS as error:
        raise BrokerUnavailable(str(error) or error.__class__.__name__) from error
    return removed


def fetch_job(task_id: int) -> CaptionJob | None:
    try:
        return CaptionJob.fetch(job_id_for(task_id), connection=get_connection())
    except NoSuchJobError:
        return None


def queue_lengths() -> dict[str, int]:
    """Jobs waiting in each queue, in one pipeline round trip (LLEN only: O(queues), mutates nothing)."""
    connection = get_connection()
    pipe = connection.pipeline(transaction=False)
    for name in QUEUE_NAMES:
        pipe.llen(Queue.redis_queue_namespace_prefix + name)
    return dict(zip(QUEUE_NAMES, pipe.execute()))


def dead_letter_job_ids(queue_name: str, *, limit: int = 100) -> list[str]:
    """Newest job ids in a queue's failed-job registry (rq's dead-letter place), without a cleanup pass."""
    registry = FailedJobRegistry(queue_name, connection=get_connection(), serializer=JSONSerializer,
                                 job_class=CaptionJob)
    return [job_id.decode() if isinstance(job_id, bytes) else job_id
            for job_id in registry.connection.zrevrange(registry.key, 0, limit - 1)]


# --- the fleet's view of rq (used by the fleet: its services, reconcile and supervisor) -------------------------------

def job_forget_execution(task_id: int, queue_name: str) -> None:
    """Removes a crashed run of ``caption-<id>`` from its queue's started-job registry, so rq's maintenance does not
    later file the job as abandoned (we have re-driven the task ourselves)."""
    from rq.registry import StartedJobRegistry

    job = fetch_job(task_id)
    if job is not None:
        registry = StartedJobRegistry(queue_name, connection=get_connection(), job_class=CaptionJob,
                                      serializer=JSONSerializer)
        registry.remove_executions(job)


def job_dead_letter(task_id: int, queue_name: str, reason: str, *, correlation_id: str = "") -> None:
    """Files ``caption-<id>`` in its queue's failed-job registry (the dead-letter place) with ``reason``. A task
    with no job in Redis (the database poller ran it, or its job vanished) gets the job publish would have written,
    saved as failed: dead letters look the same whichever system ran the task (the counts and alerts, the
    dead-letter pages, requeue). One MULTI/EXEC. Raises BrokerUnavailable."""
    from rq.job import JobStatus

    try:
        connection = get_connection()
        pipe = connection.pipeline()
        job = fetch_job(task_id)
        if job is None:
            job = get_queue(queue_name, connection).create_job(
                CAPTION_CALLABLE, args=(task_id,), job_id=job_id_for(task_id), timeout=job_timeout(),
                result_ttl=settings.RQ_RESULT_TTL, failure_ttl=settings.RQ_FAILURE_TTL,
                description=f"caption task {task_id}", meta=_correlation_meta(correlation_id))
            job.save(pipeline=pipe)  # the registry's own save leaves the meta out
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        FailedJobRegistry(queue_name, connection=connection, job_class=CaptionJob, serializer=JSONSerializer).add(
            job, ttl=settings.RQ_FAILURE_TTL, exc_string=reason, pipeline=pipe)
        pipe.execute()
    except REDIS_ERRORS as error:
        raise BrokerUnavailable(str(error) or error.__class__.__name__) from error


def workers() -> list:
    """rq's registered workers (O(workers): the rq:workers set, then one pipelined read)."""
    from rq.worker import Worker

    return Worker.all(connection=get_connection(), job_class=CaptionJob, serializer=JSONSerializer)


def worker_unregister(worker_name: str) -> None:
    """Removes a dead worker's registration (its key and its entries in rq's worker sets)."""
    from rq.worker import Worker
    from rq.worker_registration import unregister

    worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + worker_name, connection=get_connection(),
                                job_class=CaptionJob, serializer=JSONSerializer)
    if worker is not None:
        pipe = get_connection().pipeline()
        unregister(worker, pipeline=pipe)
        pipe.delete(worker.key)
        pipe.execute()


def alive_states(worker_names: list[str]) -> dict[str, dict | None]:
    """Each worker's liveness payload (pid, host, pool, rss, job), or None if its liveness key has expired.

    For display only: a Redis restart or flush removes these keys from live workers too."""
    import json

    if not worker_names:
        return {}
    pipe = get_connection().pipeline(transaction=False)
    for name in worker_names:
        pipe.get(alive_key(name))
    return {name: (json.loads(raw) if raw else None) for name, raw in zip(worker_names, pipe.execute())}


CAPTIONER_PROBLEM_KEY = "portal:captioner:problem"
CAPTIONER_PROBLEM_TTL = 300
_problem_seen = {"until": 0.0, "present": False}  # this process' view, refreshed at most every 5 s


def captioner_problem_report(message: str) -> None:
    """Notes that the captioning service is misconfigured (health and the admin say so for five minutes after the
    last task that met it). Best effort: the held tasks themselves are rows."""
    import json

    try:
        get_connection().set(CAPTIONER_PROBLEM_KEY, json.dumps({"message": message[:500], "at": time.time()}),
                             ex=CAPTIONER_PROBLEM_TTL)
        _problem_seen["present"] = True
    except (BrokerUnavailable, *REDIS_ERRORS):
        pass


def captioner_problem_over() -> None:
    """After a caption succeeded: a reported problem is over. Looks at most every 5 s per process, so a success
    costs no round trip while nothing is reported."""
    now = time.monotonic()
    try:
        if _problem_seen["until"] <= now:
            _problem_seen.update(until=now + 5, present=bool(get_connection().exists(CAPTIONER_PROBLEM_KEY)))
        if _problem_seen["present"]:
            get_connection().delete(CAPTIONER_PROBLEM_KEY)
            _problem_seen["present"] = False
    except (BrokerUnavailable, *REDIS_ERRORS):
        pass


def captioner_problem() -> dict | None:
    """The last captioner misconfiguration reported within five minutes (message, at), or None."""
    import json

    raw = get_connection().get(CAPTIONER_PROBLEM_KEY)
    return json.loads(raw) if raw else None


def restart_key(worker_name: str) -> str:
    """Where a restart asked of a worker waits for it (``send_worker_shutdown``)."""
    return RESTART_PREFIX + worker_name


def send_worker_shutdown(worker_name: str) -> None:
    """Asks the worker to finish its job and exit. rq's shutdown command is a PUBLISH, which a worker not listening
    at that moment never gets (one that has just started and registered but not yet subscribed, or whose command
    connection is being re-established): the request is also left in a key that the worker's liveness thread reads
    every ALIVE_INTERVAL seconds (queues.fleet.worker), so it is carried out either way, once."""
    from rq.command import send_shutdown_command

    connection = get_connection()
    connection.set(restart_key(worker_name), "1", ex=RESTART_REQUEST_TTL)
    send_shutdown_command(connection, worker_name)


def send_stop_job(worker_name: str, job_id: str) -> None:
    """rq's stop-job command, sent to the worker the operator saw running the job (which ignores it if the job is
    no longer its own). Not through rq's ``send_stop_job_command``: that reads the worker from the job's hash, which a
    successful caption deletes as it ends, so a stop arriving as the job finished raised NoSuchJobError."""
    from rq.command import send_command

    send_command(get_connection(), worker_name, "stop-job", job_id=job_id)


def queued_task_ids(queue_name: str, *, page: int = 1000) -> set[int]:
    """Task ids of the caption jobs waiting in a queue, read in pages of ``page``. O(jobs): for tests and explicit
    operations (a rollback's last sweep); the reconciler checks job hashes directly and never walks a list."""
    connection = get_connection()
    key = Queue.redis_queue_namespace_prefix + queue_name
    ids, start = set(), 0
    while True:
        chunk = connection.lrange(key, start, start + page - 1)
        for raw in chunk:
            job_id = raw.decode() if isinstance(raw, bytes) else raw
            if job_id.startswith("caption-") and job_id[8:].isdigit():
                ids.add(int(job_id[8:]))
        if len(chunk) < page:
            return ids
        start += page


# --- operator actions and the queues overview --------------------------------------------------------------------

BULK_CALLABLE = "queues.jobs.bulk_operation"


def _failed_key(queue_name: str) -> str:
    return FailedJobRegistry(queue_name, connection=get_connection()).key


def dead_letters_forget(tasks: Iterable[tuple[int, str]]) -> None:
    """Takes requeued tasks' jobs out of their queues' failed-job registries (one pipeline)."""
    by_queue: dict[str, list[str]] = defaultdict(list)
    for task_id, queue_name in tasks:
        by_queue[queue_name].append(job_id_for(task_id))
    try:
        pipe = get_connection().pipeline(transaction=False)
        for queue_name, job_ids in by_queue.items():
            pipe.zrem(_failed_key(queue_name), *job_ids)
        pipe.execute()
    except REDIS_ERRORS:
        pass  # the registry entries expire with RQ_FAILURE_TTL; the database already says QUEUED


def dead_letters_drop(tasks: Iterable[tuple[int, str]]) -> list[int]:
    """Takes failed tasks' jobs out of Redis for good (a discard): their failed-job registry entries, hashes and
    results. Returns the ids it left alone: a job whose hash still says it runs (``started``, ``queued``, ...) is
    one whose worker has committed the failure but not yet filed the job in the registry; dropping it now would let
    the filing land after, where it would count as a dead letter for RQ_FAILURE_TTL. Raises BrokerUnavailable."""
    tasks = list(tasks)
    if not tasks:
        return []
    try:
        connection = get_connection()
        pipe = connection.pipeline(transaction=False)
        for task_id, _ in tasks:
            pipe.hget(CaptionJob.redis_job_namespace_prefix + job_id_for(task_id), "status")
        statuses = pipe.execute()
        filing = {task_id for (task_id, _), status in zip(tasks, statuses)
                  if status is not None and status.decode() != "failed"}
        pipe = connection.pipeline(transaction=False)
        for task_id, queue_name in tasks:
            if task_id in filing:
                continue
            job_id = job_id_for(task_id)
            pipe.zrem(_failed_key(queue_name), job_id)
            pipe.unlink(CaptionJob.redis_job_namespace_prefix + job_id, f"rq:results:{job_id}")
        pipe.execute()
    except REDIS_ERRORS as error:
        raise BrokerUnavailable(str(error) or error.__class__.__name__) from error
    return sorted(filing)


def jobs_delete(task_ids: Iterable[int], *, strict: bool = False) -> None:
    """Deletes the job hashes of cancelled tasks (UNLINK, one pipeline); queue entries pointing at them are
    skipped by workers. Best effort, unless ``strict``: then a Redis error raises BrokerUnavailable."""
    ids = list(task_ids)
    if not ids:
        return
    try:
        pipe = get_connection().pipeline(transaction=False)
        for task_id in ids:
            pipe.unlink(CaptionJob.redis_job_namespace_prefix + job_id_for(task_id))
        pipe.execute()
    except REDIS_ERRORS as error:
        if strict:
            raise BrokerUnavailable(str(error) or error.__class__.__name__) from error


# Removes the entries of a queue whose job hash is gone, in one atomic pass (the list is rebuilt only if something
# is removed). O(length of the queue): an explicit maintenance step (a rollback), never a page or a scrape.
PURGE_SCRIPT = """
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local keep, removed = {}, 0
for _, id in ipairs(items) do
  if redis.call('EXISTS', ARGV[1] .. id) == 1 then keep[#keep + 1] = id else removed = removed + 1 end
end
if removed > 0 then
  redis.call('DEL', KEYS[1])
  for start = 1, #keep, 5000 do
    redis.call('RPUSH', KEYS[1], unpack(keep, start, math.min(start + 4999, #keep)))
  end
end
return removed
"""


def queue_purge_missing(queue_name: str) -> int:
    """Takes out of a queue's list the entries whose job was deleted (``jobs_delete``); returns how many."""
    get_queue(queue_name)
    try:
        return int(get_connection().eval(PURGE_SCRIPT, 1, Queue.redis_queue_namespace_prefix + queue_name,
                                         CaptionJob.redis_job_namespace_prefix))
    except REDIS_ERRORS as error:
        raise BrokerUnavailable(str(error)) from error


def queue_drop(queue_name: str) -> None:
    """Removes a queue's list of waiting job ids at once (UNLINK frees it in the background)."""
    get_queue(queue_name)
    get_connection().unlink(Queue.redis_queue_namespace_prefix + queue_name)


def bulk_operation_waiting(operation_id: int) -> bool:
    """Whether ``bulk-<id>`` still waits in Redis (its job hash says queued): then it needs no second job."""
    return get_connection().hget(CaptionJob.redis_job_namespace_prefix + f"bulk-{operation_id}", "status") == b"queued"


def enqueue_bulk_operation(operation_id: int) -> None:
    """Enqueues ``bulk-<id>`` on ``urgent``. A run that died left its id in the started registry: it is removed
    first, so rq's maintenance cannot later file the new run's job as abandoned."""
    from rq.registry import StartedJobRegistry

    try:
        queue = get_queue("urgent")
        try:
            previous = CaptionJob.fetch(f"bulk-{operation_id}", connection=queue.connection)
            StartedJobRegistry("urgent", connection=queue.connection, job_class=CaptionJob,
                               serializer=JSONSerializer).remove_executions(previous)
        except NoSuchJobError:
            pass
        queue.enqueue_many([Queue.prepare_data(BULK_CALLABLE, args=(operation_id,),
                                               job_id=f"bulk-{operation_id}", timeout=3600,
                                               result_ttl=settings.RQ_RESULT_TTL, description="bulk operation")])
    except REDIS_ERRORS as error:
        raise BrokerUnavailable(str(error)) from error


def enqueue_call(callable_name: str, *, args: tuple, job_id: str, queue: str = "urgent", timeout: int = 60,
                 description: str = "") -> None:
    """Enqueues one allow-listed callable other than a caption task (alert notifications, for the monitoring app)
    under a deterministic job id."""
    if callable_name not in settings.RQ_ALLOWED_CALLABLES:
        raise ValueError(f"{callable_name} is not in RQ_ALLOWED_CALLABLES")
    try:
        get_queue(queue).enqueue_many([Queue.prepare_data(callable_name, args=args, job_id=job_id, timeout=timeout,
                                                          result_ttl=settings.RQ_RESULT_TTL,
                                                          description=description)])
    except REDIS_ERRORS as error:
        raise BrokerUnavailable(str(error)) from error


def registries_clean() -> dict[str, int]:
    """rq's own cleanup of expired registry entries, per queue (an explicit maintenance action)."""
    from rq.registry import clean_registries

    cleaned = {}
    for name in QUEUE_NAMES:
        queue = get_queue(name)
        before = queue_figures()[name]
        clean_registries(queue)
        after = queue_figures()[name]
        cleaned[name] = sum(before[key] - after[key] for key in ("running", "finished", "dead", "scheduled"))
    return cleaned


def queue_figures() -> dict[str, dict[str, int]]:
    """Per queue: waiting, running, scheduled, dead-lettered and finished job counts, in one pipeline of
    O(queues) commands (LLEN and ZCARD only: nothing is cleaned up or changed by reading)."""
    from rq.registry import FinishedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

    connection = get_connection()
    pipe = connection.pipeline(transaction=False)
    for name in QUEUE_NAMES:
        pipe.llen(Queue.redis_queue_namespace_prefix + name)
        for registry in (StartedJobRegistry, ScheduledJobRegistry, FailedJobRegistry, FinishedJobRegistry):
            pipe.zcard(registry(name, connection=connection).key)
    values = pipe.execute()
    figures = {}
    for index, name in enumerate(QUEUE_NAMES):
        waiting, running, scheduled, dead, finished = values[index * 5:index * 5 + 5]
        figures[name] = {"waiting": waiting, "running": running, "scheduled": scheduled, "dead": dead,
                         "finished": finished}
    return figures


def finished_jobs_cleanup(*, cutoff, dry_run: bool = False, page: int = 1000, on_batch=None,
                          deadline: float | None = None) -> int:
    """Deletes finished jobs that ended before ``cutoff`` (their hash, their results, their registry entry), read
    and deleted in pages of ``page`` per queue. Returns how many (or would be, with ``dry_run``). With a
    ``deadline`` (``time.monotonic()``), stops between pages once it has passed; a later call reads each registry
    from its start again (what this one deleted is gone from it).

    A job id in the finished registry whose job has been published again (a retry, a requeue: same id, status
    queued or started, no end time) is a live job: only its stale registry entry is removed, never its hash."""
    from rq.registry import FinishedJobRegistry
    from rq.utils import utcparse

    connection = get_connection()
    total = 0
    for name in QUEUE_NAMES:
        registry = FinishedJobRegistry(name, connection=connection)
        offset = 0
        while deadline is None or time.monotonic() < deadline:
            job_ids = [raw.decode() for raw in connection.zrange(registry.key, offset, offset + page - 1)]
            if not job_ids:
                break
            pipe = connection.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hmget(CaptionJob.redis_job_namespace_prefix + job_id, "status", "ended_at")
            old, stale = [], []
            for job_id, (status, ended) in zip(job_ids, pipe.execute()):
                if status is None:
                    old.append(job_id)  # the hash is gone already: only the registry entry is left
                elif status.decode() != "finished":
                    stale.append(job_id)
                elif not ended or utcparse(ended.decode()).replace(tzinfo=cutoff.tzinfo) < cutoff:
                    old.append(job_id)
            if (old or stale) and not dry_run:
                pipe = connection.pipeline(transaction=False)
                pipe.zrem(registry.key, *old, *stale)
                for job_id in old:
                    pipe.unlink(CaptionJob.redis_job_namespace_prefix + job_id, f"rq:results:{job_id}")
                pipe.execute()
            total += len(old)
            offset += len(job_ids) - (0 if dry_run else len(old) + len(stale))
            if on_batch:
                on_batch(len(old))
            if len(job_ids) < page:
                break
    return total
