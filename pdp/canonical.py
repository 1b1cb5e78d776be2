"""The one JSON text of a snapshot that deltas are computed on and applied to.

A delta carries rules, not text, yet its result must be byte for byte the
snapshot that was published (its SHA-256 is what the signature and the store's
head name). Both sides therefore serialise with one definition::

    {"defaults":{"unknown_location":"allow"},"rules":[{"id":"a",...},...],"version":42}

compact (no spaces), UTF-8 (no ``\\u`` escapes but those JSON requires), the
top-level keys in that order with ``defaults`` always present, every rule's
``id`` first and its other keys sorted, ``meetings`` keys sorted, lists and
rule order as written. ``"id"`` first makes a rule findable in the text by
``{"id":"<id>",``: inside a JSON string a quote is always escaped, so that
sequence can only start a rule. The version comes last so that two versions
share all the text before their first changed rule: the compiler skips shared
text in C (see ``parse_policy``), and a version number at the front would end
the shared beginning at its first byte.

Two files that differ only in formatting, comments or key order give the same
canonical text, hence the same SHA-256.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical_rule", "canonical_snapshot", "dumps", "is_canonical", "rule_needle"]


def dumps(value: object) -> str:
    """Compact JSON, UTF-8 text as is (what every canonical piece is written with)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _ordered_rule(rule: dict[str, Any]) -> dict[str, Any]:
    ordered: dict[str, Any] = {"id": rule["id"]}
    for key in sorted(rule):
        if key != "id":
            value = rule[key]
            ordered[key] = {name: value[name] for name in sorted(value)} if isinstance(value, dict) else value
    return ordered


def canonical_rule(rule: dict[str, Any]) -> str:
    """One rule's canonical text.

    :raises KeyError: the rule has no ``id``.
    """
    return dumps(_ordered_rule(rule))


def _document(parsed: dict[str, Any]) -> str:
    defaults = parsed.get("defaults") or {}
    return (
        f'{{"defaults":{dumps({"unknown_location": defaults.get("unknown_location", "allow")})},'
        f'"rules":[{",".join(canonical_rule(rule) for rule in parsed["rules"])}],'
        f'"version":{int(parsed["version"])}}}'
    )


def canonical_snapshot(data: bytes, source: str = "<snapshot>") -> bytes:
    """The canonical text of a snapshot given in any form (YAML or JSON).

    :raises SnapshotError: the snapshot is invalid (it is fully validated first).
    """
    from pdp.rules import snapshot_as_json  # here: a source applying deltas never loads the rules engine

    return _document(json.loads(snapshot_as_json(data, source))).encode()


def is_canonical(data: bytes) -> bool:
    """True when ``data`` is already a snapshot's canonical text (structure only:
    validity is the parser's business)."""
    try:
        parsed = json.loads(data)
        return isinstance(parsed, dict) and _document(parsed).encode() == data
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def rule_needle(rule_id: str) -> str:
    """The text a rule with this id starts with in a canonical snapshot."""
    return f'{{"id":{dumps(rule_id)},'
