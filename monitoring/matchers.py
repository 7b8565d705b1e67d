"""Label matchers of silences and notification routes, as Alertmanager writes them: ``label=value``, ``label!=value``,
``label=~regex``, ``label!~regex``; every matcher must match.

Regular expressions run on RE2 (google-re2), the engine Alertmanager's Go regexp implements: matching takes time
linear in the label's length whatever the pattern, so no silence or route can stall the evaluator (Python's
backtracking ``re`` spent 75 s on ``(.*.*)*X`` against a 17-character alert name), and a pattern is valid here
exactly when Alertmanager takes it (no look-arounds, no backreferences). Validation compiles with the engine that
matches. Patterns are anchored at both ends, as in Alertmanager.

Pure: no database, no Django models; the models validate through it.
"""

from __future__ import annotations

import functools
import re

import re2

MATCHER_OPS = ("=", "!=", "=~", "!~")
# Alertmanager's (and Prometheus') label names.
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
MAX_PATTERN_CHARS = 1000


class MatcherError(ValueError):
    """A matcher that cannot be used; the message names it and says why."""


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # RE2 would print each refusal to stderr; the error is raised to the caller instead
    return options


@functools.lru_cache(maxsize=1024)
def pattern_compile(pattern: str):
    """The compiled, anchored RE2 pattern; raises MatcherError for one RE2 refuses."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise MatcherError(f"is longer than {MAX_PATTERN_CHARS} characters")
    try:
        return re2.compile(f"(?:{pattern})", _options())
    except re2.error as error:
        reason = error.args[0].decode(errors="replace") if error.args and isinstance(error.args[0], bytes) \
            else str(error)
        raise MatcherError(f"is not a regular expression Alertmanager (RE2) takes: {reason}") from None


def matchers_validate(matchers) -> list[dict]:
    """The matchers, cleaned (``{"label", "op", "value"}``); raises MatcherError naming the matcher at fault."""
    if not isinstance(matchers, list) or not matchers:
        raise MatcherError("matchers: give at least one matcher, e.g. alertname=redis-unreachable.")
    clean = []
    for index, matcher in enumerate(matchers, 1):
        if not isinstance(matcher, dict) or not str(matcher.get("label", "")).strip():
            raise MatcherError(f"matchers: matcher {index} needs a label name.")
        label = str(matcher["label"]).strip()
        if not LABEL_NAME.fullmatch(label):
            raise MatcherError(f"matchers: matcher {index} has the label name {label!r}; a label name is letters, "
                               f"digits and _ (not starting with a digit).")
        op = matcher.get("op", "=")
        if op not in MATCHER_OPS:
            raise MatcherError(f"matchers: matcher {index} has operator {op!r}; use one of {', '.join(MATCHER_OPS)}.")
        value = str(matcher.get("value", ""))
        if op in ("=~", "!~"):
            try:
                pattern_compile(value)
            except MatcherError as error:
                raise MatcherError(f"matchers: matcher {index} ({label}{op}{value}) {error}") from None
        clean.append({"label": label, "op": op, "value": value})
    return clean


def matchers_parse(text: str) -> list[dict]:
    """``alertname=redis-unreachable, queue=~normal|high`` into matchers."""
    matchers = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        for op in ("!~", "=~", "!=", "="):
            if op in part:
                label, value = part.split(op, 1)
                matchers.append({"label": label.strip(), "op": op, "value": value.strip().strip('"')})
                break
        else:
            raise MatcherError(f"matchers: {part!r} has no operator (=, !=, =~, !~).")
    return matchers_validate(matchers)


def matchers_match(matchers: list[dict], labels: dict) -> bool:
    """Whether every matcher matches the labels (a missing label reads as empty, as in Alertmanager). A stored
    pattern RE2 refuses (saved before matchers were checked with RE2) matches nothing."""
    for matcher in matchers or []:
        actual = str(labels.get(matcher.get("label", ""), ""))
        value, op = str(matcher.get("value", "")), matcher.get("op", "=")
        if op == "=" and actual != value or op == "!=" and actual == value:
            return False
        if op in ("=~", "!~"):
            try:
                found = pattern_compile(value).fullmatch(actual) is not None
            except MatcherError:
                return False
            if found != (op == "=~"):
                return False
    return True
