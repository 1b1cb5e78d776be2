"""AdmissionService over gRPC: the protocol adapter of :mod:`pdp.decisions`.

Protobuf stops here: Check and CheckBatch hand the request's fields to the
shared :class:`~pdp.decisions.DecisionPath` and answer with the bytes
:mod:`pdp.wire` encodes (once per decision and location, then cached); the
path's errors become gRPC status codes. WatchPolicy and GetStatus read the
holder. The transport (binding, TLS, health, signals) is :mod:`pdp.server`.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from pdp import __version__, workers
from pdp._proto import admission_pb2 as pb
from pdp.batch import ReadParticipants
from pdp.bounds import MAX_ID_LENGTH, ParticipantFields
from pdp.decisions import DecisionPath, Endpoint, NotReadyError, RequestError
from pdp.errors import PdpError
from pdp.state import Active
from pdp.wire import MeetingMemo, batch_addresses, check_parts, encode_batch, encode_check, encode_result

if TYPE_CHECKING:
    from pdp.candidate import CandidateState

__all__ = ["CHECK", "CHECK_BATCH", "SERVICE_NAME", "AdmissionServicer", "admission_handlers", "encoded_unary"]


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdmissionService"].full_name
CHECK = Endpoint("grpc", SERVICE_NAME, "Check")
CHECK_BATCH = Endpoint("grpc", SERVICE_NAME, "CheckBatch")


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: abort raises")  # for type checkers that miss NoReturn


def _refuse(context: grpc.ServicerContext, error: PdpError) -> NoReturn:
    """The decision path's errors as gRPC statuses."""
    if isinstance(error, NotReadyError):
        _abort(context, grpc.StatusCode.UNAVAILABLE, str(error))
    _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))


class AdmissionServicer:
    """Answers Check and CheckBatch through the decision path, WatchPolicy and
    GetStatus from its holder."""

    def __init__(self, path: DecisionPath, batch_limit: int, max_watchers: int) -> None:
        self._path = path
        self._holder = path.holder
        self._batch_limit = batch_limit
        # A sync server gives each open stream a thread of its own; capping the
        # watchers keeps threads free for Check.
        self._watch_slots = threading.BoundedSemaphore(max_watchers)
        self._max_watchers = max_watchers
        self._meetings = MeetingMemo()

    def Check(self, request: pb.CheckRequest, context: grpc.ServicerContext) -> bytes:
        """Returns the serialized CheckResponse (see pdp.wire)."""
        participant = request.participant
        try:
            return self._path.check(
                participant.ip, participant.user_id, participant.account_id, request.meeting, request.action,
                endpoint=CHECK, present=encode_check,
            )  # fmt: skip
        except (RequestError, NotReadyError) as error:
            _refuse(context, error)

    def check_encoded(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        """:meth:`Check` from the request's bytes, the meeting from the memo when it
        was seen before (see pdp.wire.MeetingMemo); a request the parts cannot be
        read from exactly is parsed whole, and refused as before when undecodable."""
        parts = check_parts(data)
        meeting = None if parts is None else self._meetings.meeting(parts[1])
        if parts is None or meeting is None:
            try:
                request = pb.CheckRequest.FromString(data)
            except DecodeError as error:
                _refuse_undecodable(context, "CheckRequest", str(error) or "malformed protobuf")
            return self.Check(request, context)
        participant = parts[0]
        try:  # Check's body, not a call to it: a frame costs in a loaded server
            return self._path.check(
                participant.ip, participant.user_id, participant.account_id, meeting, parts[2],
                endpoint=CHECK, present=encode_check,
            )  # fmt: skip
        except (RequestError, NotReadyError) as error:
            _refuse(context, error)

    def CheckBatch(self, request: pb.CheckBatchRequest | BatchRequest, context: grpc.ServicerContext) -> bytes:
        """Returns the serialized CheckBatchResponse (see pdp.wire)."""
        if isinstance(request, BatchRequest):
            message = request.message
            participants: Sequence[ParticipantFields] = message.participants
            if request.addresses is not None:
                participants = ReadParticipants(participants, request.addresses)
        else:
            message = request
            participants = message.participants
        try:
            batch = self._path.check_batch(
                participants, message.meeting, message.action,
                limit=self._batch_limit, endpoint=CHECK_BATCH, present=encode_result,
            )  # fmt: skip
        except (RequestError, NotReadyError) as error:
            _refuse(context, error)
        return encode_batch(batch.results, batch.active)

    def WatchPolicy(
        self, request: pb.WatchPolicyRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchPolicyResponse]:
        if not self._watch_slots.acquire(blocking=False):
            _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"already {self._max_watchers} WatchPolicy streams open; share one per meeting node",
            )
        events: queue.SimpleQueue[Active | None] = queue.SimpleQueue()
        unsubscribe = self._holder.subscribe(events.put)
        context.add_callback(lambda: events.put(None))  # wakes the loop when the call ends
        try:
            active = self._holder.active
            while context.is_active():
                if active is not None:
                    yield _policy_event(active)
                active = events.get()
                if active is None:
                    break
        finally:
            unsubscribe()
            self._watch_slots.release()

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.GetStatusResponse:
        active = self._holder.active
        status = self._holder.status
        worker_index, worker_count = workers.current()
        response = pb.GetStatusResponse(
            serving=active is not None,
            policy_source=status.source,
            stale=status.stale,
            last_error=status.last_error,
            server_version=__version__,
            last_fetch_result=status.last_fetch_result,
            activations=status.activations,
            rejections=status.rejections,
            geoip_reloads=status.geoip_reloads,
            geoip_rejections=status.geoip_rejections,
            delta_activations=status.delta_activations,
            delta_fallbacks=status.delta_fallbacks,
            last_delta_fallback=status.last_delta_fallback,
            worker_index=worker_index,
            worker_count=worker_count,
            worker_pid=os.getpid(),
        )
        if status.last_fetch_at:
            response.last_fetch_at.FromDatetime(datetime.fromtimestamp(status.last_fetch_at, UTC))
        if active is not None:
            geo = active.geo
            response.policy_version = active.policy.version
            response.rule_count = len(active.policy.rules)
            response.policy_source = active.source
            response.policy_sha256 = active.policy.sha256
            response.policy_activated_at.FromDatetime(datetime.fromtimestamp(active.activated_at, UTC))
            response.geoip_path = geo.path
            response.geoip_type = geo.database_type
            response.geoip_build = geo.build_epoch
            response.geoip_lookup_errors = geo.lookup_errors
            response.cache_size = geo.cache_entries
            response.cache_capacity = geo.cache_size
            response.cache_hits = geo.hits
            response.cache_misses = geo.misses
        if self._path.candidate is not None:
            _candidate_status(response.candidate, self._path.candidate.state())
        return response


def _candidate_status(message: pb.CandidateStatus, state: CandidateState) -> None:
    message.source = state.source
    message.policy_version = state.version
    message.policy_sha256 = state.sha256
    if state.loaded_at:
        message.loaded_at.FromDatetime(datetime.fromtimestamp(state.loaded_at, UTC))
    message.last_error = state.last_error
    message.decisions, message.flips, message.dropped = state.decisions, state.flips, state.dropped
    for count in state.by_rule:
        message.flips_by_rule.add(
            rule_id=count.rule_id, jurisdiction=count.jurisdiction, legal_basis=count.legal_basis,
            verdict=int(count.verdict), candidate_verdict=int(count.candidate_verdict), count=count.count,
        )  # fmt: skip


def _policy_event(active: Active) -> pb.WatchPolicyResponse:
    event = pb.WatchPolicyResponse(policy_version=active.policy.version, geoip_build=active.geo.build_epoch)
    event.activated_at.FromDatetime(datetime.fromtimestamp(active.activated_at, UTC))
    return event


def _passthrough(data: bytes) -> bytes:
    return data


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """Stands for request bytes that are not the expected message."""

    type_name: str
    reason: str


def _decoder(message: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: gRPC would answer INTERNAL."""

    def decode(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError as error:
            return _Undecodable(message.DESCRIPTOR.name, str(error) or "malformed protobuf")

    return decode


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """A CheckBatchRequest with its participants' addresses, when read in C (see
    :func:`pdp.wire.batch_addresses`; None: read them from the message)."""

    message: pb.CheckBatchRequest
    addresses: list[str] | None


def _refusing_undecodable(method: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        if type(request) is _Undecodable:
            _refuse_undecodable(context, request.type_name, request.reason)
        return method(request, context)

    return handler


def _refuse_undecodable(context: grpc.ServicerContext, type_name: str, reason: str) -> NoReturn:
    _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {type_name} ({reason})")


def _decoding(method: Callable[[Any, grpc.ServicerContext], bytes], message: Any) -> Callable[..., bytes]:
    """``method`` taking the request's bytes, decoding them itself: gRPC then calls
    no deserializer and no serializer of ours, two Python calls fewer per call."""
    from_string, type_name = message.FromString, message.DESCRIPTOR.name

    def handler(data: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            request = from_string(data)
        except DecodeError as error:
            _refuse_undecodable(context, type_name, str(error) or "malformed protobuf")
        return method(request, context)

    return handler


def _decoding_batch(method: Callable[[BatchRequest, grpc.ServicerContext], bytes]) -> Callable[..., bytes]:
    """CheckBatch taking the request's bytes, as :func:`_decoding` does, and reading
    the participants' addresses from them in C when it can (see pdp.wire)."""

    def handler(data: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            message = pb.CheckBatchRequest.FromString(data)
        except DecodeError as error:
            _refuse_undecodable(context, "CheckBatchRequest", str(error) or "malformed protobuf")
        addresses = batch_addresses(data, len(message.participants), MAX_ID_LENGTH)
        return method(BatchRequest(message, addresses), context)

    return handler


def encoded_unary(
    method: Callable[[Any, grpc.ServicerContext], bytes], request_type: Any
) -> grpc.RpcMethodHandler[Any, Any]:
    """A unary method answering bytes it encoded itself, for any adapter on this transport
    (Envoy's Authorization too): an undecodable request is INVALID_ARGUMENT, never INTERNAL."""
    return grpc.unary_unary_rpc_method_handler(_decoding(method, request_type))


def admission_handlers(servicer: AdmissionServicer) -> grpc.GenericRpcHandler:
    """AdmissionService's methods; Check and CheckBatch return bytes already encoded."""
    unary = grpc.unary_unary_rpc_method_handler
    guard = _refusing_undecodable
    methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Check": unary(servicer.check_encoded),
        "CheckBatch": unary(_decoding_batch(servicer.CheckBatch)),
        "GetStatus": unary(
            guard(servicer.GetStatus), _decoder(pb.GetStatusRequest), pb.GetStatusResponse.SerializeToString
        ),
        "WatchPolicy": grpc.unary_stream_rpc_method_handler(
            guard(servicer.WatchPolicy), _decoder(pb.WatchPolicyRequest), pb.WatchPolicyResponse.SerializeToString
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)
