"""Request rates per key (an API token): GCRA buckets in Redis, shared by every web process, and in the process
itself while Redis does not answer within a quarter second, so that a runaway script is held back either way.

``limiter.wait(key, rate)``: 0 when a request under ``key`` may go now (and it is counted), else the seconds until
one may. ``rate`` requests a second, in bursts of BURST_FACTOR seconds' worth."""

from __future__ import annotations

import os
import threading
import time

from django.conf import settings

from portal import redis_pools

# One request costs 1/rate seconds of a token's budget; the budget holds BURST_FACTOR seconds' worth.
BURST_FACTOR = 2
# KEYS[1]: the token's theoretical arrival time (GCRA). ARGV: the interval (1/rate, s) and the burst (s). Redis'
# own clock, so that web hosts with skewed clocks share one bucket. Returns 0 (allowed) or the wait, in ms.
RATE_SCRIPT = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local next_tat = tat + interval
if next_tat - now > burst then
  return math.ceil((next_tat - now - burst) * 1000)
end
redis.call('SET', KEYS[1], tostring(next_tat), 'PX', math.ceil((next_tat - now) * 1000) + 1000)
return 0
"""
REDIS_PAUSE = 5.0  # after a failed call, the local buckets serve this long before Redis is asked again


class RateLimiter:
    """GCRA buckets, in Redis when it answers within a quarter second, else in this process."""

    def __init__(self):
        self._script, self._where = None, None
        self._redis_down_until = 0.0
        self._local: dict[str, float] = {}
        self._lock = threading.Lock()

    def _redis(self):
        where = (os.getpid(), settings.REDIS_URL)  # a forked web worker, or settings changed (tests), starts afresh
        if self._script is None or self._where != where:
            client = redis_pools.client(socket_timeout=0.25, socket_connect_timeout=0.25, max_connections=64)
            self._script, self._where = client.register_script(RATE_SCRIPT), where
        return self._script

    def reset(self) -> None:
        """Forgets every bucket this process keeps and asks Redis again at the next request (tests)."""
        with self._lock:
            self._local.clear()
            self._redis_down_until = 0.0

    def wait(self, key: str, rate: float) -> float:
        """0 when a request under ``key`` may go now; otherwise the seconds until it may."""
        interval, burst = 1.0 / rate, BURST_FACTOR
        if time.monotonic() >= self._redis_down_until:
            try:
                return int(self._redis()(keys=[f"portal:api:rate:{key}"], args=[interval, burst])) / 1000
            except Exception:  # noqa: BLE001 (any failure of Redis hands the bucket to this process for a while)
                self._redis_down_until = time.monotonic() + REDIS_PAUSE
        with self._lock:
            now = time.monotonic()
            tat = max(self._local.get(key, now), now)
            if tat + interval - now > burst:
                return tat + interval - now - burst
            self._local[key] = tat + interval
            return 0.0


limiter = RateLimiter()
