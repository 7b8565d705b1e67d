"""The all-in-one local runner behind ``python3 dev.py run``.

Migrates the schema, starts the embedded Redis (when REDIS_URL is unset), the web server (uvicorn serving the
ASGI app: pages and WebSockets) and the worker supervisor (``runworkers``: the default pool's workers, plus the
relay and the reconciler), each as a child process, then prints where to log in. Ctrl-C or SIGTERM stops the
children in order (web, then the supervisor, whose workers finish their current job, then Redis) and waits for
them, so nothing is left running.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from portal.embedded_redis import RedisServerError, embedded_server
from queues.fleet.services import pool_scale
from queues.models import WorkerPool

PR_SET_PDEATHSIG = 1


def _env_workers() -> int | None:
    """PORTAL_WORKERS, or the old system's RQ_WORKER_COUNT (settings reads it); both set, they must agree."""
    value = os.environ.get("PORTAL_WORKERS", "").strip()
    if not value:
        return settings.RQ_WORKER_COUNT
    if not value.isdigit():
        raise CommandError(f"PORTAL_WORKERS must be a whole number; got {value!r}")
    if settings.RQ_WORKER_COUNT is not None and settings.RQ_WORKER_COUNT != int(value):
        raise CommandError(f"PORTAL_WORKERS={value} and RQ_WORKER_COUNT={settings.RQ_WORKER_COUNT} disagree; "
                           "set one of them")
    return int(value)
RESTART_LIMIT = 5


def _die_with_parent():  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    command: list[str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    critical: bool = False
    started_at: float = field(default=0.0)
    environment: dict | None = None  # None: ours

    def start(self):
        self.process = subprocess.Popen(self.command, preexec_fn=_die_with_parent, start_new_session=True,
                                        env=self.environment)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float) -> None:
        if not self.alive():
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class Command(BaseCommand):
    help = "Runs the whole portal locally in one process tree: web, supervised workers and (embedded) Redis."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=os.environ.get("PORTAL_HOST", "127.0.0.1"),
                            help="Address to serve on (default 127.0.0.1).")
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORTAL_PORT", "8000")),
                            help="Port to serve on (default 8000, or PORTAL_PORT).")
        parser.add_argument("--workers", type=int,
                            help="Workers of the default pool (default: PORTAL_WORKERS or RQ_WORKER_COUNT, else the "
                                 "pool's desired count, 2 after migrate). Widens the pool's minimum/maximum if "
                                 "needed.")

    def handle(self, *args, host, port, workers, **options):
        if workers is None:
            workers = _env_workers()
        if workers is not None and not 0 <= workers <= 64:
            raise CommandError(f"--workers must be between 0 and 64; got {workers}")
        if not 1 <= port <= 65535:
            raise CommandError(f"--port must be between 1 and 65535; got {port}")
        self.stopping = False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._request_stop)

        self.stdout.write("Preparing the database ...")
        call_command("migrate", interactive=False, verbosity=0)
        call_command("collectstatic", interactive=False, verbosity=0)
        login = self._ensure_admin()
        pool = WorkerPool.objects.get(name="default")
        if workers is not None and workers != pool.desired:
            pool = pool_scale(pool=pool, desired=workers, adjust_bounds=True,
                              reason="runportal --workers (or PORTAL_WORKERS, RQ_WORKER_COUNT)")
        workers = pool.desired

        redis_server = None
        if settings.EMBEDDED_REDIS:
            redis_server = embedded_server(settings.VAR_DIR, settings.EMBEDDED_REDIS_PORT)
            if not redis_server.ping():
                try:
                    # Its own session, so a terminal's Ctrl-C reaches only us and Redis stops last, after the
                    # workers have finished with it.
                    redis_server.start(detached=True)
                except RedisServerError as error:
                    raise CommandError(f"The embedded Redis server could not start: {error}") from None
            self.stdout.write(f"Embedded Redis: {redis_server.url} (data in {redis_server.directory})")

        python, manage = sys.executable, str(settings.BASE_DIR / "manage.py")
        web = Child("web", [python, "-m", "uvicorn", "portal.asgi:application", "--host", host, "--port", str(port),
                            "--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "5"],
                    critical=True)
        children = [web]
        # The children skip the system checks this command ran (their warnings once, not four times), and the
        # supervisor does not apply RQ_WORKER_COUNT again: the count is the one set above (--workers wins).
        supervisor_environment = {name: value for name, value in os.environ.items() if name != "RQ_WORKER_COUNT"}
        children.append(Child("supervisor", [python, manage, "runworkers", "--worker-verbosity", "0", "--skip-checks"],
                              critical=True, environment=supervisor_environment))
        children.append(Child("sampler", [python, manage, "run_sampler", "--verbosity", "0", "--skip-checks"]))
        children.append(Child("alerts", [python, manage, "evaluate_alerts", "--verbosity", "0", "--skip-checks"]))
        for child in children:
            child.start()

        if self._wait_for_web(host, port, web):
            shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
            self.stdout.write(self.style.SUCCESS(f"\nRQ Ops Portal is running at http://{shown_host}:{port}/admin/"))
            self.stdout.write(login)
            self.stdout.write(f"{workers} worker(s) of pool 'default' are running under the supervisor, which "
                              "also relays retries and tasks submitted while Redis was down; alert rules are "
                              f"evaluated every {settings.ALERTS_EVALUATION_INTERVAL:g} s.")
            self.stdout.write("Submit work with: .venv/bin/python manage.py submit_tasks --count 20")
            self.stdout.write("Press Ctrl-C to stop everything.\n")
            exit_code = self._supervise(children)
        else:
            self.stderr.write(f"The web server did not start on {host}:{port} (is the port in use?).")
            exit_code = 1

        self.stdout.write("Stopping ...")
        web.stop(timeout=10)
        for child in children[1:]:  # the supervisor's workers finish their current job within the task timeout
            if child.alive():
                child.process.send_signal(signal.SIGTERM)
        for child in children[1:]:
            child.stop(timeout=settings.RQ_DEFAULT_TIMEOUT + 60)
        if redis_server is not None:
            redis_server.stop()
        self.stdout.write("Stopped.")
        if exit_code:
            sys.exit(exit_code)

    def _request_stop(self, signum, frame):
        self.stopping = True

    def _wait_for_web(self, host: str, port: int, web: Child, timeout: float = 30.0) -> bool:
        import urllib.request

        probe_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping:
            if not web.alive():
                return False
            try:
                with urllib.request.urlopen(f"http://{probe_host}:{port}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return True
            except OSError:
                time.sleep(0.1)
        return False

    def _supervise(self, children: list[Child]) -> int:
        while not self.stopping:
            for child in children:
                if child.alive() or self.stopping:
                    continue
                code = child.process.returncode
                if child.critical:
                    self.stderr.write(f"{child.name} exited with code {code}; stopping.")
                    return 1
                if child.restarts >= RESTART_LIMIT:
                    self.stderr.write(f"{child.name} keeps exiting (code {code}); stopping.")
                    return 1
                child.restarts += 1
                self.stderr.write(f"{child.name} exited with code {code}; restarting ({child.restarts}).")
                time.sleep(min(2 ** child.restarts * 0.25, 5))
                child.start()
            time.sleep(0.2)
        return 0

    def _ensure_admin(self) -> str:
        """An admin from PORTAL_ADMIN_USER/PORTAL_ADMIN_PASSWORD, or one created with a password shown once."""
        users = get_user_model()
        username = os.environ.get("PORTAL_ADMIN_USER", "").strip()
        password = os.environ.get("PORTAL_ADMIN_PASSWORD", "")
        if username and password:
            user, created = users.objects.get_or_create(username=username,
                                                        defaults={"is_staff": True, "is_superuser": True})
            if created or not user.check_password(password):
                user.set_password(password)
                user.is_staff = user.is_superuser = True
                user.save()
            return f"Log in as {username!r} with the password from PORTAL_ADMIN_PASSWORD."
        if users.objects.filter(is_superuser=True, is_active=True).exists():
            return ("Log in with your existing admin account "
                    "(python manage.py changepassword <user> resets a forgotten password).")
        password = secrets.token_urlsafe(12)
        users.objects.create_superuser(username="admin", email="", password=password)
        return f"Log in as 'admin' with password {password}  (shown only this once)."
