"""The API against its own description: Schemathesis reads /api/schema/ from a live portal (gunicorn, as deployed,
on this test's database and Redis) and sends generated requests to every operation, with an Operator's token and
without one. Any 5xx, any status the description does not list, or a body or header that does not match it fails
the test, which prints Schemathesis' report (with a curl line for each failure) and the portal's log."""

import json
import re
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from monitoring.models import Alert, Silence
from queues.models import ApiToken, CaptionTask, TaskStatus
from tests.conftest import alert_rules_seed, subprocess_env

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance,ignored_auth,missing_required_header,unsupported_method")


def _seed(operator_user, media_image) -> str:
    """Rows for the reads and actions to find: tasks in each state, an open alert, a silence; and the token."""
    reference = media_image()
    for status in (TaskStatus.QUEUED, TaskStatus.FAILED, TaskStatus.COMPLETED):
        CaptionTask.objects.create(image_ref=reference, status=status, attempts=0 if status == "QUEUED" else 1)
    alert_rules_seed()
    now = timezone.now()
    Alert.objects.create(name="normal-backlog-high", fingerprint="f" * 16, summary="backlog",
                         labels={"queue": "normal"}, state=Alert.State.FIRING, started_at=now, holding_since=now,
                         fired_at=now, last_seen_at=now)
    Silence.objects.create(matchers=[{"label": "alertname", "op": "=", "value": "x"}],
                           ends_at=now + timedelta(hours=1), reason="seeded", created_by=operator_user)
    return ApiToken.issue(name="contract test", user=operator_user, rate_limit=10000)[1]


def test_every_operation_holds_to_the_description_under_generated_input(redis, web_server, operator_user,
                                                                        media_image, tmp_path):
    portal_server = web_server()
    token = _seed(operator_user, media_image)
    with urllib.request.urlopen(f"{portal_server}/api/schema/", timeout=10) as response:
        schema = json.load(response)
    operations = [(method, path) for path, methods in schema["paths"].items() for method in methods]
    assert len(operations) >= 19
    started = time.monotonic()
    result = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"{portal_server}/api/schema/", "--checks", CHECKS,
         "--header", f"Authorization: Bearer {token}", "--max-examples", "25", "--seed", "1",
         "--phases", "examples,coverage,fuzzing", "--request-timeout", "20", "--no-color",
         # Hypothesis' health checks judge the generator, not the API: on a loaded machine "too slow" ends a run.
         "--suppress-health-check", "all",
         # One thread: on Python 3.11 two threads that parse source at once (Hypothesis describing a lambda) can
         # trip CPython's shared AST recursion counter, "SystemError: AST constructor recursion depth mismatch"
         # (python/cpython#106905), which Schemathesis reports as an error of the run.
         "--workers", "1"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    print(result.stdout[-30000:], result.stderr[-5000:], f"({time.monotonic() - started:.0f} s)")
    assert result.returncode == 0, "Schemathesis found answers that break the description (report above)"
    # Every operation was exercised: none skipped for want of a schema Schemathesis could generate from.
    tested = re.search(r"Tested: (\d+)", result.stdout)
    assert tested and int(tested.group(1)) == len(operations), "some operations were not tested (report above)"
