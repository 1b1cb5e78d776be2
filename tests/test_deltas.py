"""Deltas on their own: canonical text, computing, signing, applying, and every way to refuse one."""

from __future__ import annotations

import base64
import dataclasses
import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.canonical import canonical_snapshot, is_canonical
from pdp.delta import Delta, DeltaError, apply_delta, encode_delta, make_delta, open_delta, result_snapshot
from pdp.rules import parse_policy
from pdp.signing import DELTA, SignatureError, TrustedKeys, generate_keypair, load_private_key, sign

from .fleet_data import canonical, initial, mutate, seeded

YAML = b"""
version: 3
rules:
  - effect: deny        # keys in any order, comments, flow style
    id: cn
    legal_basis: Order 1
    jurisdiction: [CN]
    meetings: {tags: [memorial], meeting_ids: [m-1]}
defaults: {unknown_location: deny}
"""
JSON = (
    b'{"rules": [{"jurisdiction": ["CN"], "id": "cn", "meetings": {"meeting_ids": ["m-1"], "tags": ["memorial"]},'
    b' "effect": "deny", "legal_basis": "Order 1"}], "defaults": {"unknown_location": "deny"}, "version": 3}'
)


@pytest.fixture
def key_pair(tmp_path: Path) -> tuple[Path, Path]:
    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    return tmp_path / "k.key", tmp_path / "k.pub"


def test_canonical_text_is_one_text_whatever_the_form() -> None:
    expected = (
        b'{"defaults":{"unknown_location":"deny"},"rules":[{"id":"cn","effect":"deny","jurisdiction":["CN"],'
        b'"legal_basis":"Order 1","meetings":{"meeting_ids":["m-1"],"tags":["memorial"]}}],"version":3}'
    )
    assert canonical_snapshot(YAML, "a.yaml") == canonical_snapshot(JSON, "a.json") == expected
    assert is_canonical(expected)
    assert not is_canonical(JSON)
    assert parse_policy(expected, "c.json").by_id["cn"].legal_basis == "Order 1"
    # Defaults are always written out, so that a changed default is a change of one field.
    assert canonical_snapshot(b"version: 1\nrules: []\n", "e.yaml") == (
        b'{"defaults":{"unknown_location":"allow"},"rules":[],"version":1}'
    )


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40), st.randoms(use_true_random=False), st.integers(1, 12))
def test_a_delta_reproduces_its_result_byte_for_byte(count: int, rng: random.Random, edits: int) -> None:
    before = initial(count, seed=rng.randrange(1000))
    after = mutate(before, rng, edits)
    base, result = canonical(before), canonical(after)
    delta = make_delta(base, result)
    assert delta is not None
    decoded = open_delta(encode_delta(delta, None), TrustedKeys())
    assert apply_delta(base, decoded) == result
    assert decoded.sha256 == delta.sha256
    assert decoded.base_version == before["version"]


def test_a_one_rule_change_of_many_carries_one_rule() -> None:
    before = initial(2000)
    after = json.loads(json.dumps(before))
    after["version"] += 1
    after["rules"][1234]["priority"] = 999
    base, result = canonical(before), canonical(after)
    delta = make_delta(base, result)
    assert delta is not None
    assert (delta.removed, len(delta.changed), delta.added, delta.defaults) == ((), 1, (), None)
    assert len(encode_delta(delta, None)) < 600 < len(result) // 100


def test_moves_are_a_removal_and_an_addition_and_order_is_kept() -> None:
    before = initial(6)
    after = json.loads(json.dumps(before))
    after["version"] = 2
    after["rules"].insert(0, after["rules"].pop(4))  # r-4 moves to the front
    after["rules"][3]["priority"] = 777
    delta = make_delta(canonical(before), canonical(after))
    assert delta is not None
    assert delta.removed == ("r-4",)
    assert [rule["id"] for _, rule in delta.added] == ["r-4"]
    assert delta.added[0][0] is None  # first in the result
    assert [rule["id"] for rule in delta.changed] == ["r-2"]
    assert apply_delta(canonical(before), delta) == canonical(after)


def test_no_delta_for_non_canonical_text_or_a_later_base() -> None:
    base = canonical(initial(3))
    assert make_delta(YAML, base) is None
    assert make_delta(base, base) is None  # same version: nothing to apply
    assert make_delta(canonical(initial(3, version=5)), base) is None


def test_applying_refuses_what_does_not_fit() -> None:
    before, after = initial(5), mutate(initial(5), seeded(3), 4)
    base, result = canonical(before), canonical(after)
    delta = make_delta(base, result)
    assert delta is not None
    other_base = canonical(mutate(before, seeded(9), 1))
    with pytest.raises(DeltaError, match="applies to a base"):
        apply_delta(other_base, delta)
    with pytest.raises(DeltaError, match="does not hash"):
        apply_delta(base, dataclasses.replace(delta, sha256="0" * 64))
    with pytest.raises(DeltaError, match="not in the active snapshot"):
        apply_delta(base, dataclasses.replace(delta, removed=("no-such-rule",)))
    with pytest.raises(DeltaError, match="the result does not hold"):
        apply_delta(base, dataclasses.replace(delta, added=(("no-such-rule", {"id": "x"}),)))
    pretty = json.dumps(json.loads(base), indent=1).encode()
    with pytest.raises(DeltaError, match="not canonical"):
        apply_delta(pretty, delta, delta.base_sha256)


def test_signed_deltas_verify_and_cannot_pass_for_snapshots(tmp_path: Path, key_pair: tuple[Path, Path]) -> None:
    private, public = key_pair
    key, trusted = load_private_key(private), TrustedKeys.from_files([public])
    base, result = canonical(initial(4)), canonical(mutate(initial(4), seeded(1)))
    delta = make_delta(base, result)
    assert delta is not None
    signed = encode_delta(delta, key)
    assert open_delta(signed, trusted) == delta
    with pytest.raises(SignatureError, match="only signed deltas"):
        open_delta(encode_delta(delta, None), trusted)
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    with pytest.raises(SignatureError, match="unknown key"):
        open_delta(encode_delta(delta, load_private_key(tmp_path / "other.key")), trusted)
    envelope = json.loads(signed)
    envelope["payload"] = base64.b64encode(dataclasses.replace(delta, version=99).to_json()).decode()
    with pytest.raises(SignatureError, match="bad signature"):
        open_delta(json.dumps(envelope).encode(), trusted)
    # Domain separation: a signed delta is no snapshot, a signed snapshot no delta.
    with pytest.raises(SignatureError, match="not signed"):
        trusted.open(signed)
    with pytest.raises(SignatureError, match="not signed"):
        open_delta(sign(result, 2, key), trusted)
    # Same bytes, other kind: the signature does not carry over either.
    as_snapshot = json.loads(sign(delta.to_json(), delta.version, key))
    swapped = {"pdp_signed_delta": as_snapshot.pop("pdp_signed_snapshot"), **as_snapshot}
    with pytest.raises(SignatureError, match="bad signature"):
        open_delta(json.dumps(swapped).encode(), trusted)
    with pytest.raises(DeltaError, match="envelope says version"):
        open_delta(sign(delta.to_json(), 77, key, kind=DELTA), trusted)


def test_envelopes_are_the_json_they_always_were(key_pair: tuple[Path, Path]) -> None:
    """sign() writes its envelope directly now; byte for byte what json.dumps wrote before."""
    key = load_private_key(key_pair[0])
    for payload in (b"", b"version: 1\nrules: []\n", bytes(range(256)) * 50):
        for kind in ("snapshot", DELTA):
            signed = sign(payload, 9, key, kind=kind)
            assert signed == (json.dumps(json.loads(signed), indent=1) + "\n").encode()
            assert next(iter(json.loads(signed))) == f"pdp_signed_{kind}"


def test_the_result_is_the_published_envelope_exactly(key_pair: tuple[Path, Path]) -> None:
    private, public = key_pair
    key = load_private_key(private)
    base, result = canonical(initial(4)), canonical(mutate(initial(4), seeded(2)))
    published = sign(result, 2, key)
    envelope = json.loads(published)
    signature = (envelope["key_id"], base64.b64decode(envelope["signature"]))
    delta = make_delta(base, result, snapshot_signature=signature)
    assert delta is not None
    decoded = open_delta(encode_delta(delta, key), TrustedKeys.from_files([public]))
    rebuilt = result_snapshot(apply_delta(base, decoded), decoded)
    assert rebuilt == published
    assert TrustedKeys.from_files([public]).open(rebuilt).payload == result


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"[]", "not a pdp delta"),
        (b'{"pdp_delta": 2}', "not a pdp delta"),
        (b'{"pdp_delta": 1, "base_version": 1}', "malformed delta"),
        (
            b'{"pdp_delta":1,"base_version":true,"version":2,"base_sha256":"' + b"a" * 64 + b'","sha256":"'
            + b"b" * 64 + b'","removed":[],"changed":[],"added":[]}',
            "versions must be integers",
        ),
        (
            b'{"pdp_delta":1,"base_version":1,"version":2,"base_sha256":"' + b"a" * 64 + b'","sha256":"'
            + b"b" * 64 + b'","removed":[3],"changed":[],"added":[]}',
            "removed must list ids",
        ),
        (
            b'{"pdp_delta":1,"base_version":1,"version":2,"base_sha256":"' + b"a" * 64 + b'","sha256":"'
            + b"b" * 64 + b'","removed":[],"changed":[],"added":[[null,{"no":"id"}]]}',
            "added must list",
        ),
        (b"\xff\xfe", "malformed delta"),
    ],
)  # fmt: skip
def test_malformed_deltas_are_refused_with_a_reason(document: bytes, message: str) -> None:
    with pytest.raises(DeltaError, match=message):
        open_delta(document, TrustedKeys())


def test_delta_round_trips_through_json() -> None:
    delta = Delta(
        1, "a" * 64, 2, "b" * 64, ("x",), ({"id": "y"},), ((None, {"id": "z"}),), {"unknown_location": "deny"}
    )
    assert open_delta(delta.to_json(), TrustedKeys()) == delta
