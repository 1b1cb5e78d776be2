"""Property tests over random rule sets, locations and meetings."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.model import Action, Location, Meeting, Verdict
from pdp.rules import Policy, Rule, parse_policy
from pdp.rules.text import MAX_SHADOW_ID_BYTES

CODES = ["CN", "HK", "MO", "TW", "US", "US-WA", "US-CA", "GB", "GB-ENG"]
LOCATIONS = [
    Location("CN", ("CN-22",)),
    Location("HK"),
    Location("MO"),
    Location("TW"),
    Location("US", ("US-WA",)),
    Location("US", ("US-CA",)),
    Location("US"),
    Location("GB", ("GB-ENG",)),
    Location("DE"),
    Location(),
]
TAGS = ["memorial", "vigil", "town-hall"]
ACCOUNTS = ["acme", "globex", ""]
MEETINGS = ["m-1", "m-2"]
T0 = 1_750_000_000

small_list = st.lists(st.sampled_from(TAGS), max_size=2, unique=True)


@st.composite
def rule_documents(draw: st.DrawFn, position: int) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "id": f"r{position}",
        "effect": draw(st.sampled_from(["deny", "allow"])),
        "jurisdiction": draw(st.lists(st.sampled_from(CODES), min_size=1, max_size=3, unique=True)),
        "priority": draw(st.integers(-3, 3)),
        "mode": draw(st.sampled_from(["enforce", "enforce", "shadow"])),
        "legal_basis": "basis",
    }
    if draw(st.booleans()):
        rule["actions"] = draw(st.lists(st.sampled_from(["join", "host"]), min_size=1, max_size=2, unique=True))
    meetings: dict[str, list[str]] = {}
    if draw(st.booleans()):
        meetings["tags"] = draw(st.lists(st.sampled_from(TAGS), min_size=1, max_size=2, unique=True))
    if draw(st.integers(0, 3)) == 0:
        meetings["host_accounts"] = draw(st.lists(st.sampled_from(ACCOUNTS[:2]), min_size=1, max_size=2, unique=True))
    if draw(st.integers(0, 3)) == 0:
        meetings["meeting_ids"] = draw(st.lists(st.sampled_from(MEETINGS), min_size=1, max_size=2, unique=True))
    if meetings:
        rule["meetings"] = meetings
    if draw(st.integers(0, 3)) == 0:
        start = T0 + draw(st.integers(-100, 100))
        rule["valid_from"] = f"{_iso(start)}"
        rule["valid_until"] = f"{_iso(start + draw(st.integers(1, 100)))}"
    return rule


def _iso(seconds: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat()


def within_shadow_bound(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rules, with shadow rules past the bound of one country enforced instead
    (a snapshot with more is refused; see pdp.rules.text)."""
    reach: dict[str, int] = {}
    bounded = []
    for rule in rules:
        countries = {code.partition("-")[0] for code in rule["jurisdiction"]}
        if rule["mode"] == "shadow":
            size = len(rule["id"]) + 2
            if any(reach.get(country, 0) + size > MAX_SHADOW_ID_BYTES for country in countries):
                rule = dict(rule, mode="enforce")
            else:
                for country in countries:
                    reach[country] = reach.get(country, 0) + size
        bounded.append(rule)
    return bounded


@st.composite
def snapshots(draw: st.DrawFn, max_rules: int = 12) -> dict[str, Any]:
    count = draw(st.integers(0, max_rules))
    return {
        "version": draw(st.integers(0, 10)),
        "defaults": {"unknown_location": draw(st.sampled_from(["allow", "deny"]))},
        "rules": within_shadow_bound([draw(rule_documents(position)) for position in range(count)]),
    }


meetings = st.builds(
    Meeting,
    st.sampled_from(MEETINGS),
    st.sampled_from(ACCOUNTS),
    small_list.map(frozenset),
)
moments = st.integers(T0 - 150, T0 + 250).map(float)
actions = st.sampled_from([Action.JOIN, Action.HOST])


def compile_document(document: dict[str, Any]) -> Policy:
    return parse_policy(json.dumps(document).encode(), "generated.json")


def reference_decision(policy: Policy, location: Location, action: int, meeting: Meeting, now: float) -> Rule | None:
    """The semantics spelled out naively: every rule checked, best one chosen by sorting."""
    matching = [
        rule
        for rule in policy.rules
        if not rule.shadow
        and set(rule.jurisdiction) & set(location.codes)
        and rule.why_not(action, meeting, now) is None
    ]
    matching.sort(key=lambda rule: (-rule.priority, rule.effect != Verdict.DENY, rule.position))
    return matching[0] if matching else None


@settings(max_examples=300, deadline=None)
@given(snapshots(), st.sampled_from(LOCATIONS), actions, meetings, moments)
def test_decide_equals_the_naive_reference(
    document: dict[str, Any], location: Location, action: Action, meeting: Meeting, now: float
) -> None:
    policy = compile_document(document)
    decision = policy.decide(location, action, meeting, now)
    if not location.found:
        assert decision.verdict == policy.unknown_location
        assert decision.rule_id == ""
        return
    expected = reference_decision(policy, location, action, meeting, now)
    assert decision.rule_id == (expected.id if expected else "")
    assert decision.verdict == (expected.effect if expected else Verdict.ALLOW)
    shadows = [
        rule.id
        for rule in policy.rules
        if rule.shadow and set(rule.jurisdiction) & set(location.codes) and rule.applies(action, meeting, now)
    ]
    assert list(decision.shadow_rule_ids) == shadows


@settings(max_examples=300, deadline=None)
@given(snapshots(), st.sampled_from(LOCATIONS), actions, meetings, moments)
def test_nobody_outside_every_deny_jurisdiction_is_denied(
    document: dict[str, Any], location: Location, action: Action, meeting: Meeting, now: float
) -> None:
    policy = compile_document(document)
    deny_codes = {code for rule in policy.rules if rule.effect == Verdict.DENY for code in rule.jurisdiction}
    if location.found and deny_codes.isdisjoint(location.codes):
        assert policy.decide(location, action, meeting, now).verdict == Verdict.ALLOW


@settings(max_examples=200, deadline=None)
@given(snapshots(), st.sampled_from(LOCATIONS), actions, meetings, moments, st.randoms(use_true_random=False))
def test_verdict_is_deterministic_and_independent_of_rule_order(
    document: dict[str, Any], location: Location, action: Action, meeting: Meeting, now: float, rng: Any
) -> None:
    policy = compile_document(document)
    first = policy.decide(location, action, meeting, now)
    assert policy.decide(location, action, meeting, now) == first
    shuffled = dict(document, rules=list(document["rules"]))
    rng.shuffle(shuffled["rules"])
    again = compile_document(shuffled).decide(location, action, meeting, now)
    assert again.verdict == first.verdict
    assert set(again.shadow_rule_ids) == set(first.shadow_rule_ids)


@settings(max_examples=200, deadline=None)
@given(snapshots(), st.sampled_from(LOCATIONS), actions, meetings, moments)
def test_explain_agrees_with_decide(
    document: dict[str, Any], location: Location, action: Action, meeting: Meeting, now: float
) -> None:
    policy = compile_document(document)
    decision = policy.decide(location, action, meeting, now)
    decided = [t.rule.id for t in policy.explain(location, action, meeting, now) if t.outcome == "decided"]
    assert decided == ([decision.rule_id] if decision.rule_id else [])


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
        max_leaves=30,
    )
)
def test_arbitrary_documents_are_accepted_or_rejected_cleanly(document: Any) -> None:
    from pdp.rules import SnapshotError

    reasons: tuple[object, ...] = ("accepted",)
    try:
        compile_document(document)
    except SnapshotError as error:
        reasons = error.problems
    assert reasons  # accepted, or rejected with at least one reason; never another exception


@settings(max_examples=200, deadline=None)
@given(snapshots(max_rules=40), st.data(), st.sampled_from(LOCATIONS), actions, meetings, moments)
def test_recompiling_against_the_active_policy_equals_a_fresh_compile(
    first: dict[str, Any], data: st.DataObject, location: Location, action: Action, meeting: Meeting, now: float
) -> None:
    # The next snapshot keeps some rules, changes or drops others, adds new ones.
    rules = list(first["rules"])
    change: bool = data.draw(st.booleans())
    drop: bool = data.draw(st.booleans())
    if rules and change:
        rules[data.draw(st.integers(0, len(rules) - 1))] = data.draw(rule_documents(len(rules) + 100))
    if rules and drop:
        del rules[data.draw(st.integers(0, len(rules) - 1))]
    rules.append(data.draw(rule_documents(len(rules) + 200)))
    rules = within_shadow_bound([dict(rule, id=f"r{n}") for n, rule in enumerate(rules)])
    second = dict(first, version=first["version"] + 1, rules=rules)
    indent = data.draw(st.sampled_from([None, None, 2]))  # a reformatted file shares no rule text
    previous = compile_document(first)
    encoded = json.dumps(second, indent=indent).encode()
    incremental = parse_policy(encoded, "second.json", previous=previous)
    fresh = parse_policy(encoded, "second.json")
    assert [_fields(rule) for rule in incremental.rules] == [_fields(rule) for rule in fresh.rules]
    assert _index_shape(incremental) == _index_shape(fresh)
    assert incremental.decide(location, action, meeting, now) == fresh.decide(location, action, meeting, now)


def _index_shape(policy: Policy) -> dict[str, list[list[list[str]]]]:
    """Every candidate list of the decision index, by code, as rule ids."""
    shape = {}
    for code, buckets in policy.index.items():
        lists: list[list[list[str]]] = []
        for bucket in buckets:
            if bucket is None:
                lists.append([])
                continue
            parts = [bucket.everyone, *(bucket.by_meeting[k] for k in sorted(bucket.by_meeting))]
            parts += [bucket.by_host[k] for k in sorted(bucket.by_host)]
            parts += [bucket.by_tag[k] for k in sorted(bucket.by_tag)]
            lists.append([[rule.id for rule in part] for part in parts])
        shape[code] = lists
    return shape


@settings(max_examples=500, deadline=None)
@given(snapshots(max_rules=6), snapshots(max_rules=6), st.sampled_from([None, 1]), st.booleans(), st.data())
def test_the_stepwise_json_reader_agrees_with_json_loads(
    before: dict[str, Any], document: dict[str, Any], indent: int | None, share: bool, data: st.DataObject
) -> None:
    """The reader that walks JSON snapshots rule by rule, skipping the rules
    the previous snapshot's text shares, either returns exactly what json.loads
    returns or declines (and the full parser reports): never a different
    document, even for text that was cut or corrupted."""
    from pdp.rules.document import DuplicateKeyError, json_object
    from pdp.rules.jsondiff import JsonRules, split_json

    if share:  # the next snapshot shares its first or its last rules with the previous one, as usual
        kept = data.draw(st.integers(0, len(before["rules"])))
        if data.draw(st.booleans()):
            document = dict(document, rules=before["rules"][:kept] + document["rules"][kept:])
        else:
            document = dict(document, rules=document["rules"][:kept] + before["rules"][kept:])
    base_text = json.dumps(before, indent=data.draw(st.sampled_from([None, 1])))
    base_rules = split_json(base_text, None, lambda: None)
    assert base_rules is not None
    base = base_rules["rules"].memory()
    text = json.dumps(document, indent=indent)
    cut = data.draw(st.integers(0, len(text)))
    corrupt: bool = data.draw(st.booleans())
    if corrupt:
        splice = data.draw(st.sampled_from(["", ",", "}", "]", '"', "{", " ", "x", '"id": 1,']))
        text = text[:cut] + splice + text[cut + 1 :]
    try:
        expected = json.loads(text, object_pairs_hook=json_object)
    except Exception:  # every way json.loads can refuse this text
        expected = None
    split = split_json(text, base, lambda: None)
    if split is None:
        assert corrupt  # a well-formed snapshot always takes the stepwise path
        return  # declined: the full parser decides (and rejects when it should)
    rules = split.get("rules")
    if expected is None:
        # Only a key repeated inside a rule is left to be found when that rule is compiled.
        assert isinstance(rules, JsonRules)
        with pytest.raises(DuplicateKeyError):
            _parse_each(rules)
        return
    if isinstance(rules, JsonRules):
        changed = set(rules.changed)
        resolved = [rules.parse(n) if n in changed else json.loads(base.rule_text(n)) for n in range(rules.count)]
        assert resolved == expected["rules"]
        own = rules.memory()
        assert [json.loads(own.rule_text(n)) for n in range(rules.count)] == expected["rules"]
        split["rules"] = resolved
    assert split == expected


def _parse_each(rules: Any) -> None:
    for position in rules.changed:
        rules.parse(position)


def _fields(rule: Rule) -> tuple[object, ...]:
    import dataclasses

    return tuple(getattr(rule, field.name) for field in dataclasses.fields(rule))
