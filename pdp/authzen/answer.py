"""AuthZEN answers as JSON bytes: Decision objects, errors and the metadata document.

A Decision (Authorization API 1.0, section 5.5) is ``{"decision": bool,
"context": {...}}``; its context carries the fields of ``pdp.v1.CheckResponse``
under their proto names (``verdict``, ``rule_id``, ``reason``, ``legal_basis``,
``location``, ``policy_version``, ``geoip_build``, ``shadow_rule_ids``). One
Access Evaluation answer and one item of an Access Evaluations answer are the
same object, so :class:`Answers` encodes it once per (decision, location) of
an active state, as :mod:`pdp.wire` does for gRPC, and a batch is the items
joined.

An error is ``{"error": {"status", "message", "field"?}}``: the body of an
HTTP error (section 10.1.2 asks for "an error message") and, for an item that
cannot be decided, the context of its ``decision: false`` (section 7.2.1).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pdp.model import Decision, Location, Verdict
from pdp.state import Active

__all__ = [
    "CACHE_LIMIT",
    "Answers",
    "allowed",
    "decision_context",
    "error_body",
    "evaluations_body",
    "failed_item",
    "metadata",
]

# Distinct (decision, location) answers kept per active state, as in pdp.wire.
CACHE_LIMIT = 50_000
EVALUATION_PATH = "/access/v1/evaluation"
EVALUATIONS_PATH = "/access/v1/evaluations"
METADATA_PATH = "/.well-known/authzen-configuration"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def decision_context(decision: Decision, location: Location, active: Active) -> dict[str, Any]:
    """The fields of ``pdp.v1.CheckResponse``, under the same names."""
    return {
        "verdict": decision.verdict.name,
        "rule_id": decision.rule_id,
        "reason": decision.reason,
        "legal_basis": decision.legal_basis,
        "location": {"found": location.found, "country": location.country, "subdivisions": list(location.subdivisions)},
        "policy_version": active.policy.version,
        "geoip_build": active.geo.build_epoch,
        "shadow_rule_ids": list(decision.shadow_rule_ids),
    }


def _encode(decision: Decision, location: Location, active: Active) -> bytes:
    allowed = decision.verdict == Verdict.ALLOW
    return _dumps({"decision": allowed, "context": decision_context(decision, location, active)})


class Answers:
    """A presenter for :class:`pdp.decisions.DecisionPath`: the Decision
    object's bytes, cached per (decision, location) of one active state.

    Decisions and locations are interned by the policy and the GeoIP cache, so
    their ids name them while an entry holds them. Used from one event loop
    thread; a state change replaces the whole cache.
    """

    def __init__(self) -> None:
        self._active: Active | None = None
        self._entries: dict[tuple[int, int], tuple[bytes, Decision, Location]] = {}

    def __call__(self, decision: Decision, location: Location, active: Active) -> bytes:
        if active is not self._active:
            self._active, self._entries = active, {}
        if decision.shadow_rule_ids:  # a fresh decision object per call: caching it would only churn
            return _encode(decision, location, active)
        key = (id(decision), id(location))
        hit = self._entries.get(key)
        if hit is not None:
            return hit[0]
        data = _encode(decision, location, active)
        if len(self._entries) >= CACHE_LIMIT:
            self._entries.clear()
        self._entries[key] = (data, decision, location)
        return data


def allowed(answer: bytes) -> bool:
    """Whether an encoded Decision object permits (its first member says so)."""
    return answer.startswith(b'{"decision":true')


def _error(status: int, message: str, field: str) -> dict[str, Any]:
    error: dict[str, Any] = {"status": status, "message": message}
    if field:
        error["field"] = field
    return error


def error_body(status: int, message: str, field: str = "") -> bytes:
    """The body of an HTTP error answer."""
    return _dumps({"error": _error(status, message, field)})


def failed_item(status: int, message: str, field: str = "") -> bytes:
    """A Decision that denies because the item could not be decided (section 7.2.1)."""
    return _dumps({"decision": False, "context": {"error": _error(status, message, field)}})


def evaluations_body(items: Sequence[bytes]) -> bytes:
    """An Access Evaluations response (section 7.2): the items in request order."""
    return b'{"evaluations":[' + b",".join(items) + b"]}"


def metadata(base_url: str) -> bytes:
    """The PDP metadata document (section 9) for a PDP reached at ``base_url``;
    no search endpoints and no capabilities, so those members are omitted."""
    return _dumps(
        {
            "policy_decision_point": base_url,
            "access_evaluation_endpoint": base_url + EVALUATION_PATH,
            "access_evaluations_endpoint": base_url + EVALUATIONS_PATH,
        }
    )
