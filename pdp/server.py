"""The gRPC server: AdmissionService, standard health and reflection.

Protobuf stops here: requests become :mod:`pdp.model` values before the rules
engine sees them, decisions become messages on the way out.

Sync gRPC with a thread pool, chosen by measurement (README, "Why sync gRPC"):
on this 2-core machine it answered about 1.7x more calls per second than
grpc.aio with the same handler.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import queue
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdp import __version__
from pdp._proto import admission_pb2 as pb
from pdp.config import ServeConfig, parse_listen
from pdp.geo import InvalidAddressError
from pdp.model import Decision, Location, Meeting, Verdict, verdict_label
from pdp.policy import Active, PolicyHolder
from pdp.wire import encode_batch, encode_check, encode_result

if TYPE_CHECKING:
    from pdp.audit import AuditLog
    from pdp.telemetry import Telemetry

__all__ = ["SERVICE_NAME", "AdmissionServicer", "RunningServer", "start_server"]

log = logging.getLogger("pdp.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdmissionService"].full_name
_VALID_ACTIONS = frozenset((pb.ACTION_JOIN, pb.ACTION_HOST))


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: abort raises")  # for type checkers that miss NoReturn


class AdmissionServicer:
    """Answers Check, CheckBatch and GetStatus from the holder's active state.

    Telemetry, tracing and the audit log are optional; without them Check is
    the bare decision path.
    """

    def __init__(
        self,
        holder: PolicyHolder,
        batch_limit: int,
        max_watchers: int,
        telemetry: Telemetry | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self._holder = holder
        self._batch_limit = batch_limit
        # A sync server gives each open stream a thread of its own; capping the
        # watchers keeps threads free for Check.
        self._watch_slots = threading.BoundedSemaphore(max_watchers)
        self._max_watchers = max_watchers
        self._telemetry = telemetry
        self._tracer = telemetry.tracer if telemetry is not None else None
        if self._tracer is not None:
            # Imported here: a sidecar without tracing never loads the SDK's trace module.
            from opentelemetry.trace import SpanKind

            self._span_kind = SpanKind.SERVER
        self._audit = audit
        self._observed = telemetry is not None or audit is not None

    def _active(self, context: grpc.ServicerContext) -> Active:
        active = self._holder.active
        if active is None:
            _abort(context, grpc.StatusCode.UNAVAILABLE, "no policy and GeoIP database loaded yet; retry shortly")
        return active

    # ------------------------------------------------------------------ Check

    def Check(self, request: pb.CheckRequest, context: grpc.ServicerContext) -> bytes:
        """Returns the serialized CheckResponse (see pdp.wire)."""
        if not self._observed:
            return self._check(request, context)[0]
        if self._tracer is None:
            return self._observed_check(request, context)[0]
        with self._tracer.start_as_current_span("pdp.v1.AdmissionService/Check", kind=self._span_kind) as span:
            response, decision, active = self._observed_check(request, context)
            span.set_attributes(
                {**_span_attributes("Check", active), "pdp.verdict": _VERDICT_NAMES[decision.verdict],
                 "pdp.rule_id": decision.rule_id}
            )  # fmt: skip
            return response

    def _check(
        self, request: pb.CheckRequest, context: grpc.ServicerContext
    ) -> tuple[bytes, Decision, Location, Active]:
        active = self._active(context)
        meeting = _meeting(request.meeting, request.action, context)
        participant = request.participant
        if len(participant.user_id) > MAX_ID_LENGTH or len(participant.account_id) > MAX_ID_LENGTH:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, _participant_problem(participant, "participant") or "")
        try:
            location = active.geo.locate(participant.ip)
        except InvalidAddressError as error:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"participant.ip: {error}")
        decision = active.policy.decide(location, request.action, meeting, time.time())
        return encode_check(decision, location, active), decision, location, active

    def _observed_check(
        self, request: pb.CheckRequest, context: grpc.ServicerContext
    ) -> tuple[bytes, Decision, Active]:
        started = time.perf_counter()
        try:
            response, decision, location, active = self._check(request, context)
        except Exception:
            if self._telemetry is not None:
                self._telemetry.observe_error("Check", time.perf_counter() - started)
            raise
        if self._telemetry is not None:
            self._telemetry.observe(
                "Check",
                time.perf_counter() - started,
                _VERDICT_NAMES[decision.verdict],
                ((decision, location),),
                active,
            )
        if self._audit is not None:
            participant = request.participant
            self._audit.record(
                decision, location, active, request.action, request.meeting,
                participant.ip, participant.user_id, participant.account_id,
            )  # fmt: skip
        return response, decision, active

    # ------------------------------------------------------------------ CheckBatch

    def CheckBatch(self, request: pb.CheckBatchRequest, context: grpc.ServicerContext) -> bytes:
        """Returns the serialized CheckBatchResponse (see pdp.wire)."""
        if not self._observed:
            return self._check_batch(request, context)[0]
        started = time.perf_counter()
        span_context = (
            self._tracer.start_as_current_span("pdp.v1.AdmissionService/CheckBatch", kind=self._span_kind)
            if self._tracer is not None
            else contextlib.nullcontext()
        )
        with span_context as span:
            try:
                response, decided, active = self._check_batch(request, context)
            except Exception:
                if self._telemetry is not None:
                    self._telemetry.observe_error("CheckBatch", time.perf_counter() - started)
                raise
            verdict = verdict_label(decision.verdict for decision, _ in decided)
            if span is not None:
                span.set_attributes(
                    {**_span_attributes("CheckBatch", active), "pdp.verdict": verdict, "pdp.participants": len(decided)}
                )
        if self._telemetry is not None:
            self._telemetry.observe("CheckBatch", time.perf_counter() - started, verdict, decided, active)
        if self._audit is not None:
            for (decision, location), participant in zip(decided, request.participants, strict=True):
                self._audit.record(
                    decision, location, active, request.action, request.meeting,
                    participant.ip, participant.user_id, participant.account_id,
                )  # fmt: skip
        return response

    def _check_batch(
        self, request: pb.CheckBatchRequest, context: grpc.ServicerContext
    ) -> tuple[bytes, list[tuple[Decision, Location]], Active]:
        count = len(request.participants)
        if not 1 <= count <= self._batch_limit:
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"participants: {count} given, between 1 and {self._batch_limit} accepted",
            )
        active = self._active(context)
        meeting = _meeting(request.meeting, request.action, context)
        decide = active.policy.decide
        now = time.time()
        action = request.action
        for position, participant in enumerate(request.participants):
            if len(participant.user_id) > MAX_ID_LENGTH or len(participant.account_id) > MAX_ID_LENGTH:
                problem = _participant_problem(participant, f"participants[{position}]") or ""
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            locations = active.geo.locate_many([participant.ip for participant in request.participants])
        except InvalidAddressError as error:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"participants[{error.position}].ip: {error}")
        decided = []
        framed = []
        # One meeting, one action, one moment: the decision depends on the
        # location alone, and locations are interned, so decide once per place.
        by_location: dict[int, tuple[Decision, bytes]] = {}
        for location in locations:
            known = by_location.get(id(location))
            if known is None:
                decision = decide(location, action, meeting, now)
                known = by_location[id(location)] = (decision, encode_result(decision, location, active))
            decided.append((known[0], location))
            framed.append(known[1])
        return encode_batch(framed, active), decided, active

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
        return response


# Bounds on what one request may carry: ids and tags are labels, never documents.
MAX_ID_LENGTH = 256
MAX_TAGS = 64
MAX_TAG_LENGTH = 128


def _meeting(message: pb.Meeting, action: int, context: grpc.ServicerContext) -> Meeting:
    meeting_id = message.meeting_id
    if not meeting_id:
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "meeting.meeting_id: required")
    if action not in _VALID_ACTIONS:
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"action: {action} is not ACTION_JOIN (1) or ACTION_HOST (2)")
    tags = message.tags
    if (
        len(meeting_id) > MAX_ID_LENGTH
        or len(message.host_account_id) > MAX_ID_LENGTH
        or len(tags) > MAX_TAGS
        or any(len(tag) > MAX_TAG_LENGTH for tag in tags)
    ):
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, _meeting_problem(message))
    return Meeting(meeting_id, message.host_account_id, frozenset(tags))


def _meeting_problem(message: pb.Meeting) -> str:
    if len(message.meeting_id) > MAX_ID_LENGTH:
        return f"meeting.meeting_id: longer than {MAX_ID_LENGTH} characters"
    if len(message.host_account_id) > MAX_ID_LENGTH:
        return f"meeting.host_account_id: longer than {MAX_ID_LENGTH} characters"
    if len(message.tags) > MAX_TAGS:
        return f"meeting.tags: {len(message.tags)} given, at most {MAX_TAGS} accepted"
    return f"meeting.tags: a tag longer than {MAX_TAG_LENGTH} characters"


def _participant_problem(participant: pb.Participant, field: str) -> str | None:
    if len(participant.user_id) > MAX_ID_LENGTH:
        return f"{field}.user_id: longer than {MAX_ID_LENGTH} characters"
    if len(participant.account_id) > MAX_ID_LENGTH:
        return f"{field}.account_id: longer than {MAX_ID_LENGTH} characters"
    return None


_VERDICT_NAMES = {Verdict.ALLOW: "ALLOW", Verdict.DENY: "DENY"}


def _span_attributes(rpc: str, active: Active) -> dict[str, str | int]:
    """Attributes every span carries; never an address or an id of a person."""
    return {
        "rpc.system": "grpc",
        "rpc.service": SERVICE_NAME,
        "rpc.method": rpc,
        "pdp.policy_version": active.policy.version,
        "pdp.geoip_build": active.geo.build_epoch,
    }


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


def _refusing_undecodable(method: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        if type(request) is _Undecodable:
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request: not a valid {request.type_name} ({request.reason})",
            )
        return method(request, context)

    return handler


def _handlers(servicer: AdmissionServicer) -> grpc.GenericRpcHandler:
    """AdmissionService's methods; Check and CheckBatch return bytes already encoded."""
    unary = grpc.unary_unary_rpc_method_handler
    guard = _refusing_undecodable
    methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Check": unary(guard(servicer.Check), _decoder(pb.CheckRequest), _passthrough),
        "CheckBatch": unary(guard(servicer.CheckBatch), _decoder(pb.CheckBatchRequest), _passthrough),
        "GetStatus": unary(
            guard(servicer.GetStatus), _decoder(pb.GetStatusRequest), pb.GetStatusResponse.SerializeToString
        ),
        "WatchPolicy": grpc.unary_stream_rpc_method_handler(
            guard(servicer.WatchPolicy), _decoder(pb.WatchPolicyRequest), pb.WatchPolicyResponse.SerializeToString
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)


# --------------------------------------------------------------------------- running


@dataclass
class RunningServer:
    """A started server; ``address`` is what clients dial (port resolved)."""

    server: grpc.Server
    health: health.HealthServicer
    address: str
    grace_seconds: float
    health_server: grpc.Server | None = None
    health_address: str = ""

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight calls finish, then stop."""
        self.health.enter_graceful_shutdown()
        self.server.stop(self.grace_seconds if grace is None else grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()


def grpc_options(config: ServeConfig) -> list[tuple[str, int]]:
    """Channel options shared by `pdp serve` and the benchmarks' floor server."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", max(config.max_message_bytes, 64 * 1024 * 1024)),
        # Without this, a second server on the same port would silently share it.
        ("grpc.so_reuseport", 0),
    ]


def start_server(
    config: ServeConfig,
    holder: PolicyHolder,
    *,
    telemetry: Telemetry | None = None,
    audit: AuditLog | None = None,
) -> RunningServer:
    """Build and start the server on ``config.listen``; health starts NOT_SERVING.

    :raises OSError: the address cannot be bound (in use, bad path, no permission).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="pdp-rpc"),
        options=grpc_options(config),
    )
    servicer = AdmissionServicer(holder, config.batch_limit, max(1, config.workers // 2), telemetry, audit)
    server.add_generic_rpc_handlers((_handlers(servicer),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    address = _bind(server, config.listen, config)
    server.start()
    running = RunningServer(server, health_servicer, address, config.grace_seconds)
    if config.health_listen:
        # Only Health here: this address may be the pod IP, reachable by the kubelet and others.
        probe_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="pdp-health"), options=grpc_options(config)
        )
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probe_server)
        try:
            running.health_address = _bind(probe_server, config.health_listen, health_only=True)
        except OSError:
            server.stop(0)
            raise
        probe_server.start()
        running.health_server = probe_server
    # Health follows the holder: NOT_SERVING until a policy and a database are active.
    running.set_serving(holder.active is not None)
    holder.subscribe(lambda _active: running.set_serving(True))
    return running


def _bind(server: grpc.Server, listen: str, config: ServeConfig | None = None, *, health_only: bool = False) -> str:
    """Add ``listen`` to ``server``; with TLS when ``config`` carries certificates.

    :raises OSError: the address is busy or invalid, or a non-loopback address
        would be served without TLS (and ``--allow-insecure-remote`` is not set).
    """
    host, port = parse_listen(listen)
    if port is None:
        _clear_stale_socket(Path(host))
        _make_socket_directory(Path(host).parent)
        target = f"unix:{host}"
        # The socket is born group-only (0660): no moment where others may connect.
        previous = os.umask(0o117)
        try:
            bound = server.add_insecure_port(target)
        finally:
            os.umask(previous)
        if not bound:
            raise OSError(f"cannot listen on {listen}")
        return target
    credentials = _server_credentials(config) if config is not None else None
    insecure_allowed = health_only or (config is not None and config.allow_insecure_remote)
    if credentials is None and not insecure_allowed and not _is_loopback(host):
        raise OSError(
            f"refusing to serve {listen} without TLS: it is reachable from other hosts; pass --tls-cert and "
            "--tls-key (and --tls-client-ca for mutual TLS), or --allow-insecure-remote"
        )
    try:
        bound = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    except RuntimeError as error:
        raise OSError(f"cannot listen on {listen}: {error}") from None
    if not bound:
        raise OSError(f"cannot listen on {listen} (address in use or not local)")
    return f"{host}:{bound}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def _make_socket_directory(directory: Path) -> None:
    """Create the socket's directory for the server alone (and its group), if missing."""
    if not directory.exists():
        directory.mkdir(mode=0o750, parents=True)


def _server_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    if not (config.tls_cert or config.tls_key):
        if config.tls_client_ca:
            raise OSError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (config.tls_cert and config.tls_key):
        raise OSError("TLS needs both --tls-cert and --tls-key")
    try:
        key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
        client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    except OSError as error:
        raise OSError(f"TLS: {error.filename}: {error.strerror}") from None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead server, never a live one or a non-socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise OSError(f"{path}: another server is listening on this socket")


def wait_for_signal(running: RunningServer) -> None:
    """Block until SIGTERM or SIGINT, then shut down gracefully."""
    stop = threading.Event()
    received: list[str] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handle)
    stop.wait()
    log.info("%s received: draining for up to %.1fs (pid %d)", received[0], running.grace_seconds, os.getpid())
    running.stop()
    log.info("stopped")
