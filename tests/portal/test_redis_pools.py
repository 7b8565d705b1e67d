"""Each process' Redis pool is capped: a caller that finds every connection in use waits REDIS_POOL_TIMEOUT and then
gets an error naming the setting (not a hang), and the pool's use reaches /metrics."""

import threading
import time

import pytest
import redis.asyncio as aioredis
from django.urls import reverse
from prometheus_client.parser import text_string_to_metric_families

from monitoring.metrics import recorder
from portal import redis_pools
from queues import broker


def hold_connections(count: int, seconds: float) -> list[threading.Thread]:
    """``count`` threads, each holding one of the broker pool's connections in a BLPOP for ``seconds``."""
    threads = [threading.Thread(target=lambda: broker.get_connection().blpop(["test:pool:never"], timeout=seconds))
               for _ in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while broker.get_connection().connection_pool.in_use < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads


@pytest.fixture
def small_pool(settings, redis):
    settings.REDIS_MAX_CONNECTIONS, settings.REDIS_POOL_TIMEOUT = 3, 0.5
    broker.reset_connection()
    # The metrics flusher, a thread of this process on the same pool, waits: it would otherwise take the counters
    # (its pool report every 5 s) or hold a connection (its flush every second) between the test's steps.
    with recorder.BUFFER.cycle:
        yield broker.get_connection()
    broker.reset_connection()


def test_an_exhausted_pool_raises_a_clear_error_after_the_wait_and_recovers(small_pool):
    threads = hold_connections(3, seconds=2)
    started = time.monotonic()
    with pytest.raises(redis_pools.PoolExhausted) as raised:
        small_pool.ping()
    waited = time.monotonic() - started
    assert 0.4 <= waited < 1.5
    assert "all 3 Redis connections of this process" in str(raised.value)
    assert "REDIS_MAX_CONNECTIONS" in str(raised.value)
    # Callers that survive an outage survive this too: it is one of the errors they treat as "Redis unavailable".
    assert isinstance(raised.value, broker.UNAVAILABLE_ERRORS)
    for thread in threads:
        thread.join()
    assert small_pool.ping()  # the connections came back
    in_use, peak, exhausted = small_pool.connection_pool.take_use()
    assert (in_use, peak) == (0, 3) and exhausted >= 1
    assert small_pool.connection_pool.take_use()[:2] == (0, 0)  # the peak and count restart at each report


def test_the_pool_never_opens_more_than_its_cap(small_pool, redis):
    def clients() -> int:
        return redis.info("clients")["connected_clients"]

    before = clients()
    threads = hold_connections(3, seconds=1.5)
    errors = []

    def extra():
        try:
            small_pool.get("test:pool:key")
        except redis_pools.PoolExhausted as error:
            errors.append(error)

    extras = [threading.Thread(target=extra) for _ in range(4)]
    for thread in extras:
        thread.start()
    time.sleep(0.2)
    assert clients() - before <= 3
    for thread in threads + extras:
        thread.join()
    # The four extra callers waited 0.5 s while the BLPOPs held all three for 1.5 s: each got the error.
    assert len(errors) == 4


@pytest.mark.django_db
def test_pool_use_and_exhaustion_are_metrics(small_pool, client, admin_user):
    client.force_login(admin_user)
    threads = hold_connections(3, seconds=1)
    with pytest.raises(redis_pools.PoolExhausted):
        small_pool.ping()
    for thread in threads:
        thread.join()
    recorder.report_pool_use()
    recorder.BUFFER.flush()
    response = client.get(reverse("metrics"))
    assert response.status_code == 200
    values = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
              for family in text_string_to_metric_families(response.content.decode())
              for sample in family.samples if sample.name.startswith("rq_redis_pool_")}
    assert values[("rq_redis_pool_connections_in_use", (("kind", "web"),))] == 3  # the test process' peak
    assert values[("rq_redis_pool_max_connections", ())] == 3
    assert values[("rq_redis_pool_exhausted_total", ())] >= 1


def test_reports_of_processes_that_stopped_are_dropped():
    now = time.time()
    raw = {b"h:1": b'{"kind": "worker", "peak": 4, "max": 50, "at": %f}' % now,
           b"h:2": b'{"kind": "worker", "peak": 9, "max": 50, "at": %f}' % (now - 1),
           b"h:3": b'{"kind": "worker", "peak": 40, "max": 50, "at": %f}' % (now - 60),
           b"h:4": b"not json"}
    reports, gone = recorder.process_reports(raw, now)
    assert recorder.pool_kinds(reports) == {"worker": {"in_use": 9, "processes": 2}}
    assert sorted(gone) == [b"h:3", b"h:4"]


def test_the_channel_layers_pool_is_capped_and_says_so_when_exhausted(settings, redis):
    import asyncio

    settings.REDIS_MAX_CONNECTIONS, settings.REDIS_POOL_TIMEOUT = 2, 0.5

    async def scenario():
        pool = redis_pools.async_pool(settings.REDIS_URL)
        client = aioredis.Redis(connection_pool=pool)
        holders = [asyncio.create_task(client.blpop(["test:pool:never"], timeout=2)) for _ in range(2)]
        await asyncio.sleep(0.3)
        started = time.monotonic()
        with pytest.raises(redis_pools.PoolExhausted, match="all 2 Redis connections of this process"):
            await client.ping()
        waited = time.monotonic() - started
        await asyncio.gather(*holders)
        assert await client.ping()  # free again
        await pool.disconnect()
        return waited

    assert 0.4 <= asyncio.run(scenario()) < 1.5
