"""Every Redis connection the portal opens, built from the settings in one place.

Two ways to reach Redis: one server (``REDIS_URL``, or the embedded one), or the master that Redis Sentinel names
(``REDIS_SENTINELS``, ``REDIS_SENTINEL_MASTER``, ``REDIS_SENTINEL_PASSWORD``; ``REDIS_PASSWORD`` and ``REDIS_DB`` for
the data servers). With Sentinel a new connection asks the sentinels where the master is; after a failover the old
master's connections fail (refused, or READONLY once it comes back as a replica: redis-py turns that into a
ConnectionError and drops the connection), callers treat that like any outage and retry, and the next connection
goes to the promoted replica. Nothing is restarted by hand.

Each process' pool holds at most ``REDIS_MAX_CONNECTIONS`` connections. A caller that finds all of them in use waits
up to ``REDIS_POOL_TIMEOUT`` seconds and then gets ``PoolExhausted`` (a redis ``ConnectionError``, so every caller
that survives an outage survives this too) with a message naming the setting, never an unbounded wait. The channel
layer's asyncio pool (one per event loop, in the processes that use the channel layer) is capped and raises the same
way (``ChannelLayer``). A few loops that must never queue behind others (the supervisor's lease, the event
announcer) have small pools of their own. The main pool's use is reported to the metrics by
``monitoring.metrics.recorder`` (``rq_redis_pool_*``); the channel layer's is not.
"""

from __future__ import annotations

import os
import sys
import threading

import redis
import redis.asyncio
import redis.asyncio.sentinel
from channels_redis.core import RedisChannelLayer
from django.conf import settings
from redis.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

NO_CONNECTION = "No connection available."  # what redis-py's blocking pools raise when their wait times out


class PoolExhausted(redis.exceptions.ConnectionError):
    """All of this process' Redis connections stayed in use for the whole wait."""


def exhausted(pool) -> PoolExhausted:
    return PoolExhausted(
        f"all {pool.max_connections} Redis connections of this process (pid {os.getpid()}) stayed in use for "
        f"{pool.timeout:g} s; raise REDIS_MAX_CONNECTIONS (or REDIS_POOL_TIMEOUT), or find what holds them")


class _Counted:
    """Counts connections handed out, their peak since the last report and the times the wait ran out."""

    def _counters(self):
        if getattr(self, "_counted_pid", None) != os.getpid():  # a forked child starts from zero
            self._counted_pid, self._count_lock = os.getpid(), threading.Lock()
            self.in_use = self.peak = self.exhausted = 0
        return self._count_lock

    def get_connection(self, *args, **kwargs):
        lock = self._counters()
        try:
            connection = super().get_connection(*args, **kwargs)
        except redis.exceptions.ConnectionError as error:
            if str(error) != NO_CONNECTION:
                raise
            with lock:
                self.exhausted += 1
            raise exhausted(self) from None
        with lock:
            self.in_use += 1
            self.peak = max(self.peak, self.in_use)
        return connection

    def release(self, connection):
        lock = self._counters()
        try:
            super().release(connection)
        finally:
            with lock:
                self.in_use = max(0, self.in_use - 1)

    def take_use(self) -> tuple[int, int, int]:
        """(in use now, peak since the last call, exhaustions since the last call); resets the last two."""
        with self._counters():
            use = (self.in_use, self.peak, self.exhausted)
            self.peak, self.exhausted = self.in_use, 0
        return use


class CappedPool(_Counted, redis.BlockingConnectionPool):
    pass


class ClosingSentinelConnection(SentinelManagedConnection):
    """A Sentinel connection that is closed when a read is interrupted, like every other redis-py connection.
    Before redis-py 8.2 Sentinel's own kept it open (``disconnect_on_error=False``): a stop signal raised in a
    worker's blocking pop left the pop's reply pending on the connection, and the worker's next command at exit
    waited behind it for socket timeouts and retries (tests/drills/test_sentinel_failover.py)."""

    def read_response(self, *args, disconnect_on_error: bool = True, **kwargs):
        return super().read_response(*args, disconnect_on_error=disconnect_on_error, **kwargs)


class CappedSentinelPool(_Counted, SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's pool (asks the sentinels for the master) with the blocking pool's cap and wait."""

    def __init__(self, *args, **kwargs):
        if not kwargs.get("ssl"):  # with ssl Sentinel's pool picks its own TLS connection class
            kwargs.setdefault("connection_class", ClosingSentinelConnection)
        super().__init__(*args, **kwargs)


class _AsyncExhaustion:
    """The asyncio pools' wait running out raises PoolExhausted, naming the setting, like the threaded pools."""

    async def get_connection(self, *args, **kwargs):
        try:
            return await super().get_connection(*args, **kwargs)
        except redis.exceptions.ConnectionError as error:
            if str(error) != NO_CONNECTION:
                raise
            raise exhausted(self) from None


class AsyncCappedPool(_AsyncExhaustion, redis.asyncio.BlockingConnectionPool):
    pass


class AsyncCappedSentinelPool(_AsyncExhaustion, redis.asyncio.sentinel.SentinelConnectionPool,
                              redis.asyncio.BlockingConnectionPool):
    pass


def _sentinel_options() -> dict:
    """How to reach the sentinels themselves: their own password, short timeouts (a dead sentinel is skipped)."""
    return {"password": settings.REDIS_SENTINEL_PASSWORD, "socket_timeout": 1, "socket_connect_timeout": 1}


def client(*, socket_timeout: float, socket_connect_timeout: float = 2, health_check_interval: int = 0,
           max_connections: int | None = None) -> redis.Redis:
    """A client with a pool of its own. The broker keeps one per process; loops that must never wait long on
    Redis (the supervisor's lease, the event announcer) open their own with a short timeout."""
    options = {
        "socket_timeout": socket_timeout, "socket_connect_timeout": min(socket_connect_timeout, socket_timeout),
        "health_check_interval": health_check_interval, "password": settings.REDIS_PASSWORD,
        "max_connections": max_connections or settings.REDIS_MAX_CONNECTIONS, "timeout": settings.REDIS_POOL_TIMEOUT,
    }
    if settings.REDIS_SENTINELS:
        sentinel = Sentinel(settings.REDIS_SENTINELS, sentinel_kwargs=_sentinel_options())
        return sentinel.master_for(settings.REDIS_SENTINEL_MASTER, connection_pool_class=CappedSentinelPool,
                                   db=settings.REDIS_DB, **options)
    if options["password"] is None:
        del options["password"]  # from_url lets the URL's own password win only over an explicit one
    return redis.Redis(connection_pool=CappedPool.from_url(settings.REDIS_URL, **options))


def async_pool(address: str):
    """The channel layer's asyncio pool: the same Redis and cap, waiting for a connection instead of failing."""
    options = {"max_connections": settings.REDIS_MAX_CONNECTIONS, "timeout": settings.REDIS_POOL_TIMEOUT,
               "socket_connect_timeout": 2}
    if settings.REDIS_PASSWORD is not None:
        options["password"] = settings.REDIS_PASSWORD
    if settings.REDIS_SENTINELS:
        sentinel = redis.asyncio.sentinel.Sentinel(settings.REDIS_SENTINELS, sentinel_kwargs=_sentinel_options())
        return AsyncCappedSentinelPool(settings.REDIS_SENTINEL_MASTER, sentinel, db=settings.REDIS_DB, **options)
    return AsyncCappedPool.from_url(address, **options)


class ChannelLayer(RedisChannelLayer):
    """channels-redis with its pool from ``async_pool`` (Sentinel-aware, capped, waiting when all are in use)."""

    def create_pool(self, index):
        return async_pool(self.hosts[index]["address"])


def process_kind() -> str:
    """What this process is, for the pool-use metric's label: worker, supervisor, sampler, web or command."""
    arguments = sys.argv[1:2] if sys.argv and sys.argv[0].endswith("manage.py") else []
    command = arguments[0] if arguments else ""
    if command == "rqworker":
        return "worker"
    if command == "runworkers":
        return "supervisor"
    if command == "run_sampler":
        return "sampler"
    if command in ("runportal", "runserver") or not command:
        return "web"  # gunicorn, uvicorn and daphne load the portal without manage.py
    return "command"
