"""The rules format's contract: every problem of a parsed snapshot, each with
its path and line, and for each valid rule a typed :class:`RuleSpec`.

Validation never stops at the first problem; a :class:`Checker` collects them.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypedDict

from pdp.bounds import MAX_ID_LENGTH, MAX_TAG_LENGTH
from pdp.iso3166 import jurisdiction_problem
from pdp.model import Action, Verdict
from pdp.rules.document import Marked, line_of
from pdp.rules.errors import Problem
from pdp.rules.jsondiff import JsonRules
from pdp.rules.text import control_problem, encoding_problem, is_blank, size_problem

__all__ = ["MAX_RULES", "PRIORITY_LIMIT", "Checker", "Header", "RuleSpec", "check_header", "check_rule", "kind"]

MAX_RULES = 300_000
"""More are refused before any rule is validated or compiled. Measured with
benchmarks/rules_memory.py: about 27 MiB of peak memory per 10,000 rules during a
reload (the old and the new policy both alive) and 34-41 s to compile 300,000 at start;
the chart sizes its memory limit from ``sizing.rules``, which its schema bounds by this."""
PRIORITY_LIMIT = 10**9
_INT64_MAX = 2**63 - 1
_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_TOP_KEYS = frozenset({"version", "defaults", "rules"})
_DEFAULTS_KEYS = frozenset({"unknown_location"})
_RULE_KEYS = frozenset(
    {
        "id",
        "effect",
        "jurisdiction",
        "actions",
        "meetings",
        "priority",
        "mode",
        "legal_basis",
        "reason",
        "valid_from",
        "valid_until",
    }
)
_MEETING_KEYS = ("meeting_ids", "host_accounts", "tags")  # most selective first
# The longest value a request can carry for each selector (pdp.decisions bounds requests).
_SELECTOR_BOUNDS = {
    "meeting_ids": (MAX_ID_LENGTH, "meeting id"),
    "host_accounts": (MAX_ID_LENGTH, "host account id"),
    "tags": (MAX_TAG_LENGTH, "tag"),
}
_NO_VALUES: frozenset[str] = frozenset()  # shared by every rule without a selector
_ACTIONS = {"join": int(Action.JOIN), "host": int(Action.HOST)}
_EFFECTS = {"deny": Verdict.DENY, "allow": Verdict.ALLOW}
_MODES = ("enforce", "shadow")


class RuleSpec(TypedDict):
    """One valid rule as written, before ranking (see pdp.rules.compile)."""

    id: str
    effect: Verdict
    jurisdiction: tuple[str, ...]
    actions: int
    meeting_ids: frozenset[str]
    host_accounts: frozenset[str]
    tags: frozenset[str]
    priority: int
    shadow: bool
    legal_basis: str
    reason: str
    valid_from: float
    valid_until: float
    position: int


@dataclass(frozen=True, slots=True)
class Header:
    """A snapshot's fields besides its rules; ``rules`` is the raw list (or the
    stepwise reader's :class:`JsonRules`), None when absent or not a list."""

    version: int
    unknown_location: Verdict
    rules: list[object] | JsonRules | None


def kind(value: object) -> str:
    """How a problem names the type of ``value``."""
    if value is None:
        return "null"
    if isinstance(value, Marked):
        return "a mapping"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), type(value).__name__
    )


class Checker:
    """Walks the parsed document, collecting every problem instead of stopping."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        # country -> (path, line, bytes of its id in an answer) of each shadow rule reaching it, in file order
        self.shadow_reach: dict[str, list[tuple[str, int | None, int]]] = {}

    def fail(self, path: str, message: str, line: int | None) -> None:
        self.problems.append(Problem(path, message, line))

    def unknown_keys(self, mapping: Marked, allowed: Iterable[str], path: str) -> None:
        allowed = frozenset(allowed)
        for key in mapping:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                self.fail(where, f"unknown key (expected one of: {', '.join(sorted(allowed))})", line_of(mapping, key))

    def string(self, mapping: Marked, key: str, path: str, *, required: bool = False) -> str:
        value = mapping.get(key)
        if value is None:
            if required:
                self.fail(f"{path}.{key}", "required", line_of(mapping, key) or mapping.line)
            return ""
        if not isinstance(value, str):
            self.fail(f"{path}.{key}", f"must be a string, not {kind(value)}", line_of(mapping, key))
            return ""
        problem = encoding_problem(value)
        if problem:
            self.fail(f"{path}.{key}", problem, line_of(mapping, key) or mapping.line)
            return ""
        return value

    def text(self, mapping: Marked, key: str, path: str) -> str | None:
        """A reason or legal basis, stripped: '' when absent, null or blank; None when
        it has a problem (recorded)."""
        given = mapping.get(key)
        if given is None:
            return ""
        value = self.string(mapping, key, path)
        if value == "" and given != "":
            return None  # not a string, or not valid Unicode: recorded
        problem = size_problem(value)
        if not problem:
            if is_blank(value):
                return ""
            problem = control_problem(value)
        if problem:
            self.fail(f"{path}.{key}", problem, line_of(mapping, key) or mapping.line)
            return None
        return value.strip()

    def choice(self, mapping: Marked, key: str, path: str, choices: Iterable[str], default: str | None) -> str:
        choices = tuple(choices)
        if mapping.get(key) is None:
            self.string(mapping, key, path, required=default is None)
            return default or ""
        value = self.string(mapping, key, path)
        if not isinstance(mapping[key], str) or (value == "" and mapping[key]):
            return default or ""  # not a string, or not valid Unicode: recorded
        if value not in choices:
            self.fail(f"{path}.{key}", f"{value!r} is not one of: {', '.join(choices)}", line_of(mapping, key))
            return default or ""
        return value

    def string_list(self, mapping: Marked, key: str, path: str, bound: tuple[int, str] | None = None) -> list[str]:
        """Non-empty, visible strings, each at most ``bound``'s length (a request's
        bound, beyond which a value can never match: (length, what it is))."""
        value = mapping.get(key)
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        longest = bound[0] if bound else 1 << 62
        if type(value) is list and all(
            type(item) is str and item.isascii() and item.isprintable() and 0 < len(item) <= longest and item.strip()
            for item in value
        ):
            return value  # the common case, checked in one pass
        line = line_of(mapping, key)
        if not isinstance(value, list):
            self.fail(f"{path}.{key}", f"must be a list of strings, not {kind(value)}", line)
            return []
        out = []
        for position, item in enumerate(value):
            problem = _item_problem(item, bound)
            if problem:
                self.fail(f"{path}.{key}[{position}]", problem, line)
            else:
                out.append(item)
        return out

    def integer(self, mapping: Marked, key: str, path: str, *, low: int, high: int, default: int | None) -> int:
        value = mapping.get(key)
        if type(value) is int and low <= value <= high:
            return value
        line = line_of(mapping, key) or mapping.line
        if value is None:
            if default is None:
                self.fail(f"{path}.{key}" if path else key, "required", line)
                return 0
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{path}.{key}" if path else key, f"must be an integer, not {kind(value)}", line)
            return default or 0
        if not low <= value <= high:
            self.fail(f"{path}.{key}" if path else key, f"{value} is outside {low}..{high}", line)
            return default or 0
        return value

    def moment(self, mapping: Marked, key: str, path: str, default: float) -> float:
        value = mapping.get(key)
        if value is None:
            return default
        line = line_of(mapping, key)
        if isinstance(value, str):
            try:
                value = dt.datetime.fromisoformat(value)
            except ValueError:
                self.fail(f"{path}.{key}", f"{value!r} is not an RFC 3339 time like 2020-06-01T00:00:00Z", line)
                return default
        if not isinstance(value, dt.datetime):
            self.fail(f"{path}.{key}", f"must be a time like 2020-06-01T00:00:00Z, not {kind(value)}", line)
            return default
        if value.tzinfo is None:
            self.fail(f"{path}.{key}", "needs a UTC offset, like 2020-06-01T00:00:00Z", line)
            return default
        return value.timestamp()


def _item_problem(item: object, bound: tuple[int, str] | None) -> str:
    """Why ``item`` cannot be one value of a list of strings, or ''."""
    if not isinstance(item, str) or not item:
        return f"must be a non-empty string, not {kind(item)}"
    problem = encoding_problem(item)
    if problem:
        return problem
    if is_blank(item):
        return "only whitespace or invisible characters: no meeting would be told apart by it"
    if bound is not None and len(item) > bound[0]:
        return f"{len(item)} characters, longer than the {bound[0]} a request's {bound[1]} may have: it can never match"
    return ""


def check_header(checker: Checker, document: object) -> Header | None:
    """The snapshot's version, defaults and raw rules; None when it is not a
    mapping at all (the one problem then recorded)."""
    if not isinstance(document, Marked):
        checker.fail("", f"the snapshot must be a mapping with version and rules, not {kind(document)}", None)
        return None
    checker.unknown_keys(document, _TOP_KEYS, "")
    version = checker.integer(document, "version", "", low=0, high=_INT64_MAX, default=None)
    unknown_location = "allow"
    defaults = document.get("defaults")
    if defaults is not None:
        if not isinstance(defaults, Marked):
            checker.fail("defaults", f"must be a mapping, not {kind(defaults)}", line_of(document, "defaults"))
        else:
            checker.unknown_keys(defaults, _DEFAULTS_KEYS, "defaults")
            unknown_location = checker.choice(defaults, "unknown_location", "defaults", ("allow", "deny"), "allow")
    rules = document.get("rules")
    if rules is None:
        checker.fail("rules", "required (a list, which may be empty)", line_of(document, "rules") or document.line)
    elif not isinstance(rules, list | JsonRules):
        checker.fail("rules", f"must be a list, not {kind(rules)}", line_of(document, "rules"))
        rules = None
    elif (count := rules.count if isinstance(rules, JsonRules) else len(rules)) > MAX_RULES:
        limit = (
            f"{count:,} rules, more than the {MAX_RULES:,} a snapshot may hold (memory is sized for that, see README)"
        )
        checker.fail("rules", limit, line_of(document, "rules"))
        rules = None  # not one of them is validated or compiled
    return Header(version, _EFFECTS[unknown_location], rules)


def check_rule(checker: Checker, raw: object, position: int, seen: dict[str, int]) -> RuleSpec | None:
    """The spec of the rule ``raw`` at ``position``, its problems recorded in
    ``checker``; ``seen`` maps the ids met so far to their positions."""
    if not isinstance(raw, Marked):
        checker.fail(f"rules[{position}]", f"must be a mapping, not {kind(raw)}", None)
        return None
    rule_id, path = _rule_id(checker, raw, position, seen)
    checker.unknown_keys(raw, _RULE_KEYS, path)
    effect = checker.choice(raw, "effect", path, _EFFECTS, default=None)
    mode = checker.choice(raw, "mode", path, _MODES, default="enforce")
    jurisdiction = _jurisdiction(checker, raw, path)
    actions = _actions(checker, raw, path)
    selectors = _selectors(checker, raw, path)
    legal_basis = checker.text(raw, "legal_basis", path)
    if effect == "deny" and legal_basis == "":
        checker.fail(
            f"{path}.legal_basis",
            "required for a deny rule: name the order or law it applies",
            line_of(raw, "legal_basis") or raw.line,
        )
    reason = checker.text(raw, "reason", path)
    if mode == "shadow":
        for country in dict.fromkeys(code.partition("-")[0] for code in jurisdiction):
            reach = (f"{path}.mode", line_of(raw, "mode"), len(rule_id.encode()) + 2)
            checker.shadow_reach.setdefault(country, []).append(reach)
    priority = checker.integer(raw, "priority", path, low=-PRIORITY_LIMIT, high=PRIORITY_LIMIT, default=0)
    valid_from = checker.moment(raw, "valid_from", path, -math.inf)
    valid_until = checker.moment(raw, "valid_until", path, math.inf)
    if valid_from >= valid_until:
        checker.fail(f"{path}.valid_until", "must be later than valid_from", line_of(raw, "valid_until"))
    return RuleSpec(
        id=rule_id,
        effect=_EFFECTS.get(effect, Verdict.ALLOW),
        jurisdiction=tuple(dict.fromkeys(jurisdiction)),
        actions=actions,
        meeting_ids=selectors["meeting_ids"],
        host_accounts=selectors["host_accounts"],
        tags=selectors["tags"],
        priority=priority,
        shadow=mode == "shadow",
        legal_basis=legal_basis or "",
        reason=reason or "",
        valid_from=valid_from,
        valid_until=valid_until,
        position=position,
    )


def _rule_id(checker: Checker, raw: Marked, position: int, seen: dict[str, int]) -> tuple[str, str]:
    """The rule's id (checked well-formed and unique) and its path in problems."""
    rule_id = checker.string(raw, "id", f"rules[{position}]", required=True)
    path = f"rules[{position}] ({rule_id})" if rule_id else f"rules[{position}]"
    if raw.get("id") == "":
        checker.fail(f"{path}.id", "must not be empty: use 1-128 letters, digits and . _ : / -", line_of(raw, "id"))
    if rule_id and not _RULE_ID.fullmatch(rule_id):
        checker.fail(
            f"{path}.id",
            "use 1-128 letters, digits and . _ : / - (starting with a letter or digit)",
            line_of(raw, "id"),
        )
    if rule_id in seen:
        checker.fail(f"{path}.id", f"duplicate rule id, first used by rules[{seen[rule_id]}]", line_of(raw, "id"))
    elif rule_id:
        seen[rule_id] = position
    return rule_id, path


def _jurisdiction(checker: Checker, raw: Marked, path: str) -> list[str]:
    jurisdiction = checker.string_list(raw, "jurisdiction", path)
    if raw.get("jurisdiction") in (None, []):
        checker.fail(
            f"{path}.jurisdiction",
            "required: every rule names the countries or subdivisions it applies to (there is no global rule)",
            line_of(raw, "jurisdiction") or raw.line,
        )
    for code in jurisdiction:
        problem = jurisdiction_problem(code)
        if problem:
            checker.fail(f"{path}.jurisdiction", problem, line_of(raw, "jurisdiction"))
    return jurisdiction


def _actions(checker: Checker, raw: Marked, path: str) -> int:
    """The rule's actions as Action bits."""
    actions = 0
    if raw.get("actions") is None:
        action_names = list(_ACTIONS)
    elif raw["actions"] == []:
        action_names = []
        checker.fail(
            f"{path}.actions",
            "must list at least one of: join, host (or be left out for both)",
            line_of(raw, "actions"),
        )
    else:
        action_names = checker.string_list(raw, "actions", path)
    for name in action_names:
        if name not in _ACTIONS:
            checker.fail(f"{path}.actions", f"{name!r} is not one of: join, host", line_of(raw, "actions"))
        else:
            actions |= _ACTIONS[name]
    return actions


def _selectors(checker: Checker, raw: Marked, path: str) -> dict[str, frozenset[str]]:
    """The rule's meeting selectors, an empty set for each one not given."""
    selectors: dict[str, frozenset[str]] = dict.fromkeys(_MEETING_KEYS, _NO_VALUES)
    meetings = raw.get("meetings")
    if meetings is None:
        return selectors
    if not isinstance(meetings, Marked):
        checker.fail(
            f"{path}.meetings",
            f"must be a mapping with any of: {', '.join(_MEETING_KEYS)}, not {kind(meetings)}",
            line_of(raw, "meetings"),
        )
        return selectors
    checker.unknown_keys(meetings, _MEETING_KEYS, f"{path}.meetings")
    for key in _MEETING_KEYS:
        values = checker.string_list(meetings, key, f"{path}.meetings", _SELECTOR_BOUNDS[key])
        selectors[key] = frozenset(values) if values else _NO_VALUES
    return selectors
