"""The rules engine alone: validation errors and evaluation semantics."""

from __future__ import annotations

import datetime as dt
import json
import textwrap

import pytest

from pdp.model import Action, Location, Meeting, Verdict
from pdp.rules import SnapshotError, parse_policy

from .conftest import ROOT, policy_from

CN = Location("CN", ("CN-22",))
HK = Location("HK")
GB = Location("GB", ("GB-ENG",))
US_WA = Location("US", ("US-WA",))
US_CA = Location("US", ("US-CA",))
MEMORIAL = Meeting("m-1", "host-9", frozenset({"memorial"}))
PLAIN = Meeting("m-2", "host-9")
NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC).timestamp()


def problems(text: str, name: str = "rules.yaml") -> list[str]:
    with pytest.raises(SnapshotError) as caught:
        parse_policy(textwrap.dedent(text).encode(), name)
    return [problem.render(name) for problem in caught.value.problems]


# --------------------------------------------------------------------------- validation


def test_every_problem_is_reported_at_once_with_rule_field_and_line() -> None:
    found = problems(
        """\
        version: 3
        rules:
          - id: a
            effect: deny
            jurisdiction: [XX]
            legal_basis: law
          - id: b
            effect: deny
            jurisdiction: [CN]
            mode: loud
        """
    )
    assert found == [
        "rules.yaml:5: rules[0] (a).jurisdiction: 'XX' is not an ISO 3166-1 alpha-2 country code (like 'CN')",
        "rules.yaml:10: rules[1] (b).mode: 'loud' is not one of: enforce, shadow",
        "rules.yaml:7: rules[1] (b).legal_basis: required for a deny rule: name the order or law it applies",
    ]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("{id: a, effect: deny, legal_basis: x}", "(a).jurisdiction: required"),
        ("{id: a, effect: deny, legal_basis: x, jurisdiction: []}", "(a).jurisdiction: required"),
        ("{id: a, effect: deny, legal_basis: x, jurisdiction: [cn]}", "'cn' must be upper case: 'CN'"),
        ("{id: a, effect: deny, legal_basis: x, jurisdiction: [US-]}", "'US-' is not an ISO 3166-2 subdivision"),
        ("{id: a, effect: deny, legal_basis: x, jurisdiction: [QQ-1]}", "names no ISO 3166-1 country ('QQ')"),
        ("{id: a, effect: deny, legal_basis: x, jurisdiction: [CHN]}", "'CHN' is not an ISO 3166-1 alpha-2"),
        ("{id: a, effect: deny, legal_basis: x, jurisdiction: [1]}", "jurisdiction[0]: must be a non-empty string"),
        ("{id: a, effect: deny, jurisdiction: [CN]}", "(a).legal_basis: required for a deny rule"),
        ("{id: a, effect: deny, jurisdiction: [CN], legal_basis: '  '}", "(a).legal_basis: required"),
        ("{id: a, effect: block, jurisdiction: [CN]}", "(a).effect: 'block' is not one of: deny, allow"),
        ("{id: a, jurisdiction: [CN]}", "(a).effect: required"),
        ("{effect: allow, jurisdiction: [CN]}", "rules[0].id: required"),
        ("{id: 'a b', effect: allow, jurisdiction: [CN]}", "(a b).id: use 1-128 letters"),
        ("{id: a, effect: allow, jurisdiction: [CN], actions: [fly]}", "'fly' is not one of: join, host"),
        ("{id: a, effect: allow, jurisdiction: [CN], actions: []}", "(a).actions: must list at least one"),
        ("{id: a, effect: allow, jurisdiction: [CN], mode: loud}", "(a).mode: 'loud' is not one of"),
        ("{id: a, effect: allow, jurisdiction: [CN], priority: high}", "(a).priority: must be an integer"),
        ("{id: a, effect: allow, jurisdiction: [CN], priority: true}", "must be an integer, not a boolean"),
        ("{id: a, effect: allow, jurisdiction: [CN], priority: 10000000000}", "is outside"),
        ("{id: a, effect: allow, jurisdiction: [CN], colour: red}", "(a).colour: unknown key"),
        ("{id: a, effect: allow, jurisdiction: [CN], meetings: {tagz: [x]}}", "(a).meetings.tagz: unknown key"),
        ("{id: a, effect: allow, jurisdiction: [CN], meetings: [x]}", "(a).meetings: must be a mapping"),
        ("{id: a, effect: allow, jurisdiction: [CN], meetings: {tags: {x: 1}}}", "tags: must be a list"),
        ("{id: a, effect: allow, jurisdiction: [CN], valid_from: 2020-06-01}", "must be a time like"),
        ("{id: a, effect: allow, jurisdiction: [CN], valid_from: '2020-06-01T00:00:00'}", "needs a UTC offset"),
        ("{id: a, effect: allow, jurisdiction: [CN], valid_until: 'soon'}", "is not an RFC 3339 time"),
        (
            "{id: a, effect: allow, jurisdiction: [CN], valid_from: 2020-06-05T00:00:00Z,"
            " valid_until: 2020-06-01T00:00:00Z}",
            "(a).valid_until: must be later than valid_from",
        ),
        ("[not, a, rule]", "rules[0]: must be a mapping"),
    ],
)
def test_each_kind_of_bad_rule_is_named(rule: str, expected: str) -> None:
    found = problems(f"version: 1\nrules:\n  - {rule}\n")
    assert any(expected in line for line in found), found


def test_duplicate_rule_ids_name_the_first_use() -> None:
    found = problems(
        """\
        version: 1
        rules:
          - {id: a, effect: allow, jurisdiction: [CN]}
          - {id: a, effect: allow, jurisdiction: [HK]}
        """
    )
    assert found == ["rules.yaml:4: rules[1] (a).id: duplicate rule id, first used by rules[0]"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules: []", "rules.yaml:1: version: required"),
        ("version: -1\nrules: []", "version: -1 is outside"),
        ("version: '3'\nrules: []", "version: must be an integer, not a string"),
        ("version: 1", "rules: required"),
        ("version: 1\nrules: {}", "rules: must be a list, not a mapping"),
        ("version: 1\nrules: []\nextra: 1", "rules.yaml:3: extra: unknown key"),
        ("version: 1\nrules: []\ndefaults: {unknown_location: maybe}", "'maybe' is not one of: allow, deny"),
        ("version: 1\nversion: 2\nrules: []", "rules.yaml:2: duplicate key 'version'"),
        ("version: 1\nrules: [\n", "invalid YAML"),
        ("- 1\n- 2\n", "must be a mapping with version and rules, not a list"),
        ("", "not null"),
    ],
)
def test_bad_snapshot_structure(text: str, expected: str) -> None:
    found = problems(text)
    assert any(expected in line for line in found), found


def test_json_snapshots_are_validated_the_same_way() -> None:
    document = {"version": 2, "rules": [{"id": "a", "effect": "deny", "jurisdiction": ["CN"]}]}
    found = problems(json.dumps(document), "rules.json")
    assert found == ["rules.json: rules[0] (a).legal_basis: required for a deny rule: name the order or law it applies"]
    assert problems('{"version": 1, "rules": [], "version": 2}', "x.json") == ["x.json: duplicate key 'version'"]
    assert "x.json:2: invalid JSON" in problems('{"version": 1,\n "rules": [', "x.json")[0]


def test_non_utf8_and_bom() -> None:
    with pytest.raises(SnapshotError, match="not UTF-8"):
        parse_policy("version: 1\nrules: []\n".encode("utf-16"), "utf16.yaml")
    policy = parse_policy(b"\xef\xbb\xbfversion: 1\nrules: []\n", "bom.yaml")
    assert policy.version == 1


def test_json_snapshot_with_string_times_compiles() -> None:
    document = {
        "version": 5,
        "defaults": {"unknown_location": "deny"},
        "rules": [
            {
                "id": "a",
                "effect": "deny",
                "jurisdiction": "CN",
                "legal_basis": "law",
                "valid_from": "2026-01-01T00:00:00Z",
                "valid_until": "2027-01-01T00:00:00+00:00",
            }
        ],
    }
    policy = parse_policy(json.dumps(document).encode(), "rules.json")
    assert policy.version == 5
    assert policy.unknown_location == Verdict.DENY
    assert policy.decide(CN, Action.JOIN, PLAIN, NOW).rule_id == "a"


def test_example_rules_are_valid() -> None:
    policy = parse_policy((ROOT / "examples" / "rules.yaml").read_bytes(), "examples/rules.yaml")
    assert {rule.id for rule in policy.rules} >= {"cn-order-2020-17", "cn-enterprise-exception"}


# --------------------------------------------------------------------------- evaluation


def test_rule_only_reaches_its_own_jurisdiction() -> None:
    policy = policy_from("""
        version: 1
        rules:
          - {id: cn, effect: deny, jurisdiction: [CN], legal_basis: order}
        """)
    assert policy.decide(CN, Action.JOIN, PLAIN, NOW).verdict == Verdict.DENY
    for elsewhere in (HK, Location("MO"), Location("TW"), GB, US_WA):
        assert policy.decide(elsewhere, Action.JOIN, PLAIN, NOW).verdict == Verdict.ALLOW


def test_deny_carries_rule_reason_and_legal_basis() -> None:
    policy = policy_from("""
        version: 1
        rules:
          - {id: cn, effect: deny, jurisdiction: [CN], legal_basis: Order 17, reason: not here}
          - {id: hk, effect: deny, jurisdiction: [HK], legal_basis: Law 2}
        """)
    decision = policy.decide(CN, Action.JOIN, PLAIN, NOW)
    assert (decision.verdict, decision.rule_id, decision.reason, decision.legal_basis) == (
        Verdict.DENY,
        "cn",
        "not here",
        "Order 17",
    )
    generated = policy.decide(HK, Action.JOIN, PLAIN, NOW)
    assert generated.reason == "participants located in HK are denied by rule hk"


def test_subdivision_rule_matches_only_that_subdivision() -> None:
    policy = policy_from("""
        version: 1
        rules:
          - {id: wa, effect: deny, jurisdiction: [US-WA], legal_basis: statute}
        """)
    assert policy.decide(US_WA, Action.JOIN, PLAIN, NOW).rule_id == "wa"
    assert policy.decide(US_CA, Action.JOIN, PLAIN, NOW).verdict == Verdict.ALLOW
    assert policy.decide(Location("US"), Action.JOIN, PLAIN, NOW).verdict == Verdict.ALLOW


def test_priority_then_deny_beats_allow() -> None:
    policy = policy_from("""
        version: 1
        rules:
          - {id: deny-100, effect: deny, jurisdiction: [CN], priority: 100, legal_basis: order}
          - {id: allow-100, effect: allow, jurisdiction: [CN], priority: 100}
          - {id: allow-acme, effect: allow, jurisdiction: [CN], priority: 200, meetings: {host_accounts: [acme]}}
        """)
    assert policy.decide(CN, Action.JOIN, PLAIN, NOW).rule_id == "deny-100"
    exception = policy.decide(CN, Action.JOIN, Meeting("m", "acme"), NOW)
    assert (exception.verdict, exception.rule_id) == (Verdict.ALLOW, "allow-acme")


def test_meeting_selectors_are_anded_across_fields_and_ored_within() -> None:
    policy = policy_from("""
        version: 1
        rules:
          - id: r
            effect: deny
            jurisdiction: [CN]
            legal_basis: order
            meetings: {tags: [memorial, vigil], host_accounts: [h1, h2]}
        """)
    assert policy.decide(CN, Action.JOIN, Meeting("m", "h2", frozenset({"vigil", "x"})), NOW).rule_id == "r"
    assert policy.decide(CN, Action.JOIN, Meeting("m", "h3", frozenset({"vigil"})), NOW).rule_id == ""
    assert policy.decide(CN, Action.JOIN, Meeting("m", "h1", frozenset({"other"})), NOW).rule_id == ""
    by_id = policy_from("""
        version: 1
        rules:
          - {id: r, effect: deny, jurisdiction: [CN], legal_basis: order, meetings: {meeting_ids: [m-7]}}
        """)
    assert by_id.decide(CN, Action.JOIN, Meeting("m-7"), NOW).rule_id == "r"
    assert by_id.decide(CN, Action.JOIN, Meeting("m-8"), NOW).rule_id == ""


def test_actions_limit_a_rule() -> None:
    policy = policy_from("""
        version: 1
        rules:
          - {id: host-only, effect: deny, jurisdiction: [CN], actions: [host], legal_basis: order}
        """)
    assert policy.decide(CN, Action.HOST, PLAIN, NOW).rule_id == "host-only"
    assert policy.decide(CN, Action.JOIN, PLAIN, NOW).verdict == Verdict.ALLOW


def test_validity_window_is_half_open() -> None:
    policy = policy_from("""
        version: 1
        rules:
          - id: window
            effect: deny
            jurisdiction: [CN]
            legal_basis: order
            valid_from: 2020-06-01T00:00:00Z
            valid_until: 2020-06-05T00:00:00Z
        """)
    start = dt.datetime(2020, 6, 1, tzinfo=dt.UTC).timestamp()
    end = dt.datetime(2020, 6, 5, tzinfo=dt.UTC).timestamp()
    assert policy.decide(CN, Action.JOIN, PLAIN, start - 1).verdict == Verdict.ALLOW
    assert policy.decide(CN, Action.JOIN, PLAIN, start).verdict == Verdict.DENY
    assert policy.decide(CN, Action.JOIN, PLAIN, end - 1).verdict == Verdict.DENY
    assert policy.decide(CN, Action.JOIN, PLAIN, end).verdict == Verdict.ALLOW


def test_shadow_rules_are_reported_never_enforced() -> None:
    policy = policy_from("""
        version: 1
        rules:
          - {id: s2, effect: deny, jurisdiction: [CN, CN-JL], mode: shadow, legal_basis: draft}
          - {id: s1, effect: allow, jurisdiction: [CN], mode: shadow, priority: 999}
          - {id: real, effect: deny, jurisdiction: [CN], legal_basis: order, meetings: {tags: [memorial]}}
        """)
    plain = policy.decide(CN, Action.JOIN, PLAIN, NOW)
    assert (plain.verdict, plain.rule_id, plain.shadow_rule_ids) == (Verdict.ALLOW, "", ("s2", "s1"))
    memorial = policy.decide(CN, Action.JOIN, MEMORIAL, NOW)
    assert (memorial.verdict, memorial.rule_id, memorial.shadow_rule_ids) == (Verdict.DENY, "real", ("s2", "s1"))
    assert policy.decide(HK, Action.JOIN, PLAIN, NOW).shadow_rule_ids == ()


@pytest.mark.parametrize("default", ["allow", "deny"])
def test_unknown_location_takes_the_policy_default(default: str) -> None:
    policy = policy_from(f"""
        version: 1
        defaults: {{unknown_location: {default}}}
        rules:
          - {{id: cn, effect: deny, jurisdiction: [CN], legal_basis: order}}
        """)
    decision = policy.decide(Location(), Action.JOIN, PLAIN, NOW)
    assert decision.verdict == Verdict[default.upper()]
    assert decision.rule_id == ""
    assert "location unknown" in decision.reason


def test_no_rule_means_allow() -> None:
    policy = policy_from("version: 1\nrules: []\n")
    assert policy.decide(CN, Action.JOIN, MEMORIAL, NOW).verdict == Verdict.ALLOW


def test_explain_agrees_with_decide_and_says_why() -> None:
    policy = policy_from("""
        version: 1
        rules:
          - {id: deny-tag, effect: deny, jurisdiction: [CN], legal_basis: order, meetings: {tags: [memorial]}}
          - {id: deny-host, effect: deny, jurisdiction: [CN], legal_basis: order, actions: [host]}
          - {id: low, effect: deny, jurisdiction: [CN], legal_basis: order, priority: -5}
          - {id: hk, effect: deny, jurisdiction: [HK], legal_basis: order}
        """)
    traces = {trace.rule.id: trace.outcome for trace in policy.explain(CN, Action.JOIN, MEMORIAL, NOW)}
    assert traces == {
        "deny-tag": "decided",
        "deny-host": "action join not in the rule's actions",
        "low": "matched, outranked",
    }
    assert policy.decide(CN, Action.JOIN, MEMORIAL, NOW).rule_id == "deny-tag"


def test_snapshot_as_json_keeps_the_policy() -> None:
    from pdp.rules import snapshot_as_json

    source = (ROOT / "examples" / "rules.yaml").read_bytes()
    converted = snapshot_as_json(source, "examples/rules.yaml")
    original, again = parse_policy(source, "a.yaml"), parse_policy(converted, "a.json")
    assert [dataclass_fields(rule) for rule in original.rules] == [dataclass_fields(rule) for rule in again.rules]
    assert json.loads(converted)["version"] == original.version


def dataclass_fields(rule: object) -> tuple[object, ...]:
    import dataclasses

    return tuple(getattr(rule, field.name) for field in dataclasses.fields(rule))  # type: ignore[arg-type]


def _numbered_rules(count: int) -> list[dict[str, object]]:
    codes = ["CN", "HK", "MO", "US", "GB"]
    return [
        {"id": f"r{n}", "effect": "deny", "jurisdiction": [codes[n % 5]], "legal_basis": f"Order {n}"}
        for n in range(count)
    ]


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda rules: rules[5].update(id="r12"), id="a changed rule takes an unchanged rule's id"),
        pytest.param(lambda rules: rules.append(dict(rules[3])), id="an added rule repeats an unchanged one"),
        pytest.param(lambda rules: rules[5].update(effect="block"), id="a changed rule is invalid"),
        pytest.param(lambda rules: rules[5].pop("legal_basis"), id="a changed deny rule lost its legal basis"),
    ],
)
def test_recompiling_json_reports_exactly_what_a_full_read_does(edit: object) -> None:
    first = {"version": 1, "rules": _numbered_rules(20)}
    previous = parse_policy(json.dumps(first).encode(), "first.json")
    rules = _numbered_rules(20)
    edit(rules)  # type: ignore[operator]
    encoded = json.dumps({"version": 2, "rules": rules}).encode()
    with pytest.raises(SnapshotError) as recompiled:
        parse_policy(encoded, "second.json", previous=previous)
    with pytest.raises(SnapshotError) as fresh:
        parse_policy(encoded, "second.json")
    assert recompiled.value.problems == fresh.value.problems


def test_recompiling_json_reuses_the_unchanged_rules() -> None:
    first = {"version": 1, "rules": _numbered_rules(20)}
    previous = parse_policy(json.dumps(first).encode(), "first.json")
    rules = _numbered_rules(20)
    rules[7]["legal_basis"] = "Order 7, amended"
    policy = parse_policy(json.dumps({"version": 2, "rules": rules}).encode(), "second.json", previous=previous)
    reused = [new is old for new, old in zip(policy.rules, previous.rules, strict=True)]
    assert reused == [position != 7 for position in range(20)]
    assert policy.by_id["r7"].legal_basis == "Order 7, amended"
    assert policy.decide(Location("US"), Action.JOIN, Meeting("m"), 0.0).legal_basis == "Order 3"
