"""A real Redis Sentinel deployment on loopback for drills: a master, a replica and three sentinels.

Debian's ``redis-server`` and ``redis-sentinel`` when installed (CI installs both), else the server binary the
portal finds (``redis-server --sentinel`` is the same program). Every process is stopped by ``stop()``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import redis

from portal.embedded_redis import RedisServer, free_port, redis_server_binary

MASTER_NAME = "captions"


def _binary(name: str) -> str:
    return shutil.which(name) or redis_server_binary()


class DataServer(RedisServer):
    """A master, or a replica of ``replica_of`` (a port on 127.0.0.1); ``password``: its ``requirepass``."""

    def __init__(self, directory: Path, *, port: int, replica_of: int | None = None, password: str | None = None):
        super().__init__(directory, port=port, appendonly=True)
        self.replica_of, self.password = replica_of, password

    def command(self) -> list[str]:
        args = super().command()
        args[0] = _binary("redis-server")
        if self.replica_of:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def client(self, **kwargs):
        return super().client(password=self.password, **kwargs)


class SentinelServer(RedisServer):
    """One sentinel watching the master on ``master_port`` (quorum 2, down after 1 s). ``password``: the sentinel's
    own ``requirepass``; ``master_password``: the data servers' (``sentinel auth-pass``)."""

    def __init__(self, directory: Path, *, port: int, master_port: int, password: str | None = None,
                 master_password: str | None = None):
        super().__init__(directory, port=port, appendonly=False)
        self.master_port, self.password, self.master_password = master_port, password, master_password

    def client(self, **kwargs):
        return super().client(password=self.password, **kwargs)

    def command(self) -> list[str]:
        config = self.directory / "sentinel.conf"
        if not config.exists():  # the sentinel rewrites its file as it learns; a restart keeps what it learned
            config.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.directory}\n"
                f"pidfile {self.pid_path}\nlogfile {self.directory / 'redis.log'}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
                + (f"requirepass {self.password}\n" if self.password else "")
                + (f"sentinel auth-pass {MASTER_NAME} {self.master_password}\n" if self.master_password else ""))
        sentinel = shutil.which("redis-sentinel")
        return [sentinel, str(config)] if sentinel else [_binary("redis-server"), str(config), "--sentinel"]


class SentinelCluster:
    def __init__(self, directory: Path):
        directory = Path(directory)
        self.master = DataServer(directory / "master", port=free_port())
        self.replica = DataServer(directory / "replica", port=free_port(), replica_of=self.master.port)
        self.sentinels = [SentinelServer(directory / f"sentinel-{index}", port=free_port(),
                                         master_port=self.master.port) for index in range(3)]

    @property
    def addresses(self) -> str:
        """The REDIS_SENTINELS value."""
        return ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)

    def start(self) -> "SentinelCluster":
        self.master.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait(lambda: self.replica.client().info("replication").get("master_link_status") == "up",
                  "the replica to sync with the master")
        # Each sentinel must know the replica (to promote it) and the other two (for the quorum and the vote).
        self.wait(lambda: all(len(self.ask(sentinel, "SENTINEL", "REPLICAS", MASTER_NAME)) == 1
                              and len(self.ask(sentinel, "SENTINEL", "SENTINELS", MASTER_NAME)) == 2
                              for sentinel in self.sentinels), "the sentinels to find the replica and each other")
        return self

    @staticmethod
    def ask(sentinel: SentinelServer, *command):
        connection = redis.Redis(host="127.0.0.1", port=sentinel.port, socket_timeout=2)
        try:
            return connection.execute_command(*command)
        finally:
            connection.close()

    def master_port(self) -> int | None:
        """The master's port as a majority of the sentinels names it."""
        ports = []
        for sentinel in self.sentinels:
            try:
                ports.append(int(self.ask(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)[1]))
            except (redis.RedisError, OSError, TypeError, IndexError):
                continue
        if not ports:
            return None
        port = max(set(ports), key=ports.count)
        return port if ports.count(port) >= 2 else None

    def settled(self) -> bool:
        """One master as a majority of the sentinels names it and says of itself, the other data server its replica
        with the link up. Which of the two is master is not asked: on a loaded machine the sentinels may fail over
        again (down after 1 s) once the old master is back, and that is their call to make."""
        port = self.master_port()
        servers = {server.port: server for server in (self.master, self.replica)}
        if port not in servers:
            return False
        (other,) = (server for server in servers.values() if server.port != port)
        replication = other.client().info("replication")
        return (servers[port].client().info("replication")["role"] == "master" and replication["role"] == "slave"
                and int(replication["master_port"]) == port and replication["master_link_status"] == "up")

    def failovers(self) -> list[str]:
        """The master switches each sentinel logged (``+switch-master``), for a failing drill's message."""
        lines = []
        for sentinel in self.sentinels:
            log = sentinel.directory / "redis.log"
            if log.exists():
                lines += [f"sentinel {sentinel.port}: {line.strip()}" for line in log.read_text().splitlines()
                          if "+switch-master" in line]
        return lines

    def wait(self, predicate, message: str, timeout: float = 30.0) -> None:
        try:
            wait_until(predicate, message, timeout)
        except AssertionError as timed_out:
            switches = "\n".join(self.failovers()) or "none"
            raise AssertionError(f"{timed_out}; master switches logged:\n{switches}") from None

    def stop(self) -> None:
        for server in (*self.sentinels, self.replica, self.master):
            server.stop()


def wait_until(predicate, message: str, timeout: float = 30.0) -> None:
    """Until ``predicate()`` is true (a Redis or socket error counts as not yet), or AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")
