"""Label matchers of silences and notification routes, as Alertmanager writes them: ``label=value``, ``label!=value``,
``label=~regex``, ``label!~regex``; every matcher must match.

Regular expressions run on RE2 (google-re2), the engine Alertmanager's Go regexp implements: matching takes time
linear in the label's length whatever the pattern, so no silence or route can stall the evaluator (Python's
backtracking ``re`` spent 75 s on ``(.*.*)*X`` against a 17-character alert name), and a pattern is valid here
exactly when Alertmanager takes it (no look-arounds, no backreferences). Validation compiles with the engine that
matches. Patterns are anchored at both ends, as in Alertmanager.

This RE2 is newer than the Go regexp of Alertmanager 0.25 (Go 1.19/1.20) and takes a few things Go refuses:
``(?<name>...)`` (Go learnt it in 1.22; ``(?P<name>...)`` is the same group), ``\\C`` (one byte), group names with
non-ASCII letters or digits, and ``\\p{...}`` of the scripts Unicode added after Go's tables (13.0). Such a pattern
passed the portal's check and made ``amtool check-config`` fail on the exported configuration, so ``pattern_compile``
refuses them too (``go_refusal``), and the portal matches only what Alertmanager would.

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
# The names \p{...} takes in Go 1.19/1.20's regexp: Any, the general categories and the scripts of its Unicode 13.0
# tables (those RE2 knows too; checked one by one with amtool 0.25, built with Go 1.19.8). RE2 also knows the scripts
# added since (Kawi, Vithkuqi, ...) and would know the next ones after an upgrade: a list of what Go takes refuses
# those too.
GO_UNICODE_CLASSES = frozenset("""
Adlam Ahom Anatolian_Hieroglyphs Any Arabic Armenian Avestan Balinese Bamum Bassa_Vah Batak Bengali Bhaiksuki
Bopomofo Brahmi Braille Buginese Buhid C Canadian_Aboriginal Carian Caucasian_Albanian Cc Cf Chakma Cham Cherokee
Chorasmian Co Common Coptic Cs Cuneiform Cypriot Cyrillic Deseret Devanagari Dives_Akuru Dogra Duployan
Egyptian_Hieroglyphs Elbasan Elymaic Ethiopic Georgian Glagolitic Gothic Grantha Greek Gujarati Gunjala_Gondi
Gurmukhi Han Hangul Hanifi_Rohingya Hanunoo Hatran Hebrew Hiragana Imperial_Aramaic Inherited Inscriptional_Pahlavi
Inscriptional_Parthian Javanese Kaithi Kannada Katakana Kayah_Li Kharoshthi Khitan_Small_Script Khmer Khojki
Khudawadi L Lao Latin Lepcha Limbu Linear_A Linear_B Lisu Ll Lm Lo Lt Lu Lycian Lydian M Mahajani Makasar Malayalam
Mandaic Manichaean Marchen Masaram_Gondi Mc Me Medefaidrin Meetei_Mayek Mende_Kikakui Meroitic_Cursive
Meroitic_Hieroglyphs Miao Mn Modi Mongolian Mro Multani Myanmar N Nabataean Nandinagari Nd New_Tai_Lue Newa Nko Nl
No Nushu Nyiakeng_Puachue_Hmong Ogham Ol_Chiki Old_Hungarian Old_Italic Old_North_Arabian Old_Permic Old_Persian
Old_Sogdian Old_South_Arabian Old_Turkic Oriya Osage Osmanya P Pahawh_Hmong Palmyrene Pau_Cin_Hau Pc Pd Pe Pf
Phags_Pa Phoenician Pi Po Ps Psalter_Pahlavi Rejang Runic S Samaritan Saurashtra Sc Sharada Shavian Siddham
SignWriting Sinhala Sk Sm So Sogdian Sora_Sompeng Soyombo Sundanese Syloti_Nagri Syriac Tagalog Tagbanwa Tai_Le
Tai_Tham Tai_Viet Takri Tamil Tangut Telugu Thaana Thai Tibetan Tifinagh Tirhuta Ugaritic Vai Wancho Warang_Citi
Yezidi Yi Z Zanabazar_Square Zl Zp Zs
""".split())
# A capture group's name in Go's regexp (RE2 also takes non-ASCII letters and digits).
GO_GROUP_NAME = re.compile(r"[A-Za-z0-9_]+")


class MatcherError(ValueError):
    """A matcher that cannot be used; the message names it and says why."""


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # RE2 would print each refusal to stderr; the error is raised to the caller instead
    return options


@functools.lru_cache(maxsize=1024)
def pattern_compile(pattern: str):
    """The compiled, anchored RE2 pattern; raises MatcherError for one RE2 or Alertmanager's Go regexp refuses."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise MatcherError(f"is longer than {MAX_PATTERN_CHARS} characters")
    try:
        # The pattern on its own first: wrapped, an unbalanced one such as "a)|(b" would compile as "a|b", which
        # Alertmanager, anchoring it as "^(?:a)|(b)$", reads otherwise.
        re2.compile(pattern, _options())
        compiled = re2.compile(f"(?:{pattern})", _options())
    except re2.error as error:
        reason = error.args[0].decode(errors="replace") if error.args and isinstance(error.args[0], bytes) \
            else str(error)
        raise MatcherError(f"is not a regular expression Alertmanager (RE2) takes: {reason}") from None
    refusal = go_refusal(pattern)
    if refusal:
        raise MatcherError(f"uses {refusal}")
    return compiled


def go_refusal(pattern: str) -> str | None:
    """What Alertmanager 0.25's Go regexp refuses in ``pattern``, a pattern RE2 takes, and what to write instead;
    None when Go takes it too. Walks the pattern as Go's parser does: ``\\Q...\\E`` is literal text, and inside a
    character class ``(`` is a character and ``[:name:]`` a class."""
    position, in_class = 0, False
    while position < len(pattern):
        if pattern[position] == "\\":
            escaped = pattern[position + 1]  # RE2 took the pattern: a backslash is never its last character
            if escaped == "Q" and not in_class:
                end = pattern.find("\\E", position + 2)
                position = len(pattern) if end < 0 else end + 2
            elif escaped == "C":
                return "\\C (any byte), which Alertmanager's Go regexp does not have: write . (any character)"
            elif escaped in "pP" and pattern[position + 2] == "{":
                end = pattern.index("}", position + 3)
                if pattern[position + 3:end].lstrip("^") not in GO_UNICODE_CLASSES:
                    return (f"{pattern[position:end + 1]}, a Unicode class Alertmanager's Go regexp does not know "
                            f"(its tables are Unicode 13.0)")
                position = end + 1
            else:
                position += 3 if escaped in "pP" else 2
        elif in_class:
            named_class_end = pattern.find(":]", position + 2) if pattern.startswith("[:", position) else -1
            if named_class_end >= 0:
                position = named_class_end + 2
            else:
                in_class = pattern[position] != "]"
                position += 1
        elif pattern[position] == "[":
            position += 1
            position += pattern.startswith("^", position)
            position += pattern.startswith("]", position)  # a ] first in the class is a character
            in_class = True
        elif pattern.startswith("(?<", position):
            group = pattern[position:pattern.index(">", position) + 1]
            return (f"{group}, a named group Alertmanager's Go regexp refuses in that spelling: write "
                    f"(?P{group[2:]}...)")
        elif pattern.startswith("(?P<", position):
            group = pattern[position:pattern.index(">", position) + 1]
            if not GO_GROUP_NAME.fullmatch(group[4:-1]):
                return (f"{group}, a group name Alertmanager's Go regexp refuses: a group name is ASCII letters, "
                        f"digits and _")
            position += len(group)
        else:
            position += 1
    return None


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
