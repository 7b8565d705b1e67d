"""The live dashboard in a real browser (Debian's Chromium through Playwright) against the real ASGI server
(uvicorn serving portal.asgi: pages and WebSockets) and a real sampler process: the charts and figures move as
tasks are submitted and run, without a reload; the page reconnects after the server restarts and pauses while its
tab is hidden."""

import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from django.conf import settings

from monitoring.live.events import WATCHERS_KEY
from portal.embedded_redis import free_port
from queues.services import TaskSpec, tasks_submit_many
from tests.browser.test_admin_browser import browser_page, log_in  # noqa: F401  (fixture)
from tests.conftest import run_worker, subprocess_env

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


class Server:
    """uvicorn serving portal.asgi on a port of its own (the local runner's web process)."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process = None
        self.log = tempfile.TemporaryFile()

    def start(self):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "portal.asgi:application", "--host", "127.0.0.1", "--port",
             str(self.port), "--log-level", "warning"],
            cwd=settings.BASE_DIR, env=subprocess_env(), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, self.output()
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2):
                    return self
            except OSError:
                assert time.monotonic() < deadline, "uvicorn did not start: " + self.output()
                time.sleep(0.1)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


@pytest.fixture
def server_without_sampler(redis):
    server = Server(free_port()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def asgi_server(redis):
    server = Server(free_port()).start()
    sampler = subprocess.Popen([sys.executable, "manage.py", "run_sampler", "--live-interval", "0.5"],
                               cwd=settings.BASE_DIR, env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        yield server
    finally:
        sampler.send_signal(signal.SIGTERM)
        try:
            sampler.wait(20)
        except subprocess.TimeoutExpired:
            sampler.kill()
        server.stop()
        print(server.output())


DEPTH_NOW = """() => {
  const data = window.portalDashboard.data.depth;
  return data.slice(1).reduce((total, column) => total + (column[column.length - 1] || 0), 0);
}"""


def test_the_dashboard_moves_with_the_work_reconnects_and_pauses(browser_page, asgi_server, support_user,  # noqa: F811
                                                                   media_image, redis):
    page = browser_page
    log_in(page, asgi_server, support_user)
    page.goto(f"{asgi_server.url}/admin/dashboard/")
    page.wait_for_selector("#live-status[data-state=live]")
    page.wait_for_function("() => window.portalDashboard.samples >= 2")
    page.evaluate("() => { window.loadedOnce = true; }")  # gone if the page reloads
    assert page.evaluate(DEPTH_NOW) == 0
    assert page.locator("#chart-depth canvas").count() == 1  # uPlot drew it
    completed_before = page.get_attribute("#figure-completed", "data-value")

    tasks_submit_many(specs=[TaskSpec(media_image(), priority="high") for _ in range(6)])
    page.wait_for_function(f"() => ({DEPTH_NOW})() === 6")
    assert page.inner_text("#figure-depth") == "6"
    assert page.inner_text("#queue-table tr[data-queue=high] td:nth-child(2)") == "6"

    run_worker()  # the six complete; the worker's counters reach Redis within a second
    page.wait_for_function(f"() => ({DEPTH_NOW})() === 0")
    page.wait_for_function("() => Number(document.getElementById('figure-completed').dataset.value) > 0")
    assert page.get_attribute("#figure-completed", "data-value") != completed_before
    throughput = page.evaluate("() => window.portalDashboard.data.throughput[1].filter(v => v > 0).length")
    assert throughput > 0  # the throughput chart has the completions too
    assert page.evaluate("() => window.loadedOnce") is True

    # The server restarts: the page says it is disconnected, comes back by itself and carries on.
    asgi_server.stop()
    page.wait_for_selector("#live-status[data-state=disconnected]", timeout=10_000)
    asgi_server.start()
    received = page.evaluate("() => window.portalDashboard.samples")
    page.wait_for_selector("#live-status[data-state=live]", timeout=30_000)
    page.wait_for_function(f"() => window.portalDashboard.samples > {received}")
    assert page.evaluate("() => window.loadedOnce") is True

    # A hidden tab closes its socket (the sampler stops when nobody else watches) and opens it again when shown.
    page.evaluate("""() => {
      Object.defineProperty(document, "hidden", {value: true, configurable: true});
      document.dispatchEvent(new Event("visibilitychange"));
    }""")
    page.wait_for_selector("#live-status[data-state=paused]")
    deadline = time.monotonic() + 10
    while redis.zcard(WATCHERS_KEY) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert redis.zcard(WATCHERS_KEY) == 0
    page.evaluate("""() => {
      Object.defineProperty(document, "hidden", {value: false, configurable: true});
      document.dispatchEvent(new Event("visibilitychange"));
    }""")
    page.wait_for_selector("#live-status[data-state=live]")
    assert redis.zcard(WATCHERS_KEY) == 1


def test_the_index_and_the_queues_overview_update_live(browser_page, asgi_server, support_user, media_image,  # noqa: F811
                                                       redis):
    page = browser_page
    log_in(page, asgi_server, support_user)
    page.wait_for_selector("#live-status[data-state=live]")
    page.wait_for_function("() => PortalLive.connection().samplesReceived >= 1")
    tasks_submit_many(specs=[TaskSpec(media_image(), priority="low") for _ in range(3)])
    page.wait_for_function(
        "() => document.querySelector('#snapshot-queues [data-queue=low] .tile-figure').textContent === '3'")
    page.wait_for_function(  # the tasks per status come with the slower figures (every 10 s)
        "() => document.querySelector('#snapshot-tasks [data-status=QUEUED] a').textContent === '3'",
        timeout=20_000)

    page.goto(f"{asgi_server.url}/admin/queues/queueoverview/")
    page.wait_for_selector("#live-status[data-state=live]")
    assert page.inner_text("tr[data-queue=low] td.waiting") == "3"
    run_worker()
    page.wait_for_function("() => document.querySelector('tr[data-queue=low] td.waiting').textContent === '0'")
    # The database's columns follow from a re-read of the page once attempts ended: 3 completed in 5 minutes.
    page.wait_for_function(
        "() => document.querySelector('tr[data-queue=low] td.completed-5m').textContent.trim() === '3'",
        timeout=20_000)


def test_the_live_workers_page_follows_workers_coming_and_going(browser_page, asgi_server, support_user,  # noqa: F811
                                                                 redis):
    from queues import broker
    from queues.fleet.worker import CaptionWorker

    page = browser_page
    log_in(page, asgi_server, support_user)
    page.goto(f"{asgi_server.url}/admin/queues/liveworker/")
    page.wait_for_selector("#live-status[data-state=live]")
    assert page.locator("#live-workers tr[data-worker]").count() == 0
    worker = CaptionWorker(broker.get_queues(), connection=broker.get_connection(), name="watched-worker",
                           pool="default")
    worker.register_birth()  # as a worker process starts: registered in Redis, liveness key set
    try:
        page.wait_for_selector("#live-workers tr[data-worker=watched-worker]")
        assert page.inner_text("#live-workers tr[data-worker=watched-worker] td:nth-child(4)") == "default"
    finally:
        worker.register_death()
    page.wait_for_selector("#live-workers tr[data-worker=watched-worker]", state="detached")


def test_a_page_without_samples_says_stale_and_a_refused_user_is_told_why(browser_page, server_without_sampler,  # noqa: F811
                                                                           support_user, django_user_model):
    from django.contrib.auth.models import Permission

    page = browser_page
    log_in(page, server_without_sampler, support_user)
    page.goto(f"{server_without_sampler.url}/admin/dashboard/")
    page.wait_for_selector("#live-status[data-state=stale]", timeout=10_000)  # connected, but no sampler runs
    assert "run_sampler" in page.inner_text("#live-status")

    # May list tasks (so the index shows the queue figures and opens the socket), may not view the queues overview.
    reader = django_user_model.objects.create_user(username="rita-reader", password="pw-rita-reader", is_staff=True)
    reader.user_permissions.add(Permission.objects.get(codename="view_captiontask"))
    page.context.clear_cookies()  # log the support user out
    log_in(page, server_without_sampler, reader)
    page.wait_for_selector("#live-status[data-state=refused]", timeout=10_000)
    assert "queues.view_queueoverview" in page.inner_text("#live-status")
    attempts = page.evaluate("() => PortalLive.connection().attempt")
    time.sleep(2.5)
    assert page.evaluate("() => PortalLive.connection().attempt") == attempts  # a refusal is final: no retrying


def test_the_dashboard_shows_six_hours_a_day_and_a_week_from_the_history_then_the_hour_again(
        browser_page, asgi_server, support_user):  # noqa: F811
    from datetime import timedelta

    from django.utils import timezone

    from monitoring.models import MetricSample

    now = timezone.now().replace(second=0, microsecond=0)
    for at, resolution, minutes, depth in ((now - timedelta(minutes=20), "1m", 1, 3),
                                           (now - timedelta(hours=3), "1m", 1, 5),
                                           ((now - timedelta(days=3)).replace(minute=0), "1h", 60, 8)):
        MetricSample.objects.create(at=at, resolution=resolution, minutes=minutes, queue="", workers=1)
        MetricSample.objects.create(at=at, resolution=resolution, minutes=minutes, queue="low", depth=depth)
    page = browser_page
    log_in(page, asgi_server, support_user)
    page.goto(f"{asgi_server.url}/admin/dashboard/")
    page.wait_for_selector("#dashboard[data-range='1h']")
    page.wait_for_selector("#live-status[data-state=live]")
    # The low queue's column: the fourth series after the times (urgent, high, normal, low).
    low = "() => window.portalDashboard.data.depth[4].filter(v => v !== null)"
    oldest = "() => (Date.now() / 1000 - window.portalDashboard.data.depth[0][0]) / 3600"
    assert page.evaluate(low)[:1] == [3] and page.evaluate(oldest) < 1

    for label, span, first, at_least_hours in (("6 h", "6h", 5, 2.9), ("24 h", "24h", 5, 2.9),
                                               ("7 days", "7d", 8, 70)):
        page.click(f"#dashboard-range button[data-range='{span}']")
        page.wait_for_selector(f"#dashboard[data-range='{span}']")
        assert page.get_attribute(f"#dashboard-range button[data-range='{span}']", "aria-pressed") == "true", label
        assert page.evaluate(low)[0] == first and page.evaluate(oldest) > at_least_hours, label
        # The push carries on into the longer range: its newest point is now, and over the week the samples of one
        # hour are one point (the history's own resolution there).
        points = page.evaluate("() => window.portalDashboard.data.depth[0].length")
        pushes = page.evaluate("() => window.portalDashboard.samples")
        page.wait_for_function(f"() => window.portalDashboard.samples > {pushes} + 2")
        newest = page.evaluate("() => Date.now() / 1000 - window.portalDashboard.data.depth[0].slice(-1)[0]")
        assert newest < 5, label
        grown = page.evaluate("() => window.portalDashboard.data.depth[0].length") - points
        pushes = page.evaluate("() => window.portalDashboard.samples") - pushes
        # Up to 6 h every push is a point; over a day the pushes of one minute are one point, over a week of one hour.
        assert (grown >= pushes) if span == "6h" else (grown < pushes), (label, grown, pushes)

    page.click("#dashboard-range button[data-range='1h']")  # and back: the last hour only, its newest figures
    page.wait_for_selector("#dashboard[data-range='1h']")
    assert page.evaluate(low)[:1] == [3] and page.evaluate(oldest) < 1
