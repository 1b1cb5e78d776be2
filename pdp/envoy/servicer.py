"""``envoy.service.auth.v3.Authorization/Check``: Envoy's ext_authz filter asking pdp.

A protocol adapter of :mod:`pdp.decisions`, thin: :mod:`pdp.envoy.mapping` reads the
participant, meeting and action from Envoy's AttributeContext, the one
:class:`~pdp.decisions.DecisionPath` decides and observes the call (bounds,
location, decision, telemetry, audit, tracing), and :mod:`pdp.envoy.answer`
presents the decision in Envoy's terms. Before a policy is loaded the call fails
with gRPC ``UNAVAILABLE``, so that Envoy's ``failure_mode_allow`` and
``status_on_error`` decide what the client gets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ext

from pdp.decisions import DecisionPath, Endpoint, NotReadyError, RequestError
from pdp.envoy.answer import PREFIX, AnswerCache, allow, bad_request, deny
from pdp.envoy.mapping import Mapper, MappingError
from pdp.model import Decision, Location, Verdict
from pdp.servicer import encoded_unary
from pdp.state import Active

if TYPE_CHECKING:
    from pdp.config import ServeConfig

__all__ = ["CHECK", "SERVICE_NAME", "AuthorizationServicer", "handler", "mapper_from"]

SERVICE_NAME: str = ext.DESCRIPTOR.services_by_name["Authorization"].full_name
# Its own `rpc` label in the duration metric: not AdmissionService's Check.
CHECK = Endpoint("grpc", SERVICE_NAME, "Check", label="ext_authz")
REQUEST_TYPE: Any = ext.CheckRequest


def mapper_from(config: ServeConfig) -> Mapper:
    """The request mapping that ``config``'s ``ext_authz_*`` settings describe (validated by pdp.config)."""
    return Mapper(
        config.ext_authz_sources,
        required=[name for name in config.ext_authz_required.split(",") if name],
        xff_trusted_hops=config.ext_authz_xff_trusted_hops,
        jwt_payload_key=config.ext_authz_jwt_payload_key,
    )


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


def _fresh(client_sent: list[str]) -> Callable[[Decision, Location, Active], bytes]:
    """A presenter for a request that sent ``x-pdp-*`` headers: they are removed, so the answer is its own."""

    def present(decision: Decision, location: Location, active: Active) -> bytes:
        if decision.verdict == Verdict.ALLOW:
            return allow(decision, location, active, client_sent)
        return deny(decision, location, active)

    return present


class AuthorizationServicer:
    """Answers Envoy's Check with serialized ``CheckResponse`` bytes."""

    def __init__(self, path: DecisionPath, mapper: Mapper) -> None:
        self._path = path
        self._mapper = mapper
        self._answers = AnswerCache()

    def Check(self, request: Any, context: grpc.ServicerContext) -> bytes:
        started = time.perf_counter()
        attributes = request.attributes
        headers = attributes.request.http.headers
        try:
            admission = self._mapper.map(attributes, headers)
        except MappingError as error:
            self._path.refused(CHECK, started)
            return bad_request(error.attribute, error.message)
        client_sent = [name for name in headers if name.startswith(PREFIX)]
        present = _fresh(client_sent) if client_sent else self._answers.answer
        try:
            return self._path.check(
                admission.ip, admission.user_id, admission.account_id, admission, int(admission.action),
                endpoint=CHECK, present=present, remember=not client_sent,  # a fresh answer is this call's alone
            )  # fmt: skip
        except NotReadyError as error:
            _abort(context, grpc.StatusCode.UNAVAILABLE, str(error))
        except RequestError as error:
            return bad_request(error.field, error.message)


def handler(servicer: AuthorizationServicer) -> grpc.GenericRpcHandler:
    """Envoy's Authorization service, on the transport's terms (an undecodable request is INVALID_ARGUMENT)."""
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Check": encoded_unary(servicer.Check, REQUEST_TYPE)})
