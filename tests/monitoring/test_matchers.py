"""Label matchers (monitoring.matchers): a regex is valid in the portal exactly when Alertmanager 0.25 takes it.

The portal matches with RE2, which is newer than Alertmanager 0.25's Go regexp (Go 1.19/1.20) and takes a few
constructs Go refuses; a route saved with one of them made ``amtool check-config`` fail on the exported
configuration. The checks here run the real amtool (skipped where it is not installed, outside CI)."""

import random
import subprocess

import pytest
import yaml
from django.core.exceptions import ValidationError
from django.core.management import call_command

from monitoring.matchers import MatcherError, matchers_match, matchers_parse, pattern_compile
from monitoring.models import NotificationRoute
from tests.conftest import tool_or_skip

pytestmark = pytest.mark.django_db

# RE2 takes each of these; Alertmanager 0.25 refuses each, naming what the portal's message names.
GO_REFUSES = {
    "(?<c>redis)": "(?<c>",
    r"\C": r"\C",
    "redis-(?P<é>.+)": "(?P<é>",
    r"\p{Kawi}+": r"\p{Kawi}",
    r"[\P{Vithkuqi}]": r"\P{Vithkuqi}",
    r"[(?<]x|\Q(?<\E(?<late>y)": "(?<late>",
}


def amtool_or_skip() -> str:
    return tool_or_skip("amtool", "prometheus-alertmanager")


def amtool_check(amtool: str, path) -> subprocess.CompletedProcess:
    return subprocess.run([amtool, "check-config", str(path)], capture_output=True, text=True, timeout=60)


def amtool_check_pattern(amtool: str, tmp_path, pattern: str) -> subprocess.CompletedProcess:
    """``amtool check-config`` on a minimal configuration with one route matching ``component=~pattern``."""
    quoted = '"' + pattern.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    config = {"route": {"receiver": "nowhere", "routes": [{"receiver": "nowhere",
                                                          "matchers": [f"component=~{quoted}"]}]},
              "receivers": [{"name": "nowhere"}]}
    path = tmp_path / "minimal.yml"
    path.write_text(yaml.safe_dump(config))
    return amtool_check(amtool, path)


@pytest.mark.parametrize("pattern", GO_REFUSES)
def test_a_route_refuses_a_regex_alertmanagers_go_regexp_refuses_and_names_the_construct(pattern):
    route = NotificationRoute(name="Redis pages", matchers=[{"label": "alertname", "op": "=", "value": "x"},
                                                            {"label": "component", "op": "=~", "value": pattern}])
    with pytest.raises(ValidationError) as refused:
        route.full_clean()
    [message] = refused.value.message_dict["matchers"]
    assert message.startswith(f"matchers: matcher 2 (component=~{pattern}) uses {GO_REFUSES[pattern]}"), message
    assert "Alertmanager" in message
    with pytest.raises(MatcherError, match=r"matcher 1 \(queue!~"):
        matchers_parse(f"queue!~{pattern}")  # a silence's matchers
    assert not matchers_match([{"label": "component", "op": "=~", "value": pattern}], {"component": "redis"}), \
        "one saved before the check matches nothing, as Alertmanager would take nothing"


@pytest.mark.parametrize("pattern", ["a)|(b", "x)(y", "(a)|b)|(c"])
def test_an_unbalanced_pattern_is_refused_though_its_wrapped_form_compiles(pattern):
    """Matched as ``(?:a)|(b)`` it would be a|b; Alertmanager anchors it as ``^(?:a)|(b)$``, which matches other
    values: the two would route differently."""
    with pytest.raises(MatcherError, match="is not a regular expression"):
        pattern_compile(pattern)


def test_the_named_group_message_says_what_to_write():
    with pytest.raises(MatcherError, match=r"write \(\?P<c>\.\.\.\)"):
        pattern_compile("(?<c>redis)")


@pytest.mark.parametrize("pattern", GO_REFUSES)
def test_amtool_refuses_each_pattern_the_portal_refuses_for_alertmanager(pattern, tmp_path):
    amtool = amtool_or_skip()
    result = amtool_check_pattern(amtool, tmp_path, pattern)
    assert result.returncode != 0 and "error parsing regexp" in result.stdout + result.stderr, pattern


# Pieces the generated patterns are made of: what RE2 and Go both take, and what only RE2 takes ((?<name>, \C,
# a non-ASCII group name, scripts newer than Unicode 13), also hidden where it is a literal (a class, \Q...\E).
ATOMS = ["redis", "é", ".", r"\.", r"\d", r"\W", r"\pL", r"\p{Greek}", r"\P{^Han}", r"\p{Kawi}", r"\C", r"\x41",
         r"\x{1F600}", r"\Q(?<x>\E", r"\Q\C\E", r"\b", "^", "$", r"\A", r"\z", "[a-z]", "[^]a]", "[[:alpha:]_]",
         r"[\p{Nd}\]]", "[(?<]", r"[\p{Vithkuqi}]", 'say "hi"', r"\\C", r"\(?<", "[[:]"]
GROUPS = ["({})", "(?:{})", "(?P<name_1>{})", "(?<name>{})", "(?i:{})", "(?P<é>{})", "(?s){}", "(?U:{})"]
QUANTIFIERS = ["", "", "*", "+?", "?", "{2,5}", "{3}"]


def generated_pattern(rng: random.Random, depth: int = 0) -> str:
    if depth > 2 or rng.random() < 0.3:
        return rng.choice(ATOMS) + rng.choice(QUANTIFIERS)
    parts = [generated_pattern(rng, depth + 1) for _ in range(rng.randint(1, 3))]
    inner = rng.choice(["", "|"]).join(parts)
    return rng.choice(GROUPS).format(inner) + rng.choice(QUANTIFIERS)


def test_every_generated_regex_the_portal_takes_passes_amtool_once_exported(tmp_path, settings):
    """Property-style: 400 patterns built from the pieces above (a fixed seed); those the portal takes are exported
    as one route's matchers and ``amtool check-config`` takes the file; a sample of those refused only for
    Alertmanager's sake is refused by amtool too (the portal does not refuse what Alertmanager takes)."""
    rng = random.Random(24)
    taken, refused_for_go = [], []
    for pattern in dict.fromkeys(generated_pattern(rng) for _ in range(400)):
        try:
            pattern_compile(pattern)
            taken.append(pattern)
        except MatcherError as error:
            if str(error).startswith("uses "):
                refused_for_go.append(pattern)
    assert len(taken) >= 100, len(taken)

    amtool = amtool_or_skip()
    settings.ALERTS_WEBHOOK_TOKEN = "am-webhook-token-0123456789"
    route = NotificationRoute(name="Generated", matchers=[{"label": "component", "op": "=~", "value": pattern}
                                                          for pattern in taken])
    route.full_clean()
    route.save()
    output = tmp_path / "alertmanager.yml"
    call_command("export_alertmanager_config", "--output", str(output))
    assert sum(matcher.startswith("component=~") for exported in yaml.safe_load(output.read_text())["route"]["routes"]
               for matcher in exported.get("matchers", [])) == len(taken)
    result = amtool_check(amtool, output)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(refused_for_go) >= 50, len(refused_for_go)
    for pattern in random.Random(5).sample(refused_for_go, 15):
        result = amtool_check_pattern(amtool, tmp_path, pattern)
        assert result.returncode != 0 and "error parsing regexp" in result.stdout + result.stderr, pattern
