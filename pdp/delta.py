"""Snapshot deltas: what changed between two published versions, signed, and applied as text.

A delta is a JSON document (compact, in a signed envelope when the publisher
signs; see :mod:`pdp.signing`)::

    {"pdp_delta": 1,
     "base_version": 41, "base_sha256": "<hex>",     # the snapshot it applies to
     "version": 42, "sha256": "<hex>",               # the snapshot it makes
     "defaults": {"unknown_location": "deny"},       # only when they changed
     "removed": ["rule-7"],                          # ids
     "changed": [{"id": "rule-9", ...}],             # same id, same place, new content
     "added": [["rule-3", {"id": "rule-3b", ...}]],  # [id of the rule before it (null: first), rule]
     "snapshot_signature": {"key_id": "...", "signature": "<base64>"}}   # when signed

Both snapshots are canonical text (:mod:`pdp.canonical`). :func:`apply_delta`
splices the base text: it finds only the rules the delta names, so applying a
one-rule change to 10,000 rules is a few searches and one join in C. A rule
that moved is removed and added again. The result must hash to ``sha256``;
``snapshot_signature`` is the published snapshot's own signature over that
result, so :func:`result_snapshot` rebuilds the exact envelope that was
published, which the sidecar verifies, validates and persists like any full
snapshot.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pdp.canonical import canonical_rule, dumps, is_canonical, rule_needle
from pdp.signing import DELTA, SignatureError, TrustedKeys, envelope, is_envelope, open_envelope, sign

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["Delta", "DeltaError", "apply_delta", "encode_delta", "make_delta", "open_delta", "result_snapshot"]

FORMAT = 1
_DEFAULTS = '{"defaults":'
_RULES = ',"rules":['
_VERSION = re.compile(r'\],"version":\d+\}')
_SCANNER = json.JSONDecoder()


class DeltaError(ValueError):
    """A delta that is malformed, does not fit the base it names, or whose result hashes wrong."""


@dataclass(frozen=True, slots=True)
class Delta:
    base_version: int
    base_sha256: str
    version: int
    sha256: str
    removed: tuple[str, ...] = ()
    changed: tuple[dict[str, Any], ...] = ()
    added: tuple[tuple[str | None, dict[str, Any]], ...] = ()
    defaults: dict[str, Any] | None = None
    # The published snapshot's signature over the result: (key id, raw signature).
    snapshot_signature: tuple[str, bytes] | None = field(default=None)

    def to_json(self) -> bytes:
        import base64

        document: dict[str, Any] = {
            "pdp_delta": FORMAT,
            "base_version": self.base_version,
            "base_sha256": self.base_sha256,
            "version": self.version,
            "sha256": self.sha256,
        }
        if self.defaults is not None:
            document["defaults"] = self.defaults
        document |= {"removed": list(self.removed), "changed": list(self.changed), "added": list(self.added)}
        if self.snapshot_signature is not None:
            kid, signature = self.snapshot_signature
            document["snapshot_signature"] = {"key_id": kid, "signature": base64.b64encode(signature).decode()}
        return dumps(document).encode()

    @property
    def rule_count(self) -> int:
        return len(self.removed) + len(self.changed) + len(self.added)


# --------------------------------------------------------------------------- publishing side


def make_delta(base: bytes, result: bytes, *, snapshot_signature: tuple[str, bytes] | None = None) -> Delta | None:
    """The delta that turns canonical snapshot ``base`` into canonical ``result``;
    None when either is not canonical text or ``result`` is not a later version."""
    if not (is_canonical(base) and is_canonical(result)):
        return None
    old, new = json.loads(base), json.loads(result)
    if new["version"] <= old["version"]:
        return None
    old_rules = {rule["id"]: rule for rule in old["rules"]}
    old_positions = {rule["id"]: index for index, rule in enumerate(old["rules"])}
    new_ids = [rule["id"] for rule in new["rules"]]
    kept_positions = _kept_in_order([old_positions[rule_id] for rule_id in new_ids if rule_id in old_positions])
    kept = {old["rules"][position]["id"] for position in kept_positions}
    changed = tuple(
        rule
        for rule in new["rules"]
        if rule["id"] in kept and canonical_rule(rule) != canonical_rule(old_rules[rule["id"]])
    )
    delta = Delta(
        old["version"],
        hashlib.sha256(base).hexdigest(),
        new["version"],
        hashlib.sha256(result).hexdigest(),
        removed=tuple(rule_id for rule_id in old_rules if rule_id not in kept),
        changed=changed,
        added=tuple(
            (new_ids[index - 1] if index else None, rule)
            for index, rule in enumerate(new["rules"])
            if rule["id"] not in kept
        ),
        defaults=new["defaults"] if new["defaults"] != old["defaults"] else None,
        snapshot_signature=snapshot_signature,
    )
    if apply_delta(base, delta) != result:  # pragma: no cover - a bug here must never reach a sidecar
        raise AssertionError("a computed delta does not reproduce its result")
    return delta


def _kept_in_order(positions: Sequence[int]) -> list[int]:
    """The longest increasing subsequence of ``positions`` (old positions of the
    rules both snapshots hold, in the new order): those stay where they are,
    every other rule is removed and added again. O(n log n)."""
    tail_values: list[int] = []  # smallest last value of an increasing run of each length
    tail_indexes: list[int] = []
    parents = [-1] * len(positions)
    for index, position in enumerate(positions):
        k = bisect.bisect_left(tail_values, position)
        if k:
            parents[index] = tail_indexes[k - 1]
        if k == len(tail_values):
            tail_values.append(position)
            tail_indexes.append(index)
        else:
            tail_values[k], tail_indexes[k] = position, index
    run: list[int] = []
    index = tail_indexes[-1] if tail_indexes else -1
    while index >= 0:
        run.append(positions[index])
        index = parents[index]
    return run[::-1]


def encode_delta(delta: Delta, private_key: Ed25519PrivateKey | None) -> bytes:
    """The bytes a store keeps: the delta's JSON, in a signed envelope when a key is given."""
    data = delta.to_json()
    return sign(data, delta.version, private_key, kind=DELTA) if private_key is not None else data


# --------------------------------------------------------------------------- following side


def open_delta(data: bytes, keys: TrustedKeys) -> Delta:
    """A delta as stored, verified when keys are trusted (an unsigned one is then refused).

    :raises SignatureError: unsigned with keys trusted, unknown key, bad signature, malformed envelope.
    :raises DeltaError: malformed delta, or the envelope's version is not the delta's.
    """
    if keys:
        opened = keys.open(data, kind=DELTA)
    elif is_envelope(data, kind=DELTA):
        opened = open_envelope(data, kind=DELTA)
    else:
        return _parse(data)
    delta = _parse(opened.payload)
    if delta.version != opened.version:
        raise DeltaError(f"envelope says version {opened.version}, the delta inside says {delta.version}")
    return delta


def _parse(data: bytes) -> Delta:
    import base64
    import binascii

    try:
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("pdp_delta") != FORMAT:
            raise DeltaError("not a pdp delta (format 1)")
        numbers = [raw["base_version"], raw["version"]]
        digests = [raw["base_sha256"], raw["sha256"]]
        if any(isinstance(n, bool) or not isinstance(n, int) for n in numbers) or not all(
            isinstance(d, str) and len(d) == 64 for d in digests
        ):
            raise DeltaError("versions must be integers and digests 64 hex digits")
        removed, changed, added = raw["removed"], raw["changed"], raw["added"]
        if not (
            all(isinstance(r, str) for r in removed)
            and all(isinstance(r, dict) and isinstance(r.get("id"), str) for r in changed)
        ):
            raise DeltaError("removed must list ids and changed rules with an id")
        pairs = tuple((anchor, rule) for anchor, rule in added)
        if not all(
            (a is None or isinstance(a, str)) and isinstance(r, dict) and isinstance(r.get("id"), str) for a, r in pairs
        ):
            raise DeltaError("added must list [id before or null, rule with an id]")
        defaults = raw.get("defaults")
        if defaults is not None and not isinstance(defaults, dict):
            raise DeltaError("defaults must be a mapping")
        signature = raw.get("snapshot_signature")
        snapshot_signature = (
            (str(signature["key_id"]), base64.b64decode(signature["signature"], validate=True)) if signature else None
        )
    except (ValueError, KeyError, TypeError, binascii.Error) as error:
        if isinstance(error, DeltaError):
            raise
        raise DeltaError(f"malformed delta ({error.__class__.__name__}: {error})") from None
    return Delta(
        numbers[0],
        digests[0],
        numbers[1],
        digests[1],
        tuple(removed),
        tuple(changed),
        pairs,
        defaults,
        snapshot_signature,
    )


def apply_delta(base: bytes, delta: Delta, base_sha256: str = "") -> bytes:
    """The canonical text ``delta`` makes of ``base``, checked against its announced SHA-256.

    :raises DeltaError: ``base`` is not the delta's base (digest), not canonical
        text, lacks a rule the delta names, or the result hashes otherwise.
    """
    if (base_sha256 or hashlib.sha256(base).hexdigest()) != delta.base_sha256:
        raise DeltaError(f"applies to a base with SHA-256 {delta.base_sha256[:12]}..., not the active snapshot")
    text = base.decode("utf-8")
    end = text.rfind('],"version":')
    if end < 0 or not _VERSION.fullmatch(text, end) or not text.startswith(_DEFAULTS):
        raise DeltaError("the active snapshot is not canonical JSON")
    try:
        defaults_end = _SCANNER.raw_decode(text, len(_DEFAULTS))[1]
    except ValueError:
        raise DeltaError("the active snapshot is not canonical JSON") from None
    if not text.startswith(_RULES, defaults_end):
        raise DeltaError("the active snapshot is not canonical JSON")
    body = _splice(text, defaults_end + len(_RULES), end, delta)
    defaults = dumps(delta.defaults) if delta.defaults is not None else text[len(_DEFAULTS) : defaults_end]
    result = f'{_DEFAULTS}{defaults}{_RULES}{body}],"version":{delta.version}}}'.encode()
    if hashlib.sha256(result).hexdigest() != delta.sha256:
        raise DeltaError(f"the result does not hash to the announced SHA-256 {delta.sha256[:12]}...")
    return result


def _runs(delta: Delta, base_ids: set[str]) -> dict[str | None, list[str]]:
    """Added rules grouped by the base rule they follow (None: the start), in order."""
    runs: dict[str | None, list[str]] = {}
    current: list[str] | None = None
    previous = ""
    removed = set(delta.removed)
    for anchor, rule in delta.added:
        if current is not None and anchor == previous:
            current.append(canonical_rule(rule))
        elif anchor is None or (anchor in base_ids and anchor not in removed):
            current = runs.setdefault(anchor, [])
            current.append(canonical_rule(rule))
        else:
            raise DeltaError(f"added rule {rule['id']!r} follows {anchor!r}, which the result does not hold")
        previous = rule["id"]
    return runs


def _splice(text: str, start: int, end: int, delta: Delta) -> str:
    """The rules array's inner text with the delta applied, from the base's ``text[start:end]``."""
    changed = {rule["id"]: canonical_rule(rule) for rule in delta.changed}
    removed = set(delta.removed)
    wanted = removed | changed.keys() | {anchor for anchor, _ in delta.added if anchor is not None}
    spans: list[tuple[int, int, str]] = []
    for rule_id in wanted:
        at = text.find(rule_needle(rule_id), start, end)
        if at < 0:
            if rule_id in changed or rule_id in removed:
                raise DeltaError(f"rule {rule_id!r} is not in the active snapshot")
            continue  # an anchor that is itself added: _runs checks it
        try:
            close = _SCANNER.raw_decode(text, at)[1]
        except ValueError:
            raise DeltaError(f"rule {rule_id!r} is not canonical JSON in the active snapshot") from None
        if text[close] not in ",]":
            raise DeltaError("the active snapshot is not canonical JSON")
        spans.append((at, close, rule_id))
    runs = _runs(delta, {rule_id for _, _, rule_id in spans})
    pieces: list[str] = list(runs.get(None, ()))
    cursor = start
    for at, close, rule_id in sorted(spans):
        if at > cursor:
            pieces.append(text[cursor : at - 1])  # the untouched rules before, without the comma
        if rule_id in changed:
            pieces.append(changed[rule_id])
        elif rule_id not in removed:
            pieces.append(text[at:close])
        pieces.extend(runs.get(rule_id, ()))
        cursor = close + 1
    if cursor < end:
        pieces.append(text[cursor:end])
    return ",".join(pieces)


def result_snapshot(result: bytes, delta: Delta) -> bytes:
    """The snapshot as published: ``result`` in the envelope the publisher signed, or
    ``result`` itself when it was published unsigned."""
    if delta.snapshot_signature is None:
        return result
    kid, signature = delta.snapshot_signature
    return envelope(kid, delta.version, result, signature)


def describe(error: Exception) -> str:
    """Why a delta was not used, for status and logs."""
    kind = "signature" if isinstance(error, SignatureError) else "delta"
    return f"{kind}: {error}"
