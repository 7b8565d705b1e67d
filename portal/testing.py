"""``python -m portal.testing [pytest args]``: the test command's second half (``dev.py test`` runs it).

Starts a throw-away real Redis server on a free loopback port (unless TEST_REDIS_URL names one to use), points
REDIS_URL at it, runs pytest and stops the server. pytest's exit code is returned, so no tests run (exit code 5)
or any failure fails the command.
"""

import os
import subprocess
import sys
import tempfile

from portal.embedded_redis import RedisServer, free_port


def main(argv: list[str]) -> int:
    environment = dict(os.environ)
    environment.setdefault("IMAGE_FETCH_ALLOW_PRIVATE", "true")
    environment.setdefault("PORTAL_LOCAL", "true")
    environment.pop("RQ_REDIS_URL", None)
    with tempfile.TemporaryDirectory(prefix="portal-test-") as directory:
        environment.setdefault("PORTAL_VAR_DIR", os.path.join(directory, "var"))
        server = None
        if environment.get("TEST_REDIS_URL"):
            environment["REDIS_URL"] = environment["TEST_REDIS_URL"]
        else:
            server = RedisServer(os.path.join(directory, "redis"), port=free_port(), appendonly=False).start()
            environment["REDIS_URL"] = server.url
            print(f"Test Redis: {server.url} ({server.command()[0]})", flush=True)
        try:
            return subprocess.call([sys.executable, "-m", "pytest", *argv], env=environment)
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
