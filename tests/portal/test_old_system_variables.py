"""The variables the old system's documents name (../shared/seeds/): each is read with the documents' meaning, or,
when set, reported at start-up with what replaces it. None is silently ignored."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

from portal import legacy_variables
from tests.portal.test_settings import load_settings, settings_values

SEEDS = Path(settings.BASE_DIR).parent / "shared" / "seeds"
NAME = r"[A-Z][A-Z0-9]*_[A-Z0-9_]+"
# How the documents' code blocks set or read a variable: a line ``[export] NAME=value`` (or a compose file's
# ``- NAME=value``), ``echo "NAME=..." >> .env``, every name on a ``sed`` line (``sed -i 's/NAME=a/NAME=b/'``,
# ``sed -i '/NAME/d'``), a shell reference ``$NAME`` or ``${NAME:default}`` (any upper-case name: ``$WORKERS``), and
# Python's ``os.getenv('NAME')``, ``os.environ.get('NAME')``, ``os.environ['NAME']``.
ASSIGNMENT = re.compile(rf"^\s*(?:export\s+|-\s+)?({NAME})=")
ECHOED = re.compile(rf"\becho\s+[\"']?({NAME})=")
SED_LINE = re.compile(r"(?:^|[\s;|&])sed\s")
SHELL_REFERENCE = re.compile(r"\$\{?([A-Z][A-Z0-9_]*[A-Z0-9])\b")
PYTHON_READ = re.compile(rf"""(?:getenv\(|environ\.get\(|environ\[)\s*["']({NAME}|[A-Z][A-Z0-9]+)["']""")
# Names the documents use that are not the portal's to read (README, *The old system's variables*): shell variables
# of their scripts (the drain loop, the scaling and capacity checks), filebeat's own settings in seed 004's ELK
# example (not part of the portal), and placeholders to replace (``YOUR_...``).
SCRIPT_VARIABLES = {"ACTIVE_WORKERS", "CPU_USAGE", "CURRENT_USERS", "CURRENT_WORKERS", "GROWTH_FACTOR",
                    "MEMORY_USAGE", "NEW_WORKER_COUNT", "PROCESSING", "PROJECTED_USERS", "PROJECTED_WORKERS",
                    "QUEUE_LENGTH", "WORKERS"}
FILEBEAT_VARIABLES = {"ELASTICSEARCH_HOST", "ELASTICSEARCH_PORT", "ELASTICSEARCH_USERNAME",
                      "ELASTICSEARCH_PASSWORD", "KIBANA_HOST", "KIBANA_PORT", "NODE_NAME"}
PLACEHOLDER_PREFIX = "YOUR_"


def not_the_portals(name: str) -> bool:
    return name in SCRIPT_VARIABLES | FILEBEAT_VARIABLES or name.startswith(PLACEHOLDER_PREFIX)


def code_block_names(markdown: str) -> set[str]:
    """Every variable name a document's code blocks set or read, in any of the forms above (prose is left out).
    As in CommonMark, only a bare fence closes a block: seed 000 writes a markdown file with a heredoc, and the
    ```bash fences inside it are lines of the outer block, not its end."""
    found = set()
    in_code = False
    for line in markdown.splitlines():
        fence = line.strip()
        if fence.startswith("```"):
            in_code = fence != "```" or not in_code
            continue
        if not in_code:
            continue
        if match := ASSIGNMENT.match(line):
            found.add(match.group(1))
        found.update(ECHOED.findall(line))
        found.update(SHELL_REFERENCE.findall(line))
        found.update(PYTHON_READ.findall(line))
        if SED_LINE.search(line):
            found.update(re.findall(rf"\b{NAME}\b", line))
    return found


def documented_variables() -> dict[str, str]:
    """Every name the documents' code blocks set or read: name -> the first document naming it."""
    found = {}
    for document in sorted(SEEDS.glob("0*.md")):
        for name in sorted(code_block_names(document.read_text())):
            found.setdefault(name, document.name)
    return found


def test_the_scan_finds_each_way_a_document_sets_or_reads_a_variable():
    markdown = """Prose naming PROSE_ONLY=1 is not code.
```bash
export RQ_A=1
  - RQ_B=2
echo "RQ_C=true" >> .env
sed -i 's/RQ_D=false/RQ_D=true/' .env && sed -i '/RQ_E/d' .env
cat > notes.md << 'EOF'
```bash
if [ $WORKERS -lt 2 ]; then echo "${RQ_F:-x} ${RQ_G}"; fi
```
The written file's prose: NOT_CODE=1
EOF
```

```python
redis_client = redis.from_url(os.getenv('RQ_H'), os.environ.get("RQ_I"), os.environ['RQ_J'])
print("Projected: 12")
```
"""
    assert code_block_names(markdown) == {"RQ_A", "RQ_B", "RQ_C", "RQ_D", "RQ_E", "WORKERS", "RQ_F", "RQ_G", "RQ_H",
                                          "RQ_I", "RQ_J"}


# CI always has the documents beside the checkout: there the test never skips.
@pytest.mark.skipif(not SEEDS.is_dir() and os.environ.get("CI") != "true",
                    reason="the old system's documents are not beside this checkout")
def test_every_documented_variable_is_read_or_reported():
    variables = documented_variables()
    assert {"RQ_WORKER_COUNT", "RQ_CLEANUP_INTERVAL", "REDIS_HOST", "WORKER_POOL_SIZE", "QUEUE_POLL_INTERVAL",
            "RQ_REDIS_HEALTH_CHECK_INTERVAL", "REDIS_MAX_CONNECTIONS"} <= set(variables)  # the scan finds them
    # ... those only the other forms reach (echo, sed, os.getenv/os.environ, ${...}: filebeat's), and those in the
    # code blocks of the markdown file seed 000 writes with a heredoc
    assert {"RQ_HYBRID_MODE", "DATABASE_POLLING_ENABLED", "RQ_ENABLED", "REDIS_URL", "ELASTICSEARCH_HOST",
            "RQ_AUTO_SCALING_ENABLED", "RQ_SCALE_UP_COOLDOWN"} <= set(variables)
    assert SCRIPT_VARIABLES | FILEBEAT_VARIABLES <= set(variables), "a name listed as not the portal's is gone"
    read = set(re.findall(r'"([A-Z][A-Z0-9_]+)"', (Path(settings.BASE_DIR) / "portal" / "settings.py").read_text()))
    reported = {variable.name for variable in legacy_variables.NOT_READ}
    assert not read & reported, "a variable is either read or reported, never both"
    assert not {name for name in read | reported if not_the_portals(name)}, "a name listed as not the portal's is"
    neither = {name: document for name, document in variables.items()
               if name not in read | reported and not not_the_portals(name)}
    assert not neither, f"documented variables neither read nor reported: {neither}"


def test_redis_host_and_port_name_the_server(tmp_path):
    values = settings_values(tmp_path, ["REDIS_URL", "EMBEDDED_REDIS", "LOCAL_MODE"],
                             REDIS_HOST="redis.internal", REDIS_PORT="6380", REDIS_DB="2")
    assert values == {"REDIS_URL": "redis://redis.internal:6380/2", "EMBEDDED_REDIS": False, "LOCAL_MODE": False}
    assert settings_values(tmp_path, ["REDIS_URL"], REDIS_HOST="redis")["REDIS_URL"] == "redis://redis:6379/0"


@pytest.mark.parametrize("variables, message", [
    ({"REDIS_URL": "redis://a:6379/0", "REDIS_HOST": "b"},
     "REDIS_URL and REDIS_HOST are set; set one of them"),
    ({"RQ_REDIS_URL": "redis://a:6379/0", "REDIS_HOST": "b"}, "RQ_REDIS_URL and REDIS_HOST are set"),
    ({"REDIS_PORT": "6380"}, "REDIS_PORT is set without REDIS_HOST"),
    ({"REDIS_HOST": "b", "REDIS_PORT": "99999"}, "REDIS_PORT must be at most 65535; got 99999"),
    ({"REDIS_HOST": "b", "REDIS_SENTINELS": "10.0.0.1:26379"}, "REDIS_HOST and REDIS_SENTINELS are both set"),
    ({"RQ_MAX_RETRIES": "3", "WORKER_RETRY_COUNT": "5"},
     "Retry counts disagree: RQ_MAX_RETRIES=3, WORKER_RETRY_COUNT=5; set RQ_MAX_RETRIES alone"),
    ({"QUEUE_MAX_RETRIES": "many"}, "QUEUE_MAX_RETRIES must be a whole number; got 'many'"),
    ({"RQ_WORKER_COUNT": "-1"}, "RQ_WORKER_COUNT must be at least 0"),
    ({"RQ_WORKER_COUNT": "eight"}, "RQ_WORKER_COUNT must be a whole number"),
    ({"RQ_CLEANUP_INTERVAL": "1h"}, "RQ_CLEANUP_INTERVAL must be a whole number"),
    ({"RQ_REDIS_HEALTH_CHECK_INTERVAL": "-5"}, "RQ_REDIS_HEALTH_CHECK_INTERVAL must be at least 0"),
])
def test_contradictions_and_bad_values_stop_start_up_naming_the_variables(tmp_path, variables, message):
    ok, output = load_settings(tmp_path, **variables)
    assert not ok and message in output, output


def test_the_documents_names_are_read(tmp_path):
    names = ["RQ_MAX_RETRIES", "RQ_WORKER_COUNT", "RQ_CLEANUP_INTERVAL", "REDIS_HEALTH_CHECK_INTERVAL"]
    assert settings_values(tmp_path, names) == {"RQ_MAX_RETRIES": 3, "RQ_WORKER_COUNT": None,
                                                "RQ_CLEANUP_INTERVAL": 3600, "REDIS_HEALTH_CHECK_INTERVAL": 30}
    assert settings_values(tmp_path, names, WORKER_RETRY_COUNT="5", QUEUE_MAX_RETRIES="5", RQ_WORKER_COUNT="8",
                           RQ_CLEANUP_INTERVAL="600", RQ_REDIS_HEALTH_CHECK_INTERVAL="15") == {
        "RQ_MAX_RETRIES": 5, "RQ_WORKER_COUNT": 8, "RQ_CLEANUP_INTERVAL": 600, "REDIS_HEALTH_CHECK_INTERVAL": 15}


def test_the_broker_checks_idle_connections_on_the_documented_interval(redis, settings):
    from queues import broker

    settings.REDIS_HEALTH_CHECK_INTERVAL = 7
    broker.reset_connection()
    try:
        assert broker.get_connection().connection_pool.connection_kwargs["health_check_interval"] == 7
    finally:
        broker.reset_connection()


def test_each_variable_not_read_is_reported_with_its_replacement():
    for variable in legacy_variables.NOT_READ:
        ((reported, value),) = legacy_variables.not_read({variable.name: "10", "UNRELATED": "1"})
        text = legacy_variables.message(reported, value)
        assert text.startswith(f"{variable.name}=10 (from the old system's document {variable.document}) is not "
                               "read here: ")
        assert re.search(r"\b[A-Z][A-Z_]{4,}\b|admin|supervisor|pipelines", variable.replacement)
    # A value that already means what the portal does is not worth a warning; the opposite one is.
    assert legacy_variables.not_read({"RQ_MONITORING_ENABLED": "true", "RQ_WORKER_MODE": "external"}) == []
    assert [variable.name for variable, _ in legacy_variables.not_read(
        {"RQ_MONITORING_ENABLED": "false", "RQ_WORKER_MODE": "integrated", "WORKER_POOL_SIZE": " "})] == [
        "RQ_MONITORING_ENABLED", "RQ_WORKER_MODE"]


def _environment(tmp_path, **variables) -> dict:
    environment = {key: value for key, value in os.environ.items()
                   if key not in {"DATABASE_URL", "REDIS_URL", "RQ_REDIS_URL", "PORTAL_LOCAL", "REDIS_SENTINELS"}}
    return {**environment, "PORTAL_VAR_DIR": str(tmp_path / "var"), "SECRET_KEY": "s" * 40, **variables}


def test_manage_py_commands_warn_at_start_up(tmp_path):
    """Every manage.py command runs the system checks first: the supervisor, the sampler, migrate, check."""
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=settings.BASE_DIR, capture_output=True,
                            text=True, timeout=120,
                            env=_environment(tmp_path, RQ_WORKER_MODE="integrated", QUEUE_POLL_INTERVAL="1s",
                                             RQ_MONITORING_ENABLED="true", RQ_WORKER_COUNT="2"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("(portal.W010)") == 2, output
    assert ("RQ_WORKER_MODE=integrated (from the old system's document 001) is not read here: workers never run "
            "inside the web process") in output
    assert "QUEUE_POLL_INTERVAL=1s (from the old system's document 003) is not read here" in output
    assert "LEGACY_POLL_INTERVAL" in output and "RQ_MONITORING_ENABLED" not in output

    quiet = subprocess.run([sys.executable, "manage.py", "check"], cwd=settings.BASE_DIR, capture_output=True,
                           text=True, timeout=120, env=_environment(tmp_path))
    assert quiet.returncode == 0 and "portal.W010" not in quiet.stdout + quiet.stderr


def test_a_web_process_logs_them_when_it_starts(tmp_path):
    result = subprocess.run([sys.executable, "-c", "import portal.asgi"], cwd=settings.BASE_DIR, capture_output=True,
                            text=True, timeout=120, env=_environment(tmp_path, WORKER_MAX_CONCURRENT_JOBS="5"))
    assert result.returncode == 0, result.stderr
    assert ("WORKER_MAX_CONCURRENT_JOBS=5 (from the old system's document 003) is not read here: the captions one "
            "worker process runs at once are its pool's slots") in result.stdout + result.stderr


def test_gunicorn_logs_them_when_it_is_ready(monkeypatch, caplog):
    from portal import gunicorn_config

    class Server:  # what gunicorn hands its hooks: the arbiter, whose .log is its logger
        log = logging.getLogger("test.gunicorn")

    monkeypatch.setenv("WORKER_HTTP_TIMEOUT", "90s")
    with caplog.at_level(logging.WARNING, logger="test.gunicorn"):
        gunicorn_config.when_ready(Server())
    assert [record.getMessage() for record in caplog.records] == [
        "WORKER_HTTP_TIMEOUT=90s (from the old system's document 003) is not read here: RQ_DEFAULT_TIMEOUT (90) "
        "bounds a whole caption attempt and the captioner's HTTP call gets what is left of it; IMAGE_FETCH_TIMEOUT "
        "bounds the image download."]


@pytest.mark.django_db
def test_a_seeding_variable_the_row_no_longer_follows_is_reported(monkeypatch, settings):
    """Seed 001 changes the mode by editing the environment and restarting; here the rows decide after the first
    write, so a variable set to something else is reported with what changes the row."""
    from migration.models import SystemMode
    from migration.state import system_mode_ensure
    from portal.checks import check_seeded_rows
    from queues.models import WorkerPool

    WorkerPool.objects.update_or_create(name="default", defaults={"queues": "urgent high normal low", "desired": 2,
                                                                  "minimum": 2, "maximum": 10})
    system_mode_ensure()
    assert check_seeded_rows(None) == []  # nothing set: not even a query
    monkeypatch.setenv("RQ_MAX_WORKERS", "10")
    monkeypatch.setenv("RQ_HYBRID_MODE", "false")
    settings.DEFAULT_POOL_SEED = {**settings.DEFAULT_POOL_SEED, "maximum": 10}
    settings.RQ_ENABLED, settings.RQ_HYBRID_MODE = True, False
    assert check_seeded_rows(None) == []  # set, and the rows agree

    monkeypatch.setenv("RQ_MAX_WORKERS", "12")
    monkeypatch.setenv("RQ_HYBRID_MODE", "true")
    monkeypatch.setenv("RQ_FALLBACK_TIMEOUT", "60")
    settings.DEFAULT_POOL_SEED = {**settings.DEFAULT_POOL_SEED, "maximum": 12}
    settings.RQ_HYBRID_MODE, settings.RQ_FALLBACK_TIMEOUT = True, 60
    SystemMode.objects.filter(pk=1).update(mode="rq", fallback_timeout=30)
    warnings = {warning.msg.split("=")[0]: warning for warning in check_seeded_rows(None)}
    assert set(warnings) == {"RQ_MAX_WORKERS", "RQ_HYBRID_MODE", "RQ_FALLBACK_TIMEOUT"}
    assert {warning.id for warning in warnings.values()} == {"portal.W011"}
    assert "default pool has (maximum = 10)" in warnings["RQ_MAX_WORKERS"].msg
    assert "Worker pools" in warnings["RQ_MAX_WORKERS"].hint
    assert "asks for mode hybrid, but the dispatch mode is rq" in warnings["RQ_HYBRID_MODE"].msg
    assert "manage.py migrate_to_rq mode hybrid" in warnings["RQ_HYBRID_MODE"].hint
    assert "(fallback_timeout = 30)" in warnings["RQ_FALLBACK_TIMEOUT"].msg


def test_the_runner_refuses_two_worker_counts_that_disagree(tmp_path):
    result = subprocess.run([sys.executable, "manage.py", "runportal"], cwd=settings.BASE_DIR, capture_output=True,
                            text=True, timeout=120,
                            env=_environment(tmp_path, PORTAL_WORKERS="3", RQ_WORKER_COUNT="8"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "PORTAL_WORKERS=3 and RQ_WORKER_COUNT=8 disagree; set one of them" in result.stderr
