"""The admin in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium) against a live server."""

import os
import re
from pathlib import Path

import pytest

from queues.models import CaptionTask, TaskStatus
from queues.services import TaskSpec, tasks_submit_many

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def browser_page(live_server, monkeypatch):
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the browser tests: /usr/bin/chromium is missing")
        pytest.skip("Debian's chromium is not installed here (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    # Playwright's sync API runs an event loop in this thread; the ORM calls in the test are still synchronous.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.set_default_timeout(15_000)
        yield page
        browser.close()


def log_in(page, live_server, user):
    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", user.username)
    page.fill("#id_password", "pw-" + user.username)
    page.click("input[type=submit]")
    page.wait_for_url(re.compile(r".*/admin/$"))


@pytest.fixture
def dead_letters(redis, media_image):
    ids = tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(8)]).created
    CaptionTask.objects.filter(pk__in=ids[:5]).update(status=TaskStatus.FAILED, last_error_class="HTTPNotFound",
                                                      last_error_message="the image server answered HTTP 404")
    CaptionTask.objects.filter(pk__in=ids[5:7]).update(status=TaskStatus.FAILED, last_error_class="WorkerLost",
                                                       last_error_message="worker died")
    return ids


def test_operator_requeues_all_dead_letters_of_one_error_class(browser_page, live_server, operator_user,
                                                               dead_letters):
    page = browser_page
    log_in(page, live_server, operator_user)
    page.goto(f"{live_server.url}/admin/queues/queueoverview/dead-letters/")
    page.click("tr[data-error-class=HTTPNotFound] a >> nth=0")
    page.wait_for_url(re.compile(r".*last_error_class=HTTPNotFound.*"))
    assert page.locator("#result_list tbody tr").count() == 5

    page.check("#action-toggle")
    if page.locator("a.question").is_visible():
        page.click("a.question")  # "Select all N caption tasks"
    page.select_option("select[name=action]", "requeue_tasks")
    page.click("button[name=index]")
    summary = page.locator("#action-summary").inner_text()
    assert "Requeue 5 of the 5 selected task(s)" in summary
    page.click("input[type=submit][value^='Yes']")
    page.wait_for_selector("ul.messagelist")
    assert "Requeued 5 task(s)." in page.locator("ul.messagelist").inner_text()
    assert CaptionTask.objects.filter(status=TaskStatus.FAILED, last_error_class="WorkerLost").count() == 2
    assert CaptionTask.objects.filter(pk__in=dead_letters[:5], status=TaskStatus.QUEUED).count() == 5


def test_support_sees_pages_but_no_action_succeeds(browser_page, live_server, support_user, dead_letters):
    page = browser_page
    log_in(page, live_server, support_user)
    page.goto(f"{live_server.url}/admin/queues/queueoverview/")
    assert page.locator("tr[data-queue=normal]").is_visible()
    assert page.locator("text=Pause").count() == 0 and page.locator("text=Empty").count() == 0

    page.goto(f"{live_server.url}/admin/queues/captiontask/?status__exact=FAILED")
    assert page.locator("#result_list tbody tr").count() == 7
    options = page.locator("select[name=action] option").all_inner_texts()
    assert not any("Requeue" in option for option in options)

    response = page.goto(f"{live_server.url}/admin/queues/queueoverview/normal/pause/")
    assert response.status == 403
    response = page.goto(f"{live_server.url}/admin/queues/captiontask/{dead_letters[0]}/do/requeue/")
    assert response.status == 403
    assert CaptionTask.objects.filter(status=TaskStatus.FAILED).count() == 7
