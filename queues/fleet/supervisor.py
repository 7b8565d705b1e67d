"""The per-host supervisor behind ``manage.py runworkers``: keeps each pool's desired workers running.

Several supervisors (one per host) share a pool through leases in Redis. A pool's desired count is in caption
slots: with ``desired = N`` and ``slots = S`` caption slots per process it runs P = ceil(N / S) worker processes
(``rqworker --slots S``; the last one gets what is left of N), so it has P process slots,
``portal:fleet:pool:<name>:slot:<i>`` for i < P; a supervisor runs one worker process per process slot it holds.
A slot is taken with ``SET NX PX`` and renewed every step by its holder only (compare-and-expire), so no slot is
ever run twice and together the supervisors run exactly P processes with N caption slots. Each supervisor takes at
most its fair share (ceil(P / live supervisors of the pool)); when a host dies, its leases and its registration
expire after ``lease_ttl`` seconds and the others take over its slots.

Two threads, so that nothing can delay the leases:

- The **main loop** renews the leases and manages the processes, and nothing else: it talks only to Redis (on a
  connection of its own whose timeout is a fraction of the lease) and to its children. It never touches the
  database: it works from the last pool settings the duties thread read, and hands what it has to record (fleet
  events, tasks of workers that died) to that thread. A database outage, a slow query or a long relay pass therefore
  cannot stop the renewals; without this, other supervisors took the slots and this one then retired all its
  workers, while for a while more than the desired count ran.
- The **duties thread** reads the pools, writes the fleet events, re-drives the tasks of workers that exited, and
  runs the fleet-wide duties: the relay (publishing tasks whose retry backoff is over, or that were submitted while
  Redis was down), the reconciler and the autoscaler, each under a Redis lock so one supervisor does each per
  interval, each with a time budget below its lock's expiry. When the database is away it keeps what it must
  record and tries again.

After Redis comes back empty (a restart, a flush, a failover to a replica that lacked the keys) every lease is
gone. A supervisor takes back the slots it runs (renewal re-creates a missing lease for its holder) and acquires no
new slot for one lease period, so that the other supervisors can take back theirs first: the workers already
running keep running, and no slot is started twice.

Beside the pools, a supervisor keeps the extra processes the dispatch policy asks for (queues.dispatch): the
database poller while Redis has been away long enough for the fallback. The duties thread asks the policy (and,
when Redis is down and the relay cannot run, lets it keep its state); the main loop starts what is wanted and stops
gracefully what is no longer wanted.

Retiring a worker is idempotent: a worker that was asked to stop is never signalled again by a retire (to a worker a
second SIGTERM means "stop now"). A second stop signal to the supervisor itself (a second Ctrl-C, systemd or
Kubernetes signalling again) is passed on as exactly that: each retiring worker gets its second SIGTERM, gives the
task in hand back to its queue without using a retry, and exits; only one still running FORCED_GRACE seconds later
is killed. Whenever a worker exits, for whatever reason and with whatever exit code, the task it was
running (if any) is re-driven at once. Under systemd use ``KillMode=mixed`` so a stop signals only the supervisor,
which then stops its workers gracefully (see the README).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, close_old_connections
from django.utils import timezone

from queues import broker
from queues.dispatch import get_policy
from queues.fleet.reconcile import tasks_reconcile, tasks_recover_from_worker
from queues.fleet.services import pool_autoscale, pool_backlog
from queues.models import FleetEvent, WorkerPool
from queues.operations.services import tasks_cleanup
from queues.services import tasks_relay_once
from queues.signals import fleet_event, service_unavailable

logger = logging.getLogger("queues.supervisor")

PREFIX = "portal:fleet:"
SUPERVISORS_KEY = PREFIX + "supervisors"
CLEANUP_KEY = PREFIX + "lock:cleanup"
# Seconds of cleanup per duties pass (it stops between batches of 1,000 rows once they are spent): the relay and the
# reconciler share the thread. A cleanup that has more to do goes on at the next pass until it is done.
CLEANUP_BUDGET = 0.25
# How often (at most) each supervisor looks whether the fleet's cleanup is due (the key in Redis says when it last
# ran).
CLEANUP_CHECK_INTERVAL = 60.0
# A cleanup under way keeps its key this long between passes: if its supervisor dies, another starts afresh after it.
CLEANUP_CONTINUING_TTL = 60.0
# Sets the cleanup key to ARGV[2] for ARGV[3] ms if this supervisor (ARGV[1]) holds it, as "<id>" or
# "<id>:continuing"; returns 0 (and changes nothing) when another supervisor holds it or nobody does.
CLEANUP_HOLD_SCRIPT = ("local holder = redis.call('get', KEYS[1]) "
                       "if holder == ARGV[1] or holder == ARGV[1] .. ':continuing' then "
                       "redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end return 0")
# Renews a lease for its holder; a lease that has vanished (Redis restarted or flushed) is taken back by the
# supervisor still running its worker. Another holder's lease is never touched.
RENEW_SCRIPT = ("local holder = redis.call('get', KEYS[1]) "
                "if holder == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
                "elseif not holder then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 "
                "else return 0 end")
RELEASE_SCRIPT = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
STABLE_AFTER = 60.0  # seconds a worker must run before its crash counter resets
PENDING_TRIES = 120  # a record refused this many times in a row (about a minute) is dropped, with a log line
MAX_RESTART_DELAY = 60.0
# Seconds a worker has, after the supervisor passed a second stop on to it, to give its task back and exit.
FORCED_GRACE = 10.0
# A worker takes a second SIGTERM within a second of the first for the same one delivered twice (rq's rule).
SECOND_SIGNAL_AFTER = 1.1
# Seconds between the SIGUSR2 that asks a worker being killed for its threads' stacks and the SIGKILL.
KILL_REPORT_WAIT = 0.2


def slot_key(pool: str, index: int) -> str:
    return f"{PREFIX}pool:{pool}:slot:{index}"


def supervisor_key(supervisor_id: str) -> str:
    return f"{PREFIX}supervisor:{supervisor_id}"


def _die_with_parent():  # in the child between fork and exec: if the supervisor dies, so do its workers
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass(frozen=True)
class PoolSettings:
    """What the main loop needs of a pool, copied from its row by the duties thread."""

    name: str
    desired: int  # caption slots
    queue_names: list[str] = field(default_factory=list)
    slots: int = 1  # caption slots per process

    @property
    def processes(self) -> int:
        return math.ceil(self.desired / self.slots)

    def caption_slots(self, index: int) -> int:
        """How many caption slots the process in process slot ``index`` runs (the last one: what is left)."""
        return max(0, min(self.slots, self.desired - index * self.slots))


@dataclass
class Slot:
    pool: str
    index: int
    queues: list[str]
    caption_slots: int = 1  # rqworker --slots
    process: subprocess.Popen | None = None
    worker_name: str = ""
    started_at: float = 0.0
    crashes: int = 0
    restart_at: float = 0.0
    kill_at: float = math.inf
    signalled_at: float = 0.0  # when the retire's SIGTERM was sent
    forced: bool = False  # the supervisor's second stop was passed on (a second SIGTERM)
    restarting_after_crash: bool = False
    retiring: bool = False
    retire_reason: str = ""
    handoff: bool = False  # retiring so another supervisor can take the slot: keep the lease until it exits


class Supervisor:
    def __init__(self, *, pool_names: list[str] | None = None, interval: float = 0.5, lease_ttl: float = 10.0,
                 reconcile_interval: float = 5.0, autoscale_interval: float = 2.0, worker_verbosity: int = 1,
                 stop_timeout: float | None = None, run_workers: bool = True):
        self.host = socket.gethostname()
        # False: the fleet's duties only (relay, reconciler, autoscaler) while the cluster runs the workers (a
        # Kubernetes Deployment of rqworker pods sized to the pools' desired counts); it serves no pool's slots.
        self.run_workers = run_workers
        self.id = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.pool_names = pool_names
        self.interval = interval
        self.lease_ttl = lease_ttl
        self.reconcile_interval = reconcile_interval
        self.autoscale_interval = autoscale_interval
        self.worker_verbosity = worker_verbosity
        self.stop_timeout = settings.RQ_DEFAULT_TIMEOUT + 40 if stop_timeout is None else stop_timeout
        self.slots: dict[tuple[str, int], Slot] = {}
        self.retiring: list[Slot] = []
        self.stopping = False
        self.forced = False
        self.relay_interval = settings.RELAY_INTERVAL
        self._next_relay = 0.0
        self._next_reconcile = 0.0
        self._next_autoscale = 0.0
        self._next_fallback_check = 0.0
        self.cleanup_interval = settings.RQ_CLEANUP_INTERVAL
        self._next_cleanup = 0.0
        self._cleanup_done = {"rows": 0, "jobs": 0}  # of the cleanup under way (it may span passes)
        self.pools: dict[str, PoolSettings] | None = None  # None until the duties thread has read them once
        self._outbox: queue.Queue = queue.Queue()  # (kind, payload) for the duties thread to record
        self._pending: list[tuple[str, dict]] = []  # taken from the outbox, not yet recorded (database away)
        self._pending_tries = 0
        self._duties_stop = threading.Event()
        self._quiet_until = 0.0  # no new slots before this (monotonic): Redis just came back
        self._registered = False
        self._connection = None
        self.extras_wanted: dict[str, list[str]] = {}  # name -> manage.py arguments (set by the duties thread)
        self.extras: dict[str, subprocess.Popen] = {}
        self.extras_stopping: dict[str, tuple[subprocess.Popen, float]] = {}  # name -> (process, kill at)
        # Names that have exited: never started again (their tasks are being recovered by name); the policy names
        # a replacement afresh.
        self.extras_ended: set[str] = set()
        self._extras_running: frozenset[str] = frozenset()  # for the duties thread (replaced, never mutated)

    # --- running ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._request_stop)
        self._outbox.put(("event", {"kind": FleetEvent.Kind.SUPERVISOR_STARTED, "pid": os.getpid(),
                                    "reason": f"supervisor {self.id}",
                                    "figures": {"pools": self.pool_names or "all"}}))
        duties = threading.Thread(target=self._duties_loop, name="fleet-duties", daemon=True)
        duties.start()
        logger.info("supervisor %s started", self.id)
        try:
            while not self.stopping:
                started = time.monotonic()
                try:
                    self.step()
                except Exception:
                    logger.exception("supervisor step failed; trying again")
                time.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        finally:
            self.shutdown()
            self._duties_stop.set()
            duties.join(30)
            if not duties.is_alive():  # else it still owns the records (a duty stuck on a hanging database)
                self._record_pending(final=True)

    def _request_stop(self, signum, frame):
        if self.stopping:
            self.forced = True  # a second Ctrl-C: workers stop now, their tasks given back (_manage_processes)
        self.stopping = True

    def _redis(self):
        if self._connection is None:
            # Its own connection with a short timeout: a frozen Redis must not hold the loop past the lease.
            self._connection = broker.dedicated_connection(socket_timeout=max(0.5, self.lease_ttl / 4))
        return self._connection

    def step(self) -> None:
        """One pass of the main loop: leases, then processes. Touches Redis and the children, never the database."""
        pools = self.pools
        try:
            if pools is not None:
                connection = self._redis()
                seconds, microseconds = connection.time()  # Redis' clock: hosts' clocks may disagree
                now = seconds + microseconds / 1e6
                self._heartbeat(connection, now)
                self._renew_or_release(connection, pools)
                if self.run_workers and time.monotonic() >= self._quiet_until:
                    live = self._live_supervisors(connection, now)
                    self._acquire(connection, pools, live)
                    self._rebalance(connection, pools, live)
        except (broker.BrokerUnavailable, *broker.REDIS_ERRORS) as error:
            # Keep the workers we have: they cannot work without Redis either, and when it is back the lease
            # renewal takes back our slots before anyone acquires new ones.
            self._quiet_until = time.monotonic() + self.lease_ttl
            logger.warning("Redis unreachable, fleet unchanged: %s", error)
        self._manage_processes()
        self._manage_extras()

    # --- the duties thread -----------------------------------------------------------------------------------------
    def _duties_loop(self) -> None:
        while not self._duties_stop.is_set():
            started = time.monotonic()
            for duty in (self._read_pools, self._record_pending, self._periodic, self._read_extras):
                try:
                    close_old_connections()
                    duty()
                except DatabaseError as error:
                    service_unavailable.send(sender=Supervisor, service="database", where="supervisor")
                    logger.warning("database unreachable; the fleet keeps running, records wait: %s", error)
                    self._drop_database_connection()
                    break
                except Exception:
                    logger.exception("supervisor duty %s failed; trying again", duty.__name__)
            self._duties_stop.wait(max(0.05, self.interval - (time.monotonic() - started)))
        self._drop_database_connection()

    @staticmethod
    def _drop_database_connection() -> None:
        from django.db import connection

        try:
            connection.close()
        except Exception:
            pass

    def _read_pools(self) -> None:
        self.pools = {pool.name: PoolSettings(pool.name, pool.desired, pool.queue_names, pool.slots)
                      for pool in WorkerPool.objects.all()
                      if self.pool_names is None or pool.name in self.pool_names}

    def _record_pending(self, *, final: bool = False) -> None:
        """Writes what the main loop handed over: fleet events and the recovery of exited workers' tasks. Kept
        (in order) while the database is away."""
        while True:
            try:
                self._pending.append(self._outbox.get_nowait())
            except queue.Empty:
                break
        while self._pending:
            kind, payload = self._pending[0]
            self._pending_tries += 1
            try:
                if kind == "recover":
                    tasks_recover_from_worker(worker_name=payload["worker_name"], reason=payload["reason"],
                                              give_back=payload.get("give_back", False))
                    try:
                        broker.worker_unregister(payload["worker_name"])
                    except (broker.BrokerUnavailable, *broker.REDIS_ERRORS):
                        pass  # rq's registration expires by itself
                else:
                    fields = {"host": self.host, **payload}
                    pool_name = fields.pop("pool", None)
                    pool = WorkerPool.objects.filter(name=pool_name).first() if pool_name else None
                    FleetEvent.objects.create(pool=pool, **fields)
            except DatabaseError:
                if final or self._pending_tries >= PENDING_TRIES:
                    # On stopping, or refused too often (not an outage: a row the database will never take).
                    logger.exception("could not record %s; dropped: %s", kind, payload)
                    self._pending.pop(0)
                    self._pending_tries = 0
                    continue
                raise
            self._pending.pop(0)
            self._pending_tries = 0

    # --- leases --------------------------------------------------------------------------------------------------
    def _heartbeat(self, connection, now: float) -> None:
        pipe = connection.pipeline(transaction=False)
        pipe.zscore(SUPERVISORS_KEY, self.id)
        pipe.zadd(SUPERVISORS_KEY, {self.id: now + self.lease_ttl})
        pipe.zremrangebyscore(SUPERVISORS_KEY, "-inf", now - 60)
        pipe.hset(supervisor_key(self.id), mapping={"host": self.host, "pid": os.getpid(),
                                                    "pools": json.dumps(self.pool_names if self.run_workers
                                                                        else [])})
        pipe.pexpire(supervisor_key(self.id), int(self.lease_ttl * 1000))
        known = pipe.execute()[0]
        if known is None and self._registered:
            # Our registration is gone: Redis restarted, was flushed or failed over. Everybody's leases went with
            # it; give the others a lease period to take theirs back before acquiring anything.
            logger.warning("supervisor registration vanished from Redis; taking back our slots only")
            self._quiet_until = time.monotonic() + self.lease_ttl
        self._registered = True

    def _live_supervisors(self, connection, now: float) -> dict[str, list[str]]:
        """The live supervisors serving each pool, by id."""
        ids = [raw.decode() for raw in connection.zrangebyscore(SUPERVISORS_KEY, now, "+inf")]
        pipe = connection.pipeline(transaction=False)
        for supervisor_id in ids:
            pipe.hget(supervisor_key(supervisor_id), "pools")
        served: dict[str, list[str]] = {"*": []}
        for supervisor_id, raw in zip(ids, pipe.execute()):
            pools = json.loads(raw) if raw else None
            for name in (["*"] if pools is None else pools):
                served.setdefault(name, []).append(supervisor_id)
        return served

    def _serving(self, live: dict[str, list[str]], pool: str) -> list[str]:
        return sorted(set(live.get("*", []) + live.get(pool, [])) | {self.id})

    def _renew_or_release(self, connection, pools: dict[str, PoolSettings]) -> None:
        for key, slot in list(self.slots.items()):
            pool = pools.get(slot.pool)
            if pool is None or slot.index >= pool.processes:
                connection.eval(RELEASE_SCRIPT, 1, slot_key(slot.pool, slot.index), self.id)
                self._retire(slot, "pool removed" if pool is None else "pool scaled down")
                del self.slots[key]
                continue
            if not slot.retiring and (slot.queues != pool.queue_names
                                      or slot.caption_slots != pool.caption_slots(slot.index)):
                # The process must run other queues or another number of caption slots now. Like a hand-off: the
                # lease is kept until the worker has finished its tasks and exited, then the slot is taken again
                # with the new settings, so the pool never runs more processes or caption slots than desired (a
                # released lease was taken again at once, and the new worker ran beside the old one's last caption).
                slot.handoff = True
                self._retire(slot, "pool queues changed" if slot.queues != pool.queue_names else
                             f"caption slots of the process change from {slot.caption_slots} to "
                             f"{pool.caption_slots(slot.index)}")
                if key not in self.slots:  # no worker was running: released already, to be taken again
                    continue
            if not connection.eval(RENEW_SCRIPT, 1, slot_key(slot.pool, slot.index), self.id,
                                   int(self.lease_ttl * 1000)):
                self._retire(slot, "lease lost (another supervisor holds the slot)")
                del self.slots[key]

    def _acquire(self, connection, pools: dict[str, PoolSettings], live: dict[str, list[str]]) -> None:
        if self.stopping:
            return
        for pool in pools.values():
            fair_share = math.ceil(pool.processes / len(self._serving(live, pool.name)))
            held = sum(1 for slot in self.slots.values() if slot.pool == pool.name)
            for index in range(pool.processes):
                if held >= fair_share:
                    break
                if (pool.name, index) in self.slots:
                    continue
                if connection.set(slot_key(pool.name, index), self.id, nx=True, px=int(self.lease_ttl * 1000)):
                    self.slots[(pool.name, index)] = Slot(pool=pool.name, index=index, queues=pool.queue_names,
                                                          caption_slots=pool.caption_slots(index))
                    held += 1

    def _rebalance(self, connection, pools: dict[str, PoolSettings], live: dict[str, list[str]]) -> None:
        """Hands one slot at a time to a supervisor that holds fewer, while we hold more than our fair share
        (a supervisor that started later, or a host that came back). The slot's lease is kept until its worker
        has finished its task and exited, so the pool never runs more than its desired count."""
        if self.stopping:
            return
        for pool in pools.values():
            mine = [slot for slot in self.slots.values() if slot.pool == pool.name]
            if not mine or any(slot.handoff for slot in mine):
                continue
            serving = self._serving(live, pool.name)
            fair_share = math.ceil(pool.processes / len(serving))
            if len(mine) <= fair_share:
                continue
            owners = connection.mget([slot_key(pool.name, index) for index in range(pool.processes)])
            held = {supervisor_id: 0 for supervisor_id in serving}
            for owner in owners:
                if owner is not None and owner.decode() in held:
                    held[owner.decode()] += 1
            if min(held.values()) < len(mine) - 1:
                slot = max(mine, key=lambda item: item.index)
                slot.handoff = True
                self._retire(slot, "rebalancing: handing the slot to a supervisor with fewer workers")

    # --- processes ---------------------------------------------------------------------------------------------
    def _start(self, slot: Slot, *, reason: str) -> None:
        kind = FleetEvent.Kind.WORKER_RESTARTED if slot.worker_name else FleetEvent.Kind.WORKER_STARTED
        # At most 200 characters (the task and event columns): a long host name is cut, never the unique tail.
        slot.worker_name = f"{slot.pool[:50]}.{self.host[:120]}.{slot.index}.{uuid.uuid4().hex[:6]}"
        command = [sys.executable, str(settings.BASE_DIR / "manage.py"), "rqworker", *slot.queues,
                   "--name", slot.worker_name, "--verbosity", str(self.worker_verbosity),
                   "--slots", str(slot.caption_slots)]
        slot.process = subprocess.Popen(command, env={**os.environ, "PORTAL_WORKER_POOL": slot.pool},
                                        start_new_session=True, preexec_fn=_die_with_parent)
        slot.started_at = time.monotonic()
        self._event(kind, slot, reason=reason)
        slot.restarting_after_crash = False

    def _release_slot(self, slot: Slot) -> None:
        try:
            self._redis().eval(RELEASE_SCRIPT, 1, slot_key(slot.pool, slot.index), self.id)
        except (broker.BrokerUnavailable, *broker.REDIS_ERRORS):
            pass  # the lease expires by itself
        self.slots.pop((slot.pool, slot.index), None)

    def _retire(self, slot: Slot, reason: str) -> None:
        """Stops a slot's worker gracefully: it finishes its current job, then exits. Idempotent: a worker already
        asked to stop is never signalled again (rq would take a second SIGTERM as "stop at once")."""
        if slot.retiring:
            return
        slot.retiring = True
        if slot.process is not None and slot.process.poll() is None:
            slot.process.send_signal(signal.SIGTERM)
            slot.signalled_at = time.monotonic()
            slot.kill_at = slot.signalled_at + self.stop_timeout
            slot.retire_reason = reason
            self.retiring.append(slot)
        else:
            if slot.worker_name:
                self._event(FleetEvent.Kind.WORKER_STOPPED, slot, reason=reason)
                if slot.process is not None:
                    self._recover(slot, f"worker exited ({reason})")
            if slot.handoff and not self.stopping:
                # No worker to wait for (it had crashed and waited for its restart): the slot goes at once, or it
                # would stay retiring, leased and empty for good.
                self._release_slot(slot)

    def _manage_processes(self) -> None:
        now = time.monotonic()
        for slot in self.slots.values():
            if slot.retiring:
                continue
            if slot.process is not None and slot.process.poll() is not None:
                self._on_exit(slot, slot.process.returncode, now)
                slot.process = None
            if slot.process is None and now >= slot.restart_at and not self.stopping:
                self._start(slot, reason="restarted after a crash" if slot.restarting_after_crash else
                            ("slot acquired" if not slot.worker_name else "restarted on request"))
        overdue: list[Slot] = []
        for slot in list(self.retiring):
            if slot.process.poll() is not None:
                self.retiring.remove(slot)
                self._event(FleetEvent.Kind.WORKER_STOPPED, slot, reason=slot.retire_reason,
                            figures={"exit_code": slot.process.returncode})
                # Whatever the exit code: a worker that exited runs nothing, so a task it still holds goes back.
                self._recover(slot, f"worker stopped ({slot.retire_reason})")
                if slot.handoff and not self.stopping:
                    self._release_slot(slot)
            elif self.forced and now < slot.kill_at and now - slot.signalled_at >= SECOND_SIGNAL_AFTER:
                # The worker's "stop now": its attempt is given back. Sent again every SECOND_SIGNAL_AFTER seconds
                # until it exits: a worker whose main thread was in a long C call (a claim waiting on a lock) runs
                # its handlers late, so two signals can reach it as one, or within a second of each other (which
                # it takes for one signal delivered twice).
                if not slot.forced:
                    slot.forced = True
                    slot.kill_at = min(slot.kill_at, now + FORCED_GRACE)
                    logger.warning("%s: told to stop at once; the task in hand goes back to its queue (killed in %g s "
                                   "if still running)", slot.worker_name, FORCED_GRACE)
                slot.process.send_signal(signal.SIGTERM)
                slot.signalled_at = now
            elif now >= slot.kill_at:
                overdue.append(slot)
        if overdue:
            # Where they were, in their output before they go: manage.py prints its threads' stacks on SIGUSR2 (also
            # when its main thread is held in a C call, where a worker's own report cannot run). One wait for all.
            for slot in overdue:
                logger.warning("%s: not stopped in time; its threads' stacks follow in its output, then it is killed",
                               slot.worker_name)
                slot.process.send_signal(signal.SIGUSR2)
            time.sleep(KILL_REPORT_WAIT)
        for slot in overdue:
            slot.process.kill()
            slot.process.wait(10)
            self.retiring.remove(slot)
            self._event(FleetEvent.Kind.WORKER_STOPPED, slot, reason=f"{slot.retire_reason}; killed after "
                                                                     "not stopping in time")
            # Told to stop at once (the operator's second stop) and still running: its task was not its fault,
            # so it goes back without using a retry, as the worker itself would have given it back.
            self._recover(slot, "killed by its supervisor", give_back=slot.forced)
            if slot.handoff and not self.stopping:
                self._release_slot(slot)

    def _on_exit(self, slot: Slot, code: int, now: float) -> None:
        if code == 0:
            # A clean exit we did not ask for: a restart requested through rq (the admin, manage.py workers).
            slot.crashes, slot.restart_at = 0, now
            self._event(FleetEvent.Kind.WORKER_STOPPED, slot, reason="exited on request; starting a fresh one")
            self._recover(slot, "worker exited")
            return
        if now - slot.started_at > STABLE_AFTER:
            slot.crashes = 0
        slot.crashes += 1
        delay = min(0.5 * 2 ** (slot.crashes - 1), MAX_RESTART_DELAY)
        slot.restart_at = now + delay
        slot.restarting_after_crash = True
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        self._event(FleetEvent.Kind.WORKER_CRASHED, slot, reason=f"died ({how}); restart in {delay:g} s",
                    figures={"exit_code": code, "crashes_in_a_row": slot.crashes, "restart_delay": delay})
        self._recover(slot, f"worker died ({how})")

    def _recover(self, slot: Slot, reason: str, *, give_back: bool = False) -> None:
        """A worker of ours has exited: the duties thread re-drives what it was running (within a step) and removes
        its rq registration."""
        self._outbox.put(("recover", {"worker_name": slot.worker_name, "reason": reason, "give_back": give_back}))

    def _event(self, kind, slot: Slot, *, reason: str, figures: dict | None = None) -> None:
        pid = slot.process.pid if slot.process is not None else None
        logger.info("%s %s (%s)", kind, slot.worker_name, reason)
        self._outbox.put(("event", {
            "kind": kind, "pool": slot.pool, "host": self.host, "pid": pid, "worker_name": slot.worker_name,
            "reason": reason[:500], "figures": {"slot": slot.index, "supervisor": self.id, **(figures or {})}}))
        fleet_event.send(sender=Supervisor, kind=str(kind), pool=slot.pool)  # counted in memory (no I/O here)

    # --- fleet-wide duties (in the duties thread) -------------------------------------------------------------------
    def _locked(self, connection, name: str, interval: float, duty) -> None:
        """Runs ``duty(budget)`` at most once per ``interval`` across the fleet: the first supervisor to take the
        duty's key for the interval runs it (the key is left to expire, so the next pass is one interval later
        whoever runs it). The budget, 0.6 of the interval, keeps a pass from overlapping the next one."""
        if connection.set(PREFIX + "lock:" + name, self.id, nx=True, px=int(interval * 1000)):
            duty(interval * 0.6)

    def _periodic(self) -> None:
        now = time.monotonic()
        try:
            connection = broker.get_connection()
            if now >= self._next_relay:
                self._next_relay = now + self.relay_interval
                self._locked(connection, "relay", self.relay_interval,
                             lambda budget: tasks_relay_once(budget=budget))
            if now >= self._next_reconcile:
                self._next_reconcile = now + self.reconcile_interval
                self._locked(connection, "reconcile", self.reconcile_interval,
                             lambda budget: tasks_reconcile(budget=budget, interval=self.reconcile_interval))
            if self.cleanup_interval and now >= self._next_cleanup and not self.stopping:
                self._cleanup(connection, now)
            if now >= self._next_autoscale and not self.stopping:
                self._next_autoscale = now + self.autoscale_interval
                if connection.set(PREFIX + "lock:autoscale", self.id, nx=True,
                                  px=int(self.autoscale_interval * 900)):
                    for pool in WorkerPool.objects.filter(autoscale=True):
                        pool_autoscale(pool=pool, queued=pool_backlog(pool))
        except (broker.BrokerUnavailable, *broker.REDIS_ERRORS) as error:
            logger.warning("relay/reconcile/autoscale skipped, Redis unreachable or refusing: %s", error)
            if now >= self._next_fallback_check:
                # The relay lets the dispatch policy keep its state; without Redis it cannot run, so every
                # supervisor does it (the policy's changes are conditional updates: safe from several at once).
                self._next_fallback_check = now + self.relay_interval
                get_policy().maintain(redis_up=broker.ping())

    def _cleanup(self, connection, now: float) -> None:
        """What ``tasks cleanup`` does, once per RQ_CLEANUP_INTERVAL across the fleet: the supervisor that takes the
        key runs it. A cleanup with more to do than one pass's budget keeps the key (compare-and-set: never someone
        else's) and goes on at its next pass. A database error stops it with a log line and gives the key back, so it
        is tried again within CLEANUP_CHECK_INTERVAL; the other duties report a real outage."""
        self._next_cleanup = now + min(CLEANUP_CHECK_INTERVAL, self.cleanup_interval)
        continuing = connection.get(CLEANUP_KEY) == f"{self.id}:continuing".encode()
        if not continuing:
            if not connection.set(CLEANUP_KEY, self.id, nx=True, px=int(self.cleanup_interval * 1000)):
                return
            self._cleanup_done = {"rows": 0, "jobs": 0}
        cutoff = timezone.now() - timedelta(days=settings.TASK_RETENTION_DAYS)
        try:
            done = tasks_cleanup(cutoff=cutoff, budget=CLEANUP_BUDGET)
        except DatabaseError as error:
            logger.warning("cleanup stopped by a database error (tried again within %d s): %s",
                           CLEANUP_CHECK_INTERVAL, error)
            for value in (self.id, f"{self.id}:continuing"):
                connection.eval(RELEASE_SCRIPT, 1, CLEANUP_KEY, value)
            return
        self._cleanup_done["rows"] += done["rows"]
        self._cleanup_done["jobs"] += done["jobs"]
        if not done["finished"]:
            # Ours until done (if we die, the key expires and another supervisor starts afresh).
            if connection.eval(CLEANUP_HOLD_SCRIPT, 1, CLEANUP_KEY, self.id, f"{self.id}:continuing",
                               int(CLEANUP_CONTINUING_TTL * 1000)):
                self._next_cleanup = now
            return
        # The next one an interval from now, whoever runs it.
        connection.eval(CLEANUP_HOLD_SCRIPT, 1, CLEANUP_KEY, self.id, self.id, int(self.cleanup_interval * 1000))
        rows, jobs = self._cleanup_done["rows"], self._cleanup_done["jobs"]
        self._cleanup_done = {"rows": 0, "jobs": 0}
        if rows or jobs or done["kept"]:
            logger.info("cleanup (every %s s): deleted %d task row(s) finished more than %d day(s) ago and %d "
                        "finished job(s) from Redis%s", self.cleanup_interval, rows, settings.TASK_RETENTION_DAYS,
                        jobs, f"; kept {done['kept']} older row(s): {done['why_kept']}" if done["kept"] else "")

    def _read_extras(self) -> None:
        self.extras_wanted = get_policy().processes(running=self._extras_running)

    def _manage_extras(self) -> None:
        """Starts the extra processes the policy wants and stops, gracefully, those it no longer wants."""
        now = time.monotonic()
        wanted = {} if self.stopping else dict(self.extras_wanted)
        for name, process in list(self.extras.items()):
            if process.poll() is not None:
                logger.warning("extra process %s exited (code %s)", name, process.returncode)
                del self.extras[name]
                self.extras_ended.add(name)
                self._outbox.put(("recover", {"worker_name": name, "reason": "database poller exited"}))
            elif name not in wanted:
                process.send_signal(signal.SIGTERM)
                self.extras_stopping[name] = (self.extras.pop(name), now + self.stop_timeout)
        for name, (process, kill_at) in list(self.extras_stopping.items()):
            if process.poll() is not None:
                del self.extras_stopping[name]
                self.extras_ended.add(name)
                self._outbox.put(("recover", {"worker_name": name, "reason": "database poller stopped"}))
            elif self.forced or now >= kill_at:
                process.kill()
        for name, arguments in wanted.items():
            if name not in self.extras and name not in self.extras_stopping and name not in self.extras_ended:
                command = [sys.executable, str(settings.BASE_DIR / "manage.py"), *arguments]
                self.extras[name] = subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent)
                logger.info("started %s: %s", name, " ".join(arguments))
        self._extras_running = frozenset(self.extras)

    # --- stopping ----------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        self.stopping = True
        for slot in list(self.slots.values()):
            self._retire(slot, "supervisor stopping")
        renewed_at = 0.0
        while self.retiring:
            if time.monotonic() - renewed_at >= self.interval:
                renewed_at = time.monotonic()
                try:  # keep our slots while our workers finish, so nobody starts a second worker in them
                    connection = self._redis()
                    for slot in self.slots.values():
                        connection.eval(RENEW_SCRIPT, 1, slot_key(slot.pool, slot.index), self.id,
                                        int(self.lease_ttl * 1000))
                except (broker.BrokerUnavailable, *broker.REDIS_ERRORS):
                    pass
            self._manage_processes()
            self._manage_extras()
            time.sleep(0.1)
        while self.extras or self.extras_stopping:
            self._manage_extras()
            time.sleep(0.1)
        try:
            connection = self._redis()
            for slot in self.slots.values():
                connection.eval(RELEASE_SCRIPT, 1, slot_key(slot.pool, slot.index), self.id)
            connection.zrem(SUPERVISORS_KEY, self.id)
            connection.delete(supervisor_key(self.id))
        except (broker.BrokerUnavailable, *broker.REDIS_ERRORS):
            pass
        self.slots.clear()
        self._outbox.put(("event", {"kind": FleetEvent.Kind.SUPERVISOR_STOPPED, "pid": os.getpid(),
                                    "reason": f"supervisor {self.id}"}))
        logger.info("supervisor %s stopped", self.id)
