"""Canonical text and the incremental compile: with the version after the rules, a recompile
against the active policy must still equal a fresh compile, for any edit and any corruption."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.rules import Policy, SnapshotError, parse_policy

from .fleet_data import canonical, initial, mutate


def outcome(text: bytes, previous: Policy | None) -> object:
    try:
        policy = parse_policy(text, "next.json", previous=previous)
    except SnapshotError as error:
        return ("rejected", str(error))
    rules = [tuple(getattr(rule, f.name) for f in dataclasses.fields(rule)) for rule in policy.rules]
    return policy.version, policy.unknown_location, rules, policy.sha256


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 30),
    st.randoms(use_true_random=False),
    st.integers(1, 6),
    st.sampled_from([1, 1, 9, 10, 99, 1000]),  # some versions grow a digit: the tail after the rules grows
    st.data(),
)
def test_recompiling_canonical_text_equals_a_fresh_compile(
    count: int, rng: random.Random, edits: int, jump: int, data: st.DataObject
) -> None:
    before = initial(count, seed=rng.randrange(100), version=rng.choice([1, 9, 99]))
    after: dict[str, Any] = dict(mutate(before, rng, edits), version=before["version"] + jump)
    old, new = canonical(before), canonical(after)
    if data.draw(st.booleans()):  # cut or corrupt the new text anywhere, the end included
        cut = data.draw(st.integers(0, len(new)))
        splice = data.draw(st.sampled_from([b"", b",", b"}", b"]", b'"', b"{", b" ", b"x", b'],"version":5}']))
        new = new[:cut] + splice + new[cut + 1 :]
    previous = parse_policy(old, "old.json")
    assert outcome(new, previous) == outcome(new, None)


def test_a_one_rule_change_is_read_in_a_few_steps_not_rule_by_rule() -> None:
    """The compile skips the text both versions share on both sides of the changed rule, the
    version after the rules notwithstanding. ``pace`` is called every 128 rules the reader
    walks: counting its calls shows how much was walked, without timing anything."""
    before = initial(4000)
    after = json.loads(json.dumps(before))
    after["version"] = 2
    after["rules"][2000]["priority"] = 999
    previous = parse_policy(canonical(before), "old.json")
    steps: list[None] = []
    policy = parse_policy(canonical(after), "new.json", previous=previous, pace=lambda: steps.append(None))
    reused = [new is old for new, old in zip(policy.rules, previous.rules, strict=True)]
    assert reused.count(False) == 1
    assert len(steps) <= 6, f"{len(steps)} slices: the reader walked about {128 * len(steps)} rules"
