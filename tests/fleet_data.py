"""Snapshots that change between publications the way real ones do: rules added,
removed, edited and moved, defaults flipped. Shared by the delta and fleet tests."""

from __future__ import annotations

import json
import random
from typing import Any

from pdp.canonical import canonical_snapshot

COUNTRIES = ["CN", "RU", "IR", "KP", "SY", "CU", "BY", "VE", "US-CA", "US-WA", "DE", "FR", "GB", "JP", "KR"]
TAGS = ["memorial", "protest", "election", "religion", "press", "union"]


def seeded(seed: int) -> random.Random:
    """Reproducible test data, not secrets."""
    return random.Random(seed)  # noqa: S311


def make_rule(rng: random.Random, rule_id: str) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "id": rule_id,
        "effect": "allow" if rng.random() < 0.15 else "deny",
        "jurisdiction": rng.sample(COUNTRIES, rng.randint(1, 2)),
        "priority": rng.randint(0, 500),
    }
    if rule["effect"] == "deny":
        rule["legal_basis"] = f'Order {rng.randint(1, 99)}/{rng.randint(2015, 2026)} — «ü» "quoted"'
    if rng.random() < 0.7:
        rule["meetings"] = {"tags": rng.sample(TAGS, rng.randint(1, 2))}
    if rng.random() < 0.1:
        rule["mode"] = "shadow"
    if rng.random() < 0.1:
        rule["valid_from"] = "2020-06-01T00:00:00Z"
    return rule


def initial(count: int, seed: int = 7, version: int = 1) -> dict[str, Any]:
    rng = seeded(seed)
    return {
        "version": version,
        "defaults": {"unknown_location": "allow"},
        "rules": [make_rule(rng, f"r-{n}") for n in range(count)],
    }


def mutate(document: dict[str, Any], rng: random.Random, edits: int = 3) -> dict[str, Any]:
    """The next publication: version + 1 and ``edits`` random changes."""
    rules = [dict(rule) for rule in document["rules"]]
    for edit in range(edits):
        roll = rng.random()
        if roll < 0.25 and len(rules) > 1:
            rules.pop(rng.randrange(len(rules)))
        elif roll < 0.5:
            rules.insert(rng.randrange(len(rules) + 1), make_rule(rng, f"n-{document['version']}-{edit}"))
        elif roll < 0.8 and rules:
            index = rng.randrange(len(rules))
            rules[index] = dict(rules[index], priority=rng.randint(501, 900))
        elif rules:
            rules.insert(rng.randrange(len(rules)), rules.pop(rng.randrange(len(rules))))
    defaults = dict(document["defaults"])
    if rng.random() < 0.15:
        defaults["unknown_location"] = "deny" if defaults["unknown_location"] == "allow" else "allow"
    return {"version": document["version"] + 1, "defaults": defaults, "rules": rules}


def canonical(document: dict[str, Any]) -> bytes:
    return canonical_snapshot(json.dumps(document).encode(), "publication.json")
