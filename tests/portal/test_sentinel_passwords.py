"""REDIS_SENTINEL_PASSWORD and REDIS_PASSWORD with a real sentinel and a real master that both require one: the
portal's connections authenticate to each, and a wrong sentinel password is an error, not a connection to nowhere."""

import pytest
import redis

from portal import redis_pools
from portal.embedded_redis import free_port
from tests.sentinel import MASTER_NAME, DataServer, SentinelServer, wait_until


@pytest.fixture
def guarded(tmp_path):
    master = DataServer(tmp_path / "master", port=free_port(), password="data-secret")
    sentinel = SentinelServer(tmp_path / "sentinel", port=free_port(), master_port=master.port,
                              password="sentinel-secret", master_password="data-secret")
    master.start()
    try:
        sentinel.start()
        wait_until(lambda: sentinel.client().execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)[1] == str(master.port).encode(),
            "the sentinel to name the master")
        yield master, sentinel
    finally:
        sentinel.stop()
        master.stop()


def test_both_passwords_reach_the_master_through_the_sentinel(guarded, settings):
    master, sentinel = guarded
    settings.REDIS_SENTINELS, settings.REDIS_SENTINEL_MASTER = [("127.0.0.1", sentinel.port)], MASTER_NAME
    settings.REDIS_SENTINEL_PASSWORD, settings.REDIS_PASSWORD, settings.REDIS_DB = "sentinel-secret", "data-secret", 0
    client = redis_pools.client(socket_timeout=2)
    assert client.set("portal:probe", "through the sentinel")
    assert master.client().get("portal:probe") == b"through the sentinel"
    client.connection_pool.disconnect()

    settings.REDIS_SENTINEL_PASSWORD = "wrong"
    with pytest.raises(redis.exceptions.ConnectionError):  # what every caller treats as "Redis unavailable"
        redis_pools.client(socket_timeout=2).ping()
    settings.REDIS_SENTINEL_PASSWORD, settings.REDIS_PASSWORD = "sentinel-secret", "wrong"
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis_pools.client(socket_timeout=2).ping()
