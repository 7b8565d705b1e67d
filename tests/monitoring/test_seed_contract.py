"""The old system's JSON shapes (../shared/seeds/000-rq-monitoring-integration.md): every key path the document's
four Flask views answer with is in the portal's live answer, with a compatible type.

The key paths are read from the document itself: its Python (the monitoring API is a file its shell block writes with
a heredoc) is parsed with ``ast``, each view found by the path it is routed to, and its 200 answer followed through
the dicts it builds: nested literals, keys assigned one at a time (``health_status['components']['redis'] = ...``),
dicts appended to a list (the alerts), keys taken from a loop over a literal list (``queue_metrics[queue]``). A key
the parser cannot read fails the test rather than being dropped. The examples below are the same answers written
out: they type what the document leaves to a call (``redis_client.llen(...)``), and the live checks use them alone
where the seeds are not beside the checkout; a test checks they hold exactly the document's key paths."""

import ast
import functools
import re
from pathlib import Path

import pytest
from django.conf import settings
from django.core.cache import cache
from django.urls import reverse

from monitoring.metrics.views import HEALTH_CACHE_KEY

SEED_000 = Path(settings.BASE_DIR).parent / "shared" / "seeds" / "000-rq-monitoring-integration.md"
SEEDS_ABSENT = "the seed documents (../shared/seeds) are not beside this checkout"

# get_rq_health(): health_status, with one issue and a worker count (both appear in the document's code).
HEALTH_EXAMPLE = {
    "timestamp": "2026-12-01T10:00:00",
    "overall_status": "warning",
    "components": {"redis": "healthy", "database": "healthy", "workers": "warning"},
    "issues": ["No active workers found"],
    "worker_count": 0,
}

# get_rq_metrics(): metrics, for a fleet with one worker and tasks of each status the document counts.
METRICS_EXAMPLE = {
    "timestamp": "2026-12-01T10:00:00",
    "queues": {"by_priority": {"urgent": 4, "high": 0, "normal": 0, "low": 0}, "total_queued": 4, "failed_jobs": 0},
    "workers": {"active_count": 1, "worker_ids": ["contract-1"]},
    "tasks": {"queued": 4, "processing": 0, "completed": 0, "failed": 0},
    "redis": {"connected_clients": 3, "used_memory_human": "1.02M", "keyspace_hits": 10, "keyspace_misses": 2},
    "system": {"fallback_active": False, "health_status": "healthy"},
}

# get_performance_metrics(): performance_data (the document's figures were constants; ours come from samples).
PERFORMANCE_EXAMPLE = {
    "timestamp": "2026-12-01T10:00:00",
    "period": "1 hour",
    "metrics": {"avg_processing_time": 45.2, "throughput": 12.5, "error_rate": 2.1, "queue_wait_time": 8.3},
    "trends": {"processing_time_trend": "stable", "throughput_trend": "increasing", "error_rate_trend": "decreasing"},
}

# get_rq_alerts(): one alert of the four the document checks, as it answers them.
ALERTS_EXAMPLE = {
    "alerts": [{"level": "warning", "message": "High queue backlog: 150 tasks", "timestamp": "2026-12-01T10:00:00",
                "metric": "queue_backlog", "value": 150, "threshold": 100}],
    "alert_count": 1,
    "timestamp": "2026-12-01T10:00:00",
}

EXAMPLES = {"/api/rq/health": HEALTH_EXAMPLE, "/api/rq/metrics": METRICS_EXAMPLE,
            "/api/rq/performance": PERFORMANCE_EXAMPLE, "/api/rq/alerts": ALERTS_EXAMPLE}


@pytest.fixture
def staff_client(client, admin_user):
    client.force_login(admin_user)
    return client


def key_paths(value, prefix: str = "") -> dict[str, type]:
    """Each key path of a JSON value with the type found there: ``components.redis`` -> str, ``issues[]`` -> str.
    A path under a list is there only if every element has it (each alert must carry its ``metric``)."""
    found = {}
    if isinstance(value, dict):
        for key, inner in value.items():
            path = f"{prefix}.{key}" if prefix else key
            found[path] = type(inner)
            found.update(key_paths(inner, path))
    elif isinstance(value, list) and value:
        found[f"{prefix}[]"] = type(value[0])
        each = [key_paths(element, f"{prefix}[]") for element in value]
        found.update({path: kind for path, kind in each[0].items() if all(path in other for other in each[1:])})
    return found


def compatible(answered: type, documented: type) -> bool:
    """JSON has one kind of number: 100 and 100.0 are the same figure to a script reading it (a bool is not one)."""
    numbers = (int, float)
    return answered in numbers if documented in numbers else answered is documented


def missing_or_mistyped(expected: dict[str, type | None], answer: dict) -> list[str]:
    """Each expected key path the answer lacks, or holds with another type (None: any type will do)."""
    answered = key_paths(answer)
    wrong = []
    for path, kind in expected.items():
        if path not in answered:
            wrong.append(f"{path}: missing")
        elif kind is not None and not compatible(answered[path], kind):
            wrong.append(f"{path}: {answered[path].__name__}, the document has {kind.__name__}")
    return wrong


# --- the document's views, read with ast ----------------------------------------------------------------------------

FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.S | re.M)  # only a bare fence closes (CommonMark)
PYTHON_HEREDOC = re.compile(r"cat\s*>\s*\S+\.py\s*<<\s*['\"]?(\w+)['\"]?\n(.*?)\n\1(?:\n|$)", re.S)


def document_python(markdown: str) -> list[ast.Module]:
    """The Python a document shows: its ```python blocks, and the .py files its shell blocks write with a heredoc
    (seed 000's monitoring API is ``cat > scripts/monitoring/rq_monitoring_api.py << 'EOF'``). A fragment that is
    not a whole module is left out: the views must still be found (the tests say so if not)."""
    sources = []
    for language, body in FENCE.findall(markdown):
        if language in ("python", "py"):
            sources.append(body)
        elif language in ("bash", "sh", "shell", ""):
            sources.extend(source for _, source in PYTHON_HEREDOC.findall(body))
    modules = []
    for source in sources:
        try:
            modules.append(ast.parse(source))
        except SyntaxError:
            continue
    return modules


def routed_views(modules: list[ast.Module]) -> dict[str, ast.FunctionDef]:
    """Each path the document's Flask code routes, with its view: ``'/api/rq/health'`` -> ``get_rq_health``."""
    views = {}
    for module in modules:
        for node in ast.walk(module):
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                        and decorator.func.attr == "route" and decorator.args
                        and isinstance(decorator.args[0], ast.Constant)):
                    views[decorator.args[0].value] = node
    return views


def _called(call: ast.Call) -> str:
    return call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", "")


def _subscripted(node: ast.expr) -> tuple[str | None, list[ast.expr]]:
    """``health_status['components']['redis']`` -> ("health_status", [<'components'>, <'redis'>])."""
    keys = []
    while isinstance(node, ast.Subscript):
        keys.insert(0, node.slice)
        node = node.value
    return (node.id, keys) if isinstance(node, ast.Name) else (None, [])


class AnswerShape:
    """The key paths of the JSON a Flask view answers with on success (``return jsonify(x)``; the error's
    ``return jsonify(...), 500`` is a tuple and left out), each with the type its code gives it, or None where
    the code leaves it to a call the parser cannot know (``redis_client.llen(...)``)."""

    STRING_METHODS = {"isoformat", "decode", "lower", "upper", "strip", "format"}
    BUILTINS = {"len": int, "str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list}

    def __init__(self, view: ast.FunctionDef):
        self.bindings: dict[str, ast.expr] = {}  # name -> the first value assigned to it
        self.loop_values: dict[str, list] = {}  # loop variable -> the literal values it takes
        self.built: list[tuple[str, list[ast.expr], ast.expr, bool]] = []  # (name, keys, value, appended)
        self.answers: list[ast.expr] = []
        nodes = sorted((node for node in ast.walk(view) if isinstance(node, ast.stmt | ast.expr)),
                       key=lambda node: (node.lineno, node.col_offset))
        for node in nodes:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                if isinstance(target, ast.Name):
                    self.bindings.setdefault(target.id, node.value)
                elif (subscripted := _subscripted(target))[0]:
                    self.built.append((*subscripted, node.value, False))
            elif (isinstance(node, ast.For) and isinstance(node.target, ast.Name)
                  and isinstance(node.iter, ast.List | ast.Tuple)):
                self.loop_values[node.target.id] = [element.value for element in node.iter.elts]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "append"
                  and len(node.args) == 1 and (subscripted := _subscripted(node.func.value))[0]):
                self.built.append((*subscripted, node.args[0], True))
            elif isinstance(node, ast.Return) and isinstance(node.value, ast.Call) and _called(node.value) == "jsonify":
                self.answers.extend(node.value.args)

    def key_paths(self) -> dict[str, type | None]:
        found: dict[str, type | None] = {}
        for answer in self.answers:
            self._walk(answer, "", found, ())
        return found

    def _walk(self, node: ast.expr, prefix: str, found: dict, visiting: tuple) -> None:
        if isinstance(node, ast.Name) and node.id not in visiting:
            visiting = (*visiting, node.id)
            if node.id in self.bindings:
                self._walk(self.bindings[node.id], prefix, found, visiting)
            for name, keys, value, appended in self.built:
                if name == node.id:
                    for path in self._paths(prefix, keys):
                        self._record(f"{path}[]" if appended else path, value, found, visiting)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if key is None:  # {**other}
                    self._walk(value, prefix, found, visiting)
                    continue
                for path in self._paths(prefix, [key]):
                    self._record(path, value, found, visiting)
        elif isinstance(node, ast.List | ast.Tuple):
            for element in node.elts:
                self._record(f"{prefix}[]", element, found, visiting)
        elif isinstance(node, ast.ListComp):
            self._record(f"{prefix}[]", node.elt, found, visiting)

    def _record(self, path: str, value: ast.expr, found: dict, visiting: tuple) -> None:
        if found.get(path) is None:
            found[path] = self.type_of(value)
        self._walk(value, path, found, visiting)

    def _paths(self, prefix: str, keys: list[ast.expr]) -> list[str]:
        paths = [prefix]
        for key in keys:
            paths = [f"{path}.{name}" if path else name for path in paths for name in self.key_names(key)]
        return paths

    def key_names(self, key: ast.expr) -> list[str]:
        """The keys an expression stands for: a string, a loop variable over a literal list, its ``.lower()``."""
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            return [key.value]
        if isinstance(key, ast.Name) and key.id in self.loop_values:
            return [str(value) for value in self.loop_values[key.id]]
        if (isinstance(key, ast.Call) and isinstance(key.func, ast.Attribute) and key.func.attr in ("lower", "upper")
                and not key.args):
            return [getattr(name, key.func.attr)() for name in self.key_names(key.func.value)]
        raise ValueError(f"cannot read the key {ast.unparse(key)} (line {key.lineno} of the document's code)")

    def type_of(self, node: ast.expr, visiting: tuple = ()) -> type | None:
        if isinstance(node, ast.Constant):
            return type(node.value)
        if isinstance(node, ast.JoinedStr):
            return str
        if isinstance(node, ast.Dict | ast.DictComp):
            return dict
        if isinstance(node, ast.List | ast.ListComp | ast.Tuple):
            return list
        if isinstance(node, ast.IfExp):
            body, orelse = self.type_of(node.body, visiting), self.type_of(node.orelse, visiting)
            return body if body is orelse else None
        if isinstance(node, ast.Name) and node.id in self.bindings and node.id not in visiting:
            return self.type_of(self.bindings[node.id], (*visiting, node.id))
        if isinstance(node, ast.Call):
            called = _called(node)
            if isinstance(node.func, ast.Name):
                return self.BUILTINS.get(called)
            if called in self.STRING_METHODS:
                return str
            if called == "count":  # a query's count
                return int
            if called == "get" and len(node.args) == 2:  # dict.get(key, default): the default's type
                return self.type_of(node.args[1], visiting)
        return None


@functools.cache
def documented_answers() -> dict[str, dict[str, type | None]]:
    """Seed 000's routed views and the key paths of their answers: ``'/api/rq/health'`` -> {path: type}."""
    return {path: AnswerShape(view).key_paths()
            for path, view in routed_views(document_python(SEED_000.read_text())).items()}


def expected_paths(endpoint: str) -> dict[str, type | None]:
    """What a live answer of ``endpoint`` must hold: the example's key paths and, where the seeds are beside the
    checkout, every key path the document's view answers with (typed by its code where it says, else by the
    example)."""
    expected: dict[str, type | None] = dict(key_paths(EXAMPLES[endpoint]))
    if SEED_000.exists():
        for path, kind in documented_answers()[endpoint].items():
            expected[path] = kind or expected.get(path)
    return expected


def test_key_paths_catch_a_missing_key_and_a_changed_type():
    expected = key_paths({"components": {"redis": "healthy"}, "issues": ["x"], "worker_count": 1})
    assert missing_or_mistyped(expected, {"components": {"redis": "healthy"}, "issues": ["y"],
                                          "worker_count": 3.0}) == []
    assert missing_or_mistyped(expected, {"components": {"redis": {"status": "healthy"}}, "issues": ["y"],
                                          "worker_count": True}) == [
        "components.redis: dict, the document has str", "worker_count: bool, the document has int"]
    assert missing_or_mistyped(expected, {"components": {}, "issues": [], "worker_count": 3}) == [
        "components.redis: missing", "issues[]: missing"]
    alerts = key_paths({"alerts": [{"metric": "a", "value": 1}, {"value": 2}]})
    assert "alerts[].value" in alerts and "alerts[].metric" not in alerts  # every alert must carry it


FLASK_DOCUMENT = """
```bash
cat > api.py << 'EOF'
@bp.route('/api/x')
def view():
    answer = {'when': now.isoformat(), 'parts': {}, 'notes': []}
    counts = {}
    for name in ['a', 'b']:
        counts[name] = redis_client.llen(name)
    for status in ['QUEUED', 'DONE']:
        answer['parts'][status.lower()] = len(name)
    answer['notes'].append(f'{name} noted')
    found = []
    if counts:
        found.append({'level': 'warning', 'value': 3})
    try:
        return jsonify({**answer, 'counts': counts, 'found': found, 'ids': [key.decode() for key in keys],
                        'total': counts.get('a', 0), 'state': 'up' if answer else 'down'})
    except Exception as error:
        return jsonify({'error': str(error), 'code': 1}), 500
EOF
```
"""


def test_the_document_reader_follows_what_a_view_builds():
    ((path, view),) = routed_views(document_python(FLASK_DOCUMENT)).items()
    assert path == "/api/x"
    assert AnswerShape(view).key_paths() == {
        "when": str, "parts": dict, "parts.queued": int, "parts.done": int, "notes": list, "notes[]": str,
        "counts": dict, "counts.a": None, "counts.b": None, "found": list, "found[]": dict, "found[].level": str,
        "found[].value": int, "ids": list, "ids[]": str, "total": int, "state": str}
    unreadable = routed_views(document_python(FLASK_DOCUMENT.replace("[status.lower()]", "[status.title()]")))
    with pytest.raises(ValueError, match=r"cannot read the key status.title\(\)"):
        AnswerShape(unreadable["/api/x"]).key_paths()


@pytest.mark.skipif(not SEED_000.exists(), reason=SEEDS_ABSENT)
def test_the_examples_hold_exactly_the_documents_key_paths():
    """The four views are found in the document, and each example names every key path its view answers with (no
    more), with the type the document's code gives where it gives one."""
    answers = documented_answers()
    assert set(EXAMPLES) <= set(answers), sorted(answers)
    assert {"components.workers", "worker_count", "issues[]"} <= set(answers["/api/rq/health"])
    assert {"queues.by_priority.low", "tasks.failed", "workers.worker_ids[]"} <= set(answers["/api/rq/metrics"])
    assert {"alerts[].metric", "alerts[].threshold", "alert_count"} <= set(answers["/api/rq/alerts"])
    for endpoint, example in EXAMPLES.items():
        documented, written = answers[endpoint], key_paths(example)
        assert set(written) == set(documented), (endpoint, set(written) ^ set(documented))
        assert [path for path, kind in documented.items() if kind and not compatible(written[path], kind)] == []


@pytest.mark.django_db
def test_health_answers_every_key_of_the_documents_health_check(staff_client, redis):
    """Redis and the database answer and no worker runs: the document's example is the same case (workers
    'warning' there, 'unhealthy' here: the README says why)."""
    cache.delete(HEALTH_CACHE_KEY)
    answer = staff_client.get(reverse("api-health")).json()
    assert missing_or_mistyped(expected_paths("/api/rq/health"), answer) == []
    assert answer["overall_status"] == answer["status"] == "unhealthy"
    assert set(answer["components"]) >= {"redis", "database", "workers"}
    assert answer["components"]["workers"] == answer["component_details"]["workers"]["status"] == "unhealthy"
    assert answer["issues"] == [f"{name}: {detail['reason']}" for name, detail in answer["component_details"].items()
                                if detail["status"] != "healthy"]


@pytest.mark.django_db
def test_metrics_answer_every_key_of_the_documents_metrics(staff_client, redis, media_image,
                                                           django_capture_on_commit_callbacks):
    from queues import broker
    from queues.fleet.worker import CaptionWorker
    from queues.services import TaskSpec, tasks_submit_many

    with django_capture_on_commit_callbacks(execute=True):
        tasks_submit_many(specs=[TaskSpec(media_image(), priority="urgent") for _ in range(4)])
    worker = CaptionWorker(broker.get_queues(), connection=redis, name="contract-1")
    worker.register_birth()
    try:
        answer = staff_client.get(reverse("api-metrics")).json()
    finally:
        worker.register_death()
    assert missing_or_mistyped(expected_paths("/api/rq/metrics"), answer) == []
    assert answer["queues"]["by_priority"]["urgent"] == answer["queues"]["total_queued"] == 4
    assert answer["tasks"]["queued"] == 4 and answer["tasks"]["failed"] == 0
    assert answer["workers"]["active_count"] == 1 and answer["workers"]["worker_ids"] == ["contract-1"]
    assert answer["redis"]["keyspace_hits"] + answer["redis"]["keyspace_misses"] > 0
    assert answer["system"]["health_status"] in ("healthy", "warning", "unhealthy")


@pytest.mark.django_db
def test_performance_answers_every_key_of_the_documents_performance(staff_client):
    from datetime import timedelta

    from django.utils import timezone

    from tests.monitoring.test_history import fleet_rows

    fleet_rows(timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=60), [(10, 1, 1.0, 5)] * 60)
    answer = staff_client.get(reverse("api-performance"), {"window": "1h"}).json()
    assert missing_or_mistyped(expected_paths("/api/rq/performance"), answer) == []
    assert answer["period"] == "1 hour"
    assert answer["metrics"]["error_rate"] == pytest.approx(100 / 11)  # percent, as the document has it
    assert answer["error_rate"] == pytest.approx(1 / 11)  # the portal's own: a fraction


@pytest.mark.django_db
def test_performance_of_a_window_without_figures_answers_null_as_the_readme_says(staff_client, redis):
    """The departure the README states: the document's figures were constants, ours come from the samples. A window
    with no sample answers null for all four figures and "stable" trends; one whose samples saw no attempt end (an
    idle fleet, sampled by the real sampler) answers a throughput of 0 and null for the average processing time,
    the error rate and the queue wait, which no attempt measured. Never an invented 0; every key is still there."""
    from datetime import timedelta

    from django.utils import timezone

    from monitoring.metrics.sampler import sample_take

    every_key = dict.fromkeys(expected_paths("/api/rq/performance"))
    documented_trends = ("processing_time_trend", "throughput_trend", "error_rate_trend")
    empty = staff_client.get(reverse("api-performance"), {"window": "1h"}).json()
    assert missing_or_mistyped(every_key, empty) == []
    assert empty["samples"] == 0
    assert empty["metrics"] == {"avg_processing_time": None, "throughput": None, "error_rate": None,
                                "queue_wait_time": None}
    assert {name: empty["trends"][name] for name in documented_trends} == dict.fromkeys(documented_trends, "stable")

    minute = timezone.now().replace(second=0, microsecond=0)
    for minutes_ago in (3, 2, 1):  # the first only sets the sampler's baseline
        sample_take(now=minute - timedelta(minutes=minutes_ago))
    idle = staff_client.get(reverse("api-performance"), {"window": "1h"}).json()
    assert missing_or_mistyped(every_key, idle) == []
    assert idle["samples"] == 2 and idle["totals"]["completed"] == idle["totals"]["failed"] == 0
    assert idle["metrics"] == {"avg_processing_time": None, "throughput": 0.0, "error_rate": None,
                               "queue_wait_time": None}


@pytest.mark.django_db
@pytest.mark.usefixtures("seeded_alert_rules")
def test_alerts_answer_the_documents_metrics_with_its_values(staff_client, redis, media_image,
                                                             django_capture_on_commit_callbacks):
    """The four conditions the old endpoint checked, each firing: its metric names, and its figures (counts; the
    stuck tasks as a number of tasks, not the oldest one's age)."""
    from datetime import timedelta

    from django.utils import timezone

    from monitoring.alerts.evaluate import alerts_evaluate
    from monitoring.alerts.rules import Readings
    from monitoring.metrics.snapshot import Snapshot
    from monitoring.models import AlertRule
    from queues.models import CaptionTask, TaskStatus
    from queues.services import TaskSpec, tasks_submit_many

    names = ("no-active-workers", "backlog-high", "dead-letters-high", "processing-stuck")
    AlertRule.objects.exclude(name__in=names).update(enabled=False)
    AlertRule.objects.update(for_seconds=0)
    with django_capture_on_commit_callbacks(execute=True):
        tasks_submit_many(specs=[TaskSpec(media_image()) for _ in range(3)])
    now = timezone.now()
    CaptionTask.objects.update(status=TaskStatus.PROCESSING, started_at=now - timedelta(hours=3))
    state = Snapshot(redis_ok=True, database_ok=True, queue_lengths={"urgent": 0, "high": 0, "normal": 150, "low": 0},
                     dead_letters={"urgent": 0, "high": 0, "normal": 12, "low": 0}, workers=[],
                     oldest_processing_started=now - timedelta(hours=3))
    alerts_evaluate(now=now, readings=Readings(now=now, snapshot=state))
    answer = staff_client.get(reverse("api-alerts")).json()
    assert missing_or_mistyped(expected_paths("/api/rq/alerts"), answer) == []
    by_metric = {alert["metric"]: (alert["level"], alert["value"], alert["threshold"]) for alert in answer["alerts"]}
    assert by_metric == {"active_workers": ("critical", 0, 1), "queue_backlog": ("warning", 150, 100),
                         "failed_jobs": ("error", 12, 10), "stuck_tasks": ("warning", 3, 0)}
    assert answer["alert_count"] == 4


@pytest.mark.django_db
@pytest.mark.usefixtures("seeded_alert_rules")
def test_the_documents_metric_names_belong_to_their_four_conditions_only(staff_client):
    """Every seeded rule on: one worker alive fires few-workers, not the document's "no active RQ workers"
    (active_workers), and 250 jobs in normal fire normal-backlog-high besides the document's backlog condition; a
    script that pages on ``metric == "active_workers"`` must not be woken by a fleet that still runs."""
    from django.utils import timezone

    from monitoring.alerts.evaluate import alerts_evaluate
    from monitoring.alerts.rules import Readings
    from monitoring.metrics.snapshot import Snapshot
    from monitoring.models import AlertRule

    AlertRule.objects.update(for_seconds=0)
    now = timezone.now()
    worker = {"name": "w-1", "state": "idle", "alive": True, "successful": 0, "failed": 0, "host": "h",
              "pool": "default", "rss": None, "slots": 1, "busy_slots": 0}
    state = Snapshot(redis_ok=True, database_ok=True, queue_lengths={"urgent": 0, "high": 0, "normal": 250, "low": 0},
                     dead_letters={"urgent": 0, "high": 0, "normal": 0, "low": 0}, workers=[worker])
    alerts_evaluate(now=now, readings=Readings(now=now, snapshot=state))
    metrics = sorted(alert["metric"] for alert in staff_client.get(reverse("api-alerts")).json()["alerts"])
    assert {"few-workers", "normal-backlog-high", "queue_backlog"} <= set(metrics), metrics
    assert "active_workers" not in metrics and metrics.count("queue_backlog") == 1, metrics


@pytest.mark.django_db
def test_the_old_health_and_stats_paths_answer_what_the_runbooks_read(staff_client, redis):
    """Seed 001 reads `/health | jq .status`, `/admin/rq/health | jq .workers` and `/admin/rq/stats | jq .queues`;
    seed 000's exporter reads `status` and `fallback_active` from /admin/rq/health. The portal's own views answer
    them (django-rq's pages stay unserved)."""
    from queues import broker
    from queues.fleet.worker import CaptionWorker

    worker = CaptionWorker(broker.get_queues(), connection=redis, name="runbook-1")
    worker.register_birth()
    try:
        cache.delete(HEALTH_CACHE_KEY)
        health = staff_client.get("/health")
        assert health.json()["status"] == health.json()["overall_status"]
        assert missing_or_mistyped(expected_paths("/api/rq/health"), health.json()) == []
        admin_health = staff_client.get("/admin/rq/health").json()
        assert admin_health["workers"]["worker_ids"] == ["runbook-1"] and admin_health["workers"]["active_count"] == 1
        assert isinstance(admin_health["fallback_active"], bool) and admin_health["status"] == health.json()["status"]
        stats = staff_client.get("/admin/rq/stats")
        queues = {path.removeprefix("queues."): kind for path, kind in expected_paths("/api/rq/metrics").items()
                  if path.startswith("queues.")}
        assert stats.status_code == 200 and missing_or_mistyped(queues, stats.json()["queues"]) == []
    finally:
        worker.register_death()


@pytest.mark.django_db
def test_the_old_paths_need_the_same_access_as_the_apis(client, outsider_user):
    for path in ("/health", "/admin/rq/health", "/admin/rq/stats"):
        anonymous = client.get(path)
        assert anonymous.status_code == 401 and "error" in anonymous.json(), path
    client.force_login(outsider_user)
    for path in ("/health", "/admin/rq/health", "/admin/rq/stats"):
        assert client.get(path).status_code == 403, path
