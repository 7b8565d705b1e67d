"""Shared set-up for benchmarks: a private real Redis server, a fresh database, Django configured.

Each benchmark imports this first. It must run before Django is imported by anything else.

The database is a fresh SQLite file unless BENCH_DATABASE_URL names a MySQL/MariaDB one, e.g.
``BENCH_DATABASE_URL=mysql://portal:portal-ci@127.0.0.1:3308/bench``. That database is reused between runs, so
every table in it is DROPPED and the migrations run afresh before each benchmark (each run starts from the same
empty schema as with SQLite): point it at a benchmark database only. A DATABASE_URL in the environment is ignored,
so a benchmark never empties the database the portal uses. The private Redis server is stopped at exit, also when
a benchmark fails.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from portal.embedded_redis import RedisServer, free_port  # noqa: E402

WORKDIR = Path(tempfile.mkdtemp(prefix="portal-bench-"))
REDIS = None
if not os.environ.get("BENCH_REDIS_URL"):
    REDIS = RedisServer(WORKDIR / "redis", port=free_port(), appendonly=False).start()
    atexit.register(REDIS.stop)  # also after a crash, a timeout or --help
os.environ["REDIS_URL"] = os.environ.get("BENCH_REDIS_URL") or REDIS.url
os.environ["DATABASE_URL"] = os.environ.get("BENCH_DATABASE_URL") or f"sqlite:///{WORKDIR / 'bench.sqlite3'}"
os.environ["PORTAL_VAR_DIR"] = str(WORKDIR / "var")
os.environ["MEDIA_ROOT"] = str(WORKDIR / "media")
os.environ.setdefault("LOG_LEVEL", "WARNING")
os.environ.setdefault("PORTAL_LOCAL", "true")  # a private database and Redis, like the local runner
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

import django  # noqa: E402

django.setup()
from django.core.management import call_command  # noqa: E402


def _drop_all_tables() -> None:
    """Empties a reused MySQL/MariaDB database: every table dropped, so ``migrate`` builds the schema afresh."""
    from django.db import connection

    with connection.cursor() as cursor:
        tables = connection.introspection.table_names(cursor, include_views=False)
        if tables:
            cursor.execute("SET FOREIGN_KEY_CHECKS = 0")
            try:
                cursor.execute("DROP TABLE " + ", ".join(connection.ops.quote_name(name) for name in tables))
            finally:
                cursor.execute("SET FOREIGN_KEY_CHECKS = 1")


def _database_info() -> dict:
    from django.db import connection

    if connection.vendor == "sqlite":
        import sqlite3

        return {"database_server": "SQLite", "database_version": sqlite3.sqlite_version}
    if connection.vendor == "mysql":
        connection.ensure_connection()
        return {"database_server": "MariaDB" if connection.mysql_is_mariadb else "MySQL",
                "database_version": connection.mysql_server_info}
    return {"database_server": connection.vendor, "database_version": None}


from django.db import connection as _connection  # noqa: E402

if _connection.vendor == "mysql":
    _drop_all_tables()
call_command("migrate", verbosity=0)


def machine() -> dict:
    import redis

    info = redis.Redis.from_url(os.environ["REDIS_URL"]).info("server")
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "redis": info.get("redis_version"),
        "database": os.environ["DATABASE_URL"].split(":")[0],
        **_database_info(),
    }


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.01):
    """Polls until ``predicate`` returns something true and returns it; stale database connections are dropped
    between polls (another process is writing)."""
    from django.db import close_old_connections

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        close_old_connections()
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not reached within {timeout:g} s")


def slow_ollama_server(delay: float):
    """A local stand-in for an Ollama server: answers /api/generate after ``delay`` seconds, any number at once.
    Its address: ``f"http://127.0.0.1:{server.server_address[1]}"``; stop it with shutdown() and server_close()."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            time.sleep(delay)
            body = b'{"response": "A caption."}'
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the worker that asked was killed

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat; [0] here is field 3


def machine_busy_seconds() -> float:
    """CPU time all cores spent busy (not idle, not waiting for I/O), from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(value) for value in handle.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / TICK


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def finish(figures: dict) -> None:
    """Prints the figures as one JSON object on the last line and stops the private Redis server."""
    if REDIS is not None:
        REDIS.stop()
    print(json.dumps({**figures, "machine": machine_info}))


machine_info = machine()
