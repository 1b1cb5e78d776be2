"""Envoy ext_authz answers, as serialized ``envoy.service.auth.v3.CheckResponse`` bytes.

ALLOW: status OK, and request headers for the upstream (``x-pdp-verdict``,
``x-pdp-policy-version``, ``x-pdp-country``, ``x-pdp-shadow-rules``), each
overwriting a client-sent one; every other client-sent ``x-pdp-*`` is removed
(Envoy removes after it sets, so a header pdp sets is never also removed).
DENY: ``PERMISSION_DENIED`` with HTTP 403, ``x-pdp-rule-id`` and a JSON body with
the fields of ``pdp.v1.CheckResponse``. A request that cannot be decided:
``INVALID_ARGUMENT`` with HTTP 400 and a JSON body naming what is wrong.

Answers without client-sent ``x-pdp-*`` headers and without shadow matches
recur constantly, so :class:`AnswerCache` keeps their bytes per (decision,
location) for one active state, as :mod:`pdp.wire` does for ``Check``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.type.v3 import http_status_pb2

from pdp.model import Decision, Location, Verdict
from pdp.state import Active

__all__ = ["PREFIX", "AnswerCache", "allow", "bad_request", "decision_json", "deny"]

PREFIX = "x-pdp-"
# google.rpc.Code values, as gRPC numbers them (the same table).
_OK, _DENIED, _INVALID = (
    code.value[0] for code in (grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
)
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_JSON = ("content-type", "application/json")
CACHE_LIMIT = 50_000  # distinct (decision, location) pairs per activation, as in pdp.wire


def decision_json(decision: Decision, location: Location, active: Active) -> dict[str, Any]:
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


def _header(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE)


def allow(decision: Decision, location: Location, active: Active, client_sent: Sequence[str] = ()) -> bytes:
    """OK with the upstream's ``x-pdp-*`` headers; ``client_sent``: the request's own ``x-pdp-*`` names."""
    headers = {"x-pdp-verdict": "ALLOW", "x-pdp-policy-version": str(active.policy.version)}
    if location.country:
        headers["x-pdp-country"] = location.country
    if decision.shadow_rule_ids:
        headers["x-pdp-shadow-rules"] = ",".join(decision.shadow_rule_ids)
    response = ext.CheckResponse(
        status={"code": _OK},
        ok_response=ext.OkHttpResponse(
            headers=[_header(key, value) for key, value in headers.items()],
            headers_to_remove=sorted({name for name in client_sent if name not in headers}),
        ),
    )
    return bytes(response.SerializeToString())


def deny(decision: Decision, location: Location, active: Active) -> bytes:
    """PERMISSION_DENIED: HTTP 403, ``x-pdp-rule-id``, the decision as JSON."""
    body = json.dumps(decision_json(decision, location, active), separators=(",", ":"))
    response = ext.CheckResponse(
        status={"code": _DENIED, "message": decision.reason},
        denied_response=ext.DeniedHttpResponse(
            status={"code": http_status_pb2.Forbidden},
            headers=[_header("x-pdp-rule-id", decision.rule_id), _header(*_JSON)],
            body=body,
        ),
    )
    return bytes(response.SerializeToString())


def bad_request(field: str, message: str) -> bytes:
    """INVALID_ARGUMENT: HTTP 400 and a JSON body naming ``field``; a deny, never an allow."""
    body = json.dumps({"verdict": "DENY", "error": "bad request", "field": field, "message": message})
    response = ext.CheckResponse(
        status={"code": _INVALID, "message": f"{field}: {message}"},
        denied_response=ext.DeniedHttpResponse(
            status={"code": http_status_pb2.BadRequest}, headers=[_header(*_JSON)], body=body
        ),
    )
    return bytes(response.SerializeToString())


class AnswerCache:
    """Answer bytes per (decision, location) of one active state; replaced when it changes.

    Decisions and locations are interned by the policy and the GeoIP cache, so
    their ids identify them while the entry holds them. Not locked: the state
    and its dict are read together, so a dict only ever holds answers of its own
    state; a race only costs a re-encoding.
    """

    def __init__(self) -> None:
        self._state: tuple[Active | None, dict[tuple[int, int], tuple[bytes, Decision, Location]]] = (None, {})

    def answer(self, decision: Decision, location: Location, active: Active) -> bytes:
        """The ALLOW or DENY bytes for a request that sent no ``x-pdp-*`` header."""
        state = self._state
        if state[0] is not active:
            state = self._state = (active, {})
        entries = state[1]
        key = (id(decision), id(location))
        hit = entries.get(key)
        if hit is not None:
            return hit[0]
        encode = allow if decision.verdict == Verdict.ALLOW else deny
        data = encode(decision, location, active)
        if decision.shadow_rule_ids:  # a fresh decision object per call: caching it would only churn
            return data
        if len(entries) >= CACHE_LIMIT:
            entries.clear()
        entries[key] = (data, decision, location)
        return data
