"""``pdp snapshot diff``: what a new snapshot changes, and whom it newly reaches.

Both sides are complete, validated snapshots (:class:`pdp.rules.Policy`), so the
diff compares rules as pdp enforces them, not as text: a re-ordered YAML key or
a changed comment is no change; a widened jurisdiction, action, selector or
window is, and is spelled out as what the rule now reaches that it did not.
Rules are matched by id. Pure: no I/O (the command lives in
:mod:`pdp.diff_command`).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pdp.model import Action, Verdict
from pdp.rules import Policy, Rule

__all__ = ["FieldChange", "PolicyDiff", "RuleChange", "diff_policies"]

_ACTION_NAMES = {int(Action.JOIN): "join", int(Action.HOST): "host"}
_SELECTORS = ("meeting_ids", "host_accounts", "tags")


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One field of one rule, before and after, with what it now reaches and no longer reaches."""

    field: str
    before: Any
    after: Any
    reaches: tuple[str, ...] = ()  # what the rule now covers that it did not
    stops_reaching: tuple[str, ...] = ()  # what it covered and no longer does


@dataclass(frozen=True, slots=True)
class RuleChange:
    """A rule present on both sides whose enforced meaning differs."""

    rule_id: str
    jurisdictions: tuple[str, ...]  # of either side: every code the change touches
    fields: tuple[FieldChange, ...]


@dataclass(frozen=True, slots=True)
class PolicyDiff:
    """Everything that differs between two snapshots."""

    old_version: int
    new_version: int
    defaults: tuple[FieldChange, ...] = ()
    added: tuple[Rule, ...] = ()
    removed: tuple[Rule, ...] = ()
    changed: tuple[RuleChange, ...] = ()
    jurisdictions: tuple[str, ...] = field(default=())  # touched by any change, sorted

    @property
    def rules_equal(self) -> bool:
        """True when the rules and defaults are the same, whatever the versions."""
        return not (self.defaults or self.added or self.removed or self.changed)

    @property
    def equal(self) -> bool:
        return self.rules_equal and self.old_version == self.new_version


def diff_policies(old: Policy, new: Policy) -> PolicyDiff:
    """Compare two compiled snapshots rule by rule (matched by id)."""
    added = tuple(rule for rule in new.rules if rule.id not in old.by_id)
    removed = tuple(rule for rule in old.rules if rule.id not in new.by_id)
    changed = []
    for rule in new.rules:
        before = old.by_id.get(rule.id)
        if before is not None and (fields := _rule_fields(before, rule)):
            touched = tuple(sorted(set(before.jurisdiction) | set(rule.jurisdiction)))
            changed.append(RuleChange(rule.id, touched, fields))
    defaults: tuple[FieldChange, ...] = ()
    if old.unknown_location != new.unknown_location:
        unlocated = ("participants with no located country",)
        denies = new.unknown_location == Verdict.DENY
        was, now = _verdict(old.unknown_location), _verdict(new.unknown_location)
        defaults = (FieldChange("unknown_location", was, now, unlocated * denies, unlocated * (not denies)),)
    codes = {code for rule in added + removed for code in rule.jurisdiction}
    codes.update(code for change in changed for code in change.jurisdictions)
    return PolicyDiff(old.version, new.version, defaults, added, removed, tuple(changed), tuple(sorted(codes)))


def _rule_fields(before: Rule, after: Rule) -> tuple[FieldChange, ...]:
    changes: list[FieldChange] = []
    if before.effect != after.effect:
        changes.append(FieldChange("effect", _verdict(before.effect), _verdict(after.effect)))
    if before.shadow != after.shadow:
        mode = {True: "shadow", False: "enforce"}
        enforced = ("enforcement: its matches now change answers",)
        changes.append(
            FieldChange("mode", mode[before.shadow], mode[after.shadow],
                        reaches=enforced if before.shadow else (), stops_reaching=() if before.shadow else enforced)
        )  # fmt: skip
    if before.jurisdiction != after.jurisdiction:
        old_codes, new_codes = set(before.jurisdiction), set(after.jurisdiction)
        changes.append(
            FieldChange("jurisdiction", list(before.jurisdiction), list(after.jurisdiction),
                        tuple(sorted(new_codes - old_codes)), tuple(sorted(old_codes - new_codes)))
        )  # fmt: skip
    if before.actions != after.actions:
        old_actions, new_actions = _actions(before.actions), _actions(after.actions)
        changes.append(
            FieldChange("actions", old_actions, new_actions,
                        tuple(a for a in new_actions if a not in old_actions),
                        tuple(a for a in old_actions if a not in new_actions))
        )  # fmt: skip
    for name in _SELECTORS:
        old_values, new_values = getattr(before, name), getattr(after, name)
        if old_values != new_values:
            changes.append(_selector_change(name, old_values, new_values))
    if (before.valid_from, before.valid_until) != (after.valid_from, after.valid_until):
        changes.append(_window_change(before, after))
    if before.priority != after.priority:
        changes.append(FieldChange("priority", before.priority, after.priority))
    for name in ("legal_basis", "reason"):
        if getattr(before, name) != getattr(after, name):
            changes.append(FieldChange(name, getattr(before, name), getattr(after, name)))
    return tuple(changes)


def _selector_change(name: str, before: frozenset[str], after: frozenset[str]) -> FieldChange:
    """An empty selector means every meeting, so emptying one widens the rule the most."""
    kind = name.removesuffix("s").replace("_", " ")
    if not after:
        return FieldChange(name, sorted(before), [], reaches=(f"every meeting (no {kind} selector)",))
    if not before:
        return FieldChange(name, [], sorted(after), stops_reaching=(f"meetings without a selected {kind}",))
    return FieldChange(
        name, sorted(before), sorted(after),
        tuple(f"{kind} {value}" for value in sorted(after - before)),
        tuple(f"{kind} {value}" for value in sorted(before - after)),
    )  # fmt: skip


def _window_change(before: Rule, after: Rule) -> FieldChange:
    gained = _subtract((after.valid_from, after.valid_until), (before.valid_from, before.valid_until))
    lost = _subtract((before.valid_from, before.valid_until), (after.valid_from, after.valid_until))
    return FieldChange(
        "window",
        _window_text(before.valid_from, before.valid_until),
        _window_text(after.valid_from, after.valid_until),
        tuple(_window_text(*part) for part in gained),
        tuple(_window_text(*part) for part in lost),
    )


def _subtract(window: tuple[float, float], minus: tuple[float, float]) -> list[tuple[float, float]]:
    """The parts of half-open ``window`` outside half-open ``minus``."""
    start, end = window
    parts = []
    if start < min(end, minus[0]):
        parts.append((start, min(end, minus[0])))
    if max(start, minus[1]) < end:
        parts.append((max(start, minus[1]), end))
    return parts


def moment_text(seconds: float) -> str:
    """RFC 3339 in UTC to the second, or "open" for an unbounded end."""
    if math.isinf(seconds):
        return "open"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _window_text(start: float, end: float) -> str:
    if math.isinf(start) and math.isinf(end):
        return "always"
    return f"{moment_text(start)} .. {moment_text(end)}"


def _actions(bits: int) -> list[str]:
    return [name for value, name in _ACTION_NAMES.items() if bits & value]


def _verdict(verdict: Verdict) -> str:
    return verdict.name.lower()


def rule_summary(rule: Rule) -> dict[str, Any]:
    """A rule as the rules format spells it, for reports of added and removed rules."""
    summary: dict[str, Any] = {
        "id": rule.id,
        "effect": _verdict(rule.effect),
        "mode": "shadow" if rule.shadow else "enforce",
        "jurisdiction": list(rule.jurisdiction),
        "actions": _actions(rule.actions),
        "priority": rule.priority,
    }
    for name in _SELECTORS:
        if values := getattr(rule, name):
            summary[name] = sorted(values)
    if not (math.isinf(rule.valid_from) and math.isinf(rule.valid_until)):
        summary["window"] = _window_text(rule.valid_from, rule.valid_until)
    if rule.legal_basis:
        summary["legal_basis"] = rule.legal_basis
    return summary


def as_json(diff: PolicyDiff) -> dict[str, Any]:
    """The diff as plain data for ``--json``."""

    def field_json(change: FieldChange) -> dict[str, Any]:
        return {
            "field": change.field,
            "before": change.before,
            "after": change.after,
            "reaches": list(change.reaches),
            "stops_reaching": list(change.stops_reaching),
        }

    return {
        "equal": diff.equal,
        "rules_equal": diff.rules_equal,
        "old_version": diff.old_version,
        "new_version": diff.new_version,
        "defaults": [field_json(change) for change in diff.defaults],
        "added": [rule_summary(rule) for rule in diff.added],
        "removed": [rule_summary(rule) for rule in diff.removed],
        "changed": [
            {"id": c.rule_id, "jurisdictions": list(c.jurisdictions), "fields": [field_json(f) for f in c.fields]}
            for c in diff.changed
        ],
        "jurisdictions": list(diff.jurisdictions),
    }


def text_lines(diff: PolicyDiff, old_name: str, new_name: str) -> list[str]:
    """The diff for people: one block per change, reach spelled out."""
    lines = [f"snapshot diff: version {diff.old_version} ({old_name}) -> version {diff.new_version} ({new_name})"]
    if diff.rules_equal:
        lines.append("rules and defaults are identical" + ("" if diff.equal else "; only the version differs"))
        return lines
    for change in diff.defaults:
        lines.append(f"defaults  {change.field}: {change.before} -> {change.after}")
        lines.extend(_reach_lines(change, "          "))
    for rule in diff.added:
        lines.append(f"+ added    {_rule_line(rule)}")
    for rule in diff.removed:
        lines.append(f"- removed  {_rule_line(rule)}")
    for rule_change in diff.changed:
        lines.append(f"~ changed  {rule_change.rule_id}  (jurisdiction {', '.join(rule_change.jurisdictions)})")
        for change in rule_change.fields:
            lines.append(f"    {change.field:<13} {_value(change.before)} -> {_value(change.after)}")
            lines.extend(_reach_lines(change, "      "))
    lines.append(f"jurisdictions touched: {', '.join(diff.jurisdictions) or 'none'}")
    counts = (len(diff.added), len(diff.removed), len(diff.changed))
    lines.append("{} added, {} removed, {} changed".format(*counts))
    return lines


def _reach_lines(change: FieldChange, indent: str) -> Iterable[str]:
    if change.reaches:
        yield f"{indent}now reaches: {', '.join(change.reaches)}"
    if change.stops_reaching:
        yield f"{indent}no longer reaches: {', '.join(change.stops_reaching)}"


def _rule_line(rule: Rule) -> str:
    summary = rule_summary(rule)
    parts = [f"{summary['effect']}", summary["mode"], f"jurisdiction {', '.join(rule.jurisdiction)}"]
    parts.append(f"actions {', '.join(summary['actions'])}")
    parts.extend(f"{name} {', '.join(summary[name])}" for name in _SELECTORS if name in summary)
    if "window" in summary:
        parts.append(f"window {summary['window']}")
    return f"{rule.id}  ({'; '.join(parts)})"


def _value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]" if value else "(every meeting)"
    return str(value)
