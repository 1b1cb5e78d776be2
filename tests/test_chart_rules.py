"""snapshot.inlineRules: the chart renders exactly the snapshots pdp accepts.

Every example goes through the real Helm engine (values.schema.json, then the chart's own
checks) and through pdp's validator; they must agree. What the chart renders, pdp must
accept, compiled to the same rules; what pdp accepts, the chart must render, except for
the few cases `chart_is_stricter` names (each a looseness of pdp's, not of the chart's).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import re
import textwrap
from typing import Any

import helm_python as helm
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdp.rules import Policy, SnapshotError, parse_policy

from .conftest import CN_MEMORIAL, ROOT
from .test_hardening import SNAPSHOTS

CHART = ROOT / "helm" / "pdp"
BASE_VALUES: dict[str, Any] = {
    "mode": "example",
    "geoip": {
        "source": "geoipupdate",
        "geoipupdate": {"accountId": "1", "licenseKeySecret": {"name": "maxmind", "key": "license-key"}},
    },
}
FULL_RULE: dict[str, Any] = {
    "id": "full",
    "effect": "deny",
    "jurisdiction": ["US-WA", "CN"],
    "actions": ["join", "host"],
    "meetings": {"tags": ["memorial"], "meeting_ids": ["m-1"], "host_accounts": ["acme"]},
    "priority": 100,
    "mode": "shadow",
    "legal_basis": "Order 17/2020",
    "reason": "shown to the participant",
    "valid_from": "2020-06-01T00:00:00Z",
    "valid_until": "2020-06-05T00:00:00+02:00",
}


def snapshot(*rules: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"version": 1, "rules": list(rules), **top}


def with_rule(**changes: Any) -> dict[str, Any]:
    """The full rule with keys changed (a value of ``...`` removes the key)."""
    rule = {**copy.deepcopy(FULL_RULE), **changes}
    return snapshot({key: value for key, value in rule.items() if value is not ...})


VALID = {
    "examples/rules.yaml": yaml.safe_load((ROOT / "examples" / "rules.yaml").read_text()),
    "ci/example-values.yaml": yaml.safe_load((CHART / "ci" / "example-values.yaml").read_text())["snapshot"][
        "inlineRules"
    ],
    "CN_MEMORIAL": yaml.safe_load(textwrap.dedent(CN_MEMORIAL)),
    "every key": snapshot(FULL_RULE, defaults={"unknown_location": "deny"}),
    "single strings for lists": with_rule(jurisdiction="HK", actions="host", meetings={"tags": "vigil"}),
    "nulls for optional keys": with_rule(priority=None, mode=None, reason=None, valid_from=None, actions=None),
    "empty selector lists": with_rule(meetings={"tags": [], "meeting_ids": None}),
    "a window without a start": with_rule(valid_from=...),
    "no rules": snapshot(),
    "version 0 and empty defaults": {"version": 0, "defaults": {}, "rules": []},
    "the largest version Helm keeps": {"version": 2**53 - 1, "rules": []},
    "a withdrawn code GeoIP data still returns": with_rule(jurisdiction=["GR-01", "XK"]),
}
INVALID = {
    "unassigned subdivision": with_rule(jurisdiction=["US-WS"]),
    "subdivision GeoIP locates as a country": with_rule(jurisdiction=["CN-TW"]),
    "UK for GB": with_rule(jurisdiction=["UK"]),
    "lower case code": with_rule(jurisdiction=["cn"]),
    "Norway unquoted in YAML (a boolean)": with_rule(jurisdiction=[False]),
    "global jurisdiction": with_rule(jurisdiction=["*"]),
    "empty jurisdiction": with_rule(jurisdiction=[]),
    "no jurisdiction": with_rule(jurisdiction=...),
    "empty code": with_rule(jurisdiction=[""]),
    "duplicate ids": snapshot(FULL_RULE, {**FULL_RULE, "mode": "enforce"}),
    "bad id": with_rule(id="-x"),
    "long id": with_rule(id="x" * 129),
    "numeric id": with_rule(id=5),
    "no id": with_rule(id=...),
    "unknown effect": with_rule(effect="block"),
    "no effect": with_rule(effect=...),
    "unknown mode": with_rule(mode="audit"),
    "unknown action": with_rule(actions=["leave"]),
    "empty actions": with_rule(actions=[]),
    "unknown key": with_rule(colour="blue"),
    "unknown meetings key": with_rule(meetings={"rooms": ["a"]}),
    "meetings a list": with_rule(meetings=["memorial"]),
    "empty tag": with_rule(meetings={"tags": [""]}),
    "numeric tag": with_rule(meetings={"tags": [5]}),
    "priority too high": with_rule(priority=10**9 + 1),
    "priority a float": with_rule(priority=1.5),
    "priority a string": with_rule(priority="high"),
    "deny without legal basis": with_rule(legal_basis=...),
    "deny with a blank legal basis": with_rule(legal_basis="  "),
    "legal basis a number": with_rule(legal_basis=17),
    "reason a list": with_rule(reason=["a"]),
    "inverted window": with_rule(valid_from="2020-06-05T00:00:00Z", valid_until="2020-06-01T00:00:00Z"),
    "empty window": with_rule(valid_from="2020-06-01T00:00:00Z", valid_until="2020-06-01T00:00:00Z"),
    "window inverted by the offset": with_rule(
        valid_from="2020-06-01T01:00:00Z", valid_until="2020-06-01T02:00:00+02:00"
    ),
    "no such month": with_rule(valid_until="2020-13-01T00:00:00Z"),
    "naive time": with_rule(valid_from="2020-06-01T00:00:00"),
    "not a time": with_rule(valid_from="tomorrow"),
    "time a number": with_rule(valid_from=1591000000),
    "negative version": {"version": -1, "rules": []},
    "float version": {"version": 1.5, "rules": []},
    "string version": {"version": "1", "rules": []},
    "boolean version": {"version": True, "rules": []},
    "no version": {"rules": []},
    "no rules": {"version": 1},
    "rules a mapping": {"version": 1, "rules": {"a": 1}},
    "rules of strings": {"version": 1, "rules": ["a"]},
    "unknown top key": {"version": 1, "rules": [], "extra": 1},
    "unknown default": {"version": 1, "rules": [], "defaults": {"unknown_location": "block"}},
    "unknown defaults key": {"version": 1, "rules": [], "defaults": {"colour": "blue"}},
    "defaults a list": {"version": 1, "rules": [], "defaults": ["allow"]},
}


def helm_form(value: Any) -> Any:
    """The document as Helm holds values: YAML timestamps read as strings (go-yaml keeps them so)."""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, dict):
        return {str(key): helm_form(item) for key, item in value.items()}
    if isinstance(value, list):
        return [helm_form(item) for item in value]
    return value


def pdp_accepts(document: Any) -> Policy | None:
    try:
        return parse_policy(json.dumps(document).encode(), "inline.json")
    except SnapshotError:
        return None


def chart_renders(document: Any) -> bytes | None:
    """The rules.yaml the chart renders for ``document``, or None when the render is refused."""
    values = {**BASE_VALUES, "snapshot": {"inlineRules": document}}
    try:
        manifests = helm.Chart.load(CHART).render(values, name="meet", namespace="meet")
    except (helm.errors.HelmValuesError, helm.errors.HelmRenderError):
        return None
    for name, text in manifests.items():
        if name.endswith("NOTES.txt"):
            continue
        for manifest in yaml.safe_load_all(text):
            if manifest and manifest["kind"] == "ConfigMap" and manifest["metadata"]["name"].endswith("-rules"):
                return str(manifest["data"]["rules.yaml"]).encode()
    raise AssertionError("rendered without a rules ConfigMap")


def chart_is_stricter(document: Any) -> str | None:
    """Why the chart may refuse what pdp accepts: pdp's loose ends, named so that each is known."""
    if not isinstance(document, dict):
        return None
    if isinstance(document.get("version"), int) and document["version"] > 2**53 - 1:
        return "Helm rounds integers above 2^53 (float64), so the chart refuses such versions"
    for rule in document.get("rules") or []:
        if not isinstance(rule, dict):
            continue
        if rule.get("effect") == "deny" and rule.get("legal_basis", "") is None:
            return "pdp accepts a deny rule whose legal_basis is null (its denials then carry no legal basis)"
        if rule.get("id") == "":
            return "pdp accepts an empty rule id (its denials then print as '(no rule)')"
        if rule.get("effect") == "":
            return "pdp reads an empty effect as allow"
        for key in ("valid_from", "valid_until"):
            if isinstance(rule.get(key), str) and not _rfc3339(rule[key]):
                return f"pdp's {key} also takes ISO 8601 forms that are not RFC 3339 ({rule[key]!r})"
    return None


def _rfc3339(text: str) -> bool:
    return re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", text) is not None


def _rules(policy: Policy) -> list[tuple[Any, ...]]:
    return [
        (r.id, r.effect, r.jurisdiction, r.actions, r.tags, r.meeting_ids, r.host_accounts, r.priority, r.shadow,
         r.legal_basis, r.reason, r.valid_from, r.valid_until)
        for r in policy.rules
    ]  # fmt: skip


def assert_agree(document: Any) -> None:
    document = helm_form(document)
    accepted = pdp_accepts(document)
    rendered = chart_renders(document)
    if rendered is not None:
        served = parse_policy(rendered, "rules.yaml")  # what the pod will read; raises if pdp refuses it
        assert accepted is not None, "the chart rendered a snapshot pdp refuses"
        assert _rules(served) == _rules(accepted), "the rendered snapshot compiles to other rules"
        assert (served.version, served.unknown_location) == (accepted.version, accepted.unknown_location)
    elif accepted is not None:
        assert chart_is_stricter(document), "pdp accepts a snapshot the chart refuses"


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_examples_render_and_compile_to_the_same_rules(name: str) -> None:
    document = helm_form(VALID[name])
    assert pdp_accepts(document) is not None
    assert chart_renders(document) is not None
    assert_agree(document)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_examples_stop_the_render(name: str) -> None:
    document = helm_form(INVALID[name])
    assert pdp_accepts(document) is None, "the example must be invalid for pdp"
    assert chart_renders(document) is None


def _corpus() -> list[tuple[str, Any]]:
    """The hardening corpus's snapshots that are YAML mappings (the rest cannot be Helm values)."""
    documents = []
    for name, data, _ in SNAPSHOTS:
        if len(data) > 10_000:
            continue  # the nesting and size bombs: refused before any YAML is built
        try:
            document = yaml.safe_load(data)
        except (yaml.YAMLError, ValueError):
            continue
        if isinstance(document, dict):
            documents.append((name, document))
    return documents


CORPUS = _corpus()


@pytest.mark.parametrize(("name", "document"), CORPUS, ids=[name for name, _ in CORPUS])
def test_the_hardening_corpus_agrees(name: str, document: Any) -> None:
    assert_agree(document)


MUTATIONS = st.sampled_from(
    [None, "", " ", "x", "CN", "US-WS", "deny", "allow", "shadow", "join", 0, 1, -5, 10**10, 1.5, math.pi, True,
     [], [""], ["CN"], ["join", "leave"], ["memorial"], {}, {"tags": ["a"]}, {"tags": "a"}, {"x": 1},
     "2020-06-01T00:00:00Z", "2031-01-01T00:00:00+01:00", "2020-06-01", "2020-06-01 00:00:00+00:00", ...]
)  # fmt: skip


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from([*FULL_RULE, "defaults", "version", "extra"]), value=MUTATIONS, second=MUTATIONS)
def test_mutated_rules_agree(key: str, value: Any, second: Any) -> None:
    document = with_rule()
    if key in ("defaults", "version", "extra"):
        document[key] = {"unknown_location": second} if key == "defaults" and value is None else value
        if document[key] is ...:
            del document[key]
    else:
        changes = {key: value}
        if key == "valid_until":
            changes["valid_from"] = second
        document = with_rule(**changes)
    assert_agree(document)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (with_rule(jurisdiction=["US-WS"]), 'snapshot.inlineRules.rules[0] (full).jurisdiction: "US-WS" is not a code'),
        (snapshot(FULL_RULE, FULL_RULE), "snapshot.inlineRules.rules[1] (full).id: duplicate rule id, first used by"),
        (with_rule(valid_until="2020-01-01T00:00:00Z"), "rules[0] (full).valid_until: must be later than valid_from"),
        (with_rule(legal_basis=" "), "at '/snapshot/inlineRules/rules/0/legal_basis'"),
        (with_rule(effect="block"), "at '/snapshot/inlineRules/rules/0/effect'"),
        ("version: 1\nrules: []\n", "at '/snapshot/inlineRules': got string, want object"),
    ],
)
def test_a_refused_render_says_where(document: Any, expected: str) -> None:
    values = {**BASE_VALUES, "snapshot": {"inlineRules": document}}
    with pytest.raises((helm.errors.HelmValuesError, helm.errors.HelmRenderError)) as refused:
        helm.Chart.load(CHART).render(values, name="meet", namespace="meet")
    assert expected in str(refused.value)
