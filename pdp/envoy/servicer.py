"""``envoy.service.auth.v3.Authorization/Check``: Envoy's ext_authz filter asking pdp.

Thin: :mod:`pdp.envoy.mapping` reads the participant, meeting and action from
Envoy's AttributeContext, pdp's one decision path decides (validation,
telemetry and audit included), :mod:`pdp.envoy.answer` says it in Envoy's terms.
Before a policy is loaded the call fails with gRPC ``UNAVAILABLE``, so that
Envoy's ``failure_mode_allow`` and ``status_on_error`` decide what the client gets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ext

from pdp.envoy.admission_path import Decide, NotReady, RequestError
from pdp.envoy.answer import PREFIX, AnswerCache, allow, bad_request, deny
from pdp.envoy.mapping import Mapper, MappingError
from pdp.model import Verdict

if TYPE_CHECKING:
    from pdp.config import ServeConfig

__all__ = ["SERVICE_NAME", "AuthorizationServicer", "handler", "mapper_from"]

SERVICE_NAME: str = ext.DESCRIPTOR.services_by_name["Authorization"].full_name
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


class AuthorizationServicer:
    """Answers Envoy's Check with serialized ``CheckResponse`` bytes."""

    def __init__(self, decide: Decide, mapper: Mapper) -> None:
        self._decide = decide
        self._mapper = mapper
        self._answers = AnswerCache()

    def Check(self, request: Any, context: grpc.ServicerContext) -> bytes:
        attributes = request.attributes
        try:
            admission = self._mapper.map(attributes)
        except MappingError as error:
            return bad_request(error.attribute, error.message)
        try:
            decision, location, active = self._decide(admission)
        except NotReady as error:
            _abort(context, grpc.StatusCode.UNAVAILABLE, str(error))
        except RequestError as error:
            return bad_request(error.field, error.message)
        client_sent = [name for name in attributes.request.http.headers if name.startswith(PREFIX)]
        if not client_sent:
            return self._answers.answer(decision, location, active)
        if decision.verdict == Verdict.ALLOW:
            return allow(decision, location, active, client_sent)
        return deny(decision, location, active)


def handler(
    servicer: AuthorizationServicer,
    guard: Callable[[Callable[[Any, grpc.ServicerContext], Any]], Callable[..., Any]],
    decoder: Callable[[Any], Callable[[bytes], Any]],
) -> grpc.GenericRpcHandler:
    """Envoy's Authorization service; ``guard`` and ``decoder`` are the server's, so an
    undecodable request is INVALID_ARGUMENT like everywhere else."""
    method = grpc.unary_unary_rpc_method_handler(guard(servicer.Check), decoder(REQUEST_TYPE), bytes)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Check": method})
