"""The gRPC transport: listeners (TCP with or without TLS, Unix sockets),
standard health and reflection, the separate health port, graceful stop and
signals.

The services it carries are protocol adapters over one shared decision path
(:mod:`pdp.decisions`): AdmissionService (:mod:`pdp.servicer`) and Envoy's
Authorization (:mod:`pdp.envoy.servicer`). A new gRPC
adapter registers its handlers in :func:`_services`.

Sync gRPC with a thread pool, chosen by measurement (README, "Why sync gRPC"):
on this 2-core machine it answered about 1.7x more calls per second than
grpc.aio with the same handler. Every method, on every listener, receives its
request through a :class:`~pdp.receiving.ReceiveGuard`, so that calls whose
message never comes cannot take the threads (README, "Calls that send nothing").
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdp.config import ServeConfig, parse_listen
from pdp.decisions import DecisionPath
from pdp.envoy import servicer as envoy
from pdp.listen import SOCKET_UMASK, prepare_unix_socket, refuse_insecure_remote, tls_files
from pdp.receiving import CallThreads, GuardedHandlers, ReceiveGuard
from pdp.servicer import SERVICE_NAME, AdmissionServicer, admission_handlers
from pdp.state import PolicyHolder
from pdp.workers import SharedHealth, Worker

if TYPE_CHECKING:
    from pdp.audit import AuditLog
    from pdp.candidate import CandidateShadow
    from pdp.telemetry import Telemetry

__all__ = ["SERVICE_NAME", "RunningServer", "StopSignals", "grpc_options", "start_server"]

log = logging.getLogger("pdp.server")
_SHUTDOWN_SECONDS = 2.0
# The health port answers probes only: 2 deciding threads, 8 that may wait (pdp.receiving).
_PROBE_THREADS = 2


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
    # gRPC never shuts down the pools it is given: stop() does, so that a
    # stopped server leaves no thread behind.
    threads: list[CallThreads] = field(default_factory=list)
    unsubscribe: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def guards(self) -> list[ReceiveGuard]:
        """Each listener's receive guard: the main one first, then the health port's."""
        return [threads.guard for threads in self.threads]

    def set_serving(self, serving: bool) -> None:
        if isinstance(self.health, SharedHealth):
            self.health.own(serving)
            return
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight calls finish, then stop.

        Waits at most the grace period and :data:`_SHUTDOWN_SECONDS` more: grpcio's
        shutdown also waits for every connection's pending writes, which a client that
        never reads (with frames queued for it) would hold forever.
        """
        self.unsubscribe()
        self.health.enter_graceful_shutdown()
        grace = self.grace_seconds if grace is None else grace
        stopped = self.server.stop(grace)
        if self.health_server is not None:
            self.health_server.stop(0).wait(_SHUTDOWN_SECONDS)
        finished = stopped.wait(grace + _SHUTDOWN_SECONDS)
        if not finished:
            log.warning("stopped without waiting longer for connections whose clients do not read")
        for threads in self.threads:
            threads.stop(wait=finished)  # every call has ended: the threads exit at once


def grpc_options(config: ServeConfig, *, reuseport: bool = False) -> list[tuple[str, int]]:
    """Channel options shared by `pdp serve` and the benchmarks' floor server.

    ``reuseport`` only for the workers of ``--processes N``, whose supervisor
    has made sure nobody else holds the port (:mod:`pdp.supervisor`).
    """
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", max(config.max_message_bytes, 64 * 1024 * 1024)),
        # Without this, a second server on the same port would silently share it.
        ("grpc.so_reuseport", 1 if reuseport else 0),
    ]


def start_server(
    config: ServeConfig,
    holder: PolicyHolder,
    *,
    telemetry: Telemetry | None = None,
    audit: AuditLog | None = None,
    candidate: CandidateShadow | None = None,
    worker: Worker | None = None,
) -> RunningServer:
    """Build and start the server on ``config.listen``; health starts NOT_SERVING.

    As one of ``--processes N`` (``worker``), it shares its TCP port with the
    others, worker 0 also listens on PATH.0 beside a Unix PATH, and health
    says SERVING only while every worker serves.

    :raises OSError: the address cannot be bound (in use, bad path, no permission).
    """
    threads = CallThreads.start(config.workers, config.receive_timeout)
    try:  # nothing left running if the server cannot be built or bound
        server = grpc.server(
            threads.calls, options=grpc_options(config, reuseport=worker is not None and worker.reuseport)
        )
        handlers, names = _services(config, DecisionPath(holder, telemetry, audit, candidate))
        health_servicer = health.HealthServicer() if worker is None else SharedHealth(worker, ("", SERVICE_NAME))
        health_handlers = _Collected()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_handlers)  # type: ignore[arg-type]
        names += [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        reflection_handlers = _Collected()
        reflection.enable_server_reflection(names, reflection_handlers)  # type: ignore[arg-type]
        every = [*handlers, *health_handlers.handlers, *reflection_handlers.handlers]
        server.add_generic_rpc_handlers((GuardedHandlers(every, threads.guard, threads.streams),))
        address = _bind(server, config.listen, config)
        if worker is not None and worker.also:
            _bind(server, worker.also, config)
        server.start()
    except BaseException:
        threads.stop(wait=False)
        raise
    running = RunningServer(server, health_servicer, address, config.grace_seconds, threads=[threads])
    if config.health_listen:
        # Only Health here: this address may be the pod IP, reachable by the kubelet and others.
        probes = CallThreads.start(_PROBE_THREADS, config.receive_timeout, name="pdp-health")
        running.threads.append(probes)
        shared = worker is not None and worker.health_reuseport
        probe_server = grpc.server(probes.calls, options=grpc_options(config, reuseport=shared))
        probe_server.add_generic_rpc_handlers(
            (GuardedHandlers(health_handlers.handlers, probes.guard, probes.streams),)
        )
        try:
            running.health_address = _bind(probe_server, config.health_listen, health_only=True)
        except OSError:
            running.stop(0)
            raise
        probe_server.start()
        running.health_server = probe_server
    # Health follows the holder: NOT_SERVING until a policy and a database are active.
    running.set_serving(holder.active is not None)
    running.unsubscribe = holder.subscribe(lambda _active: running.set_serving(True))
    return running


class _Collected:
    """Stands for a server to the generated ``add_*_to_server`` functions, keeping
    their handlers (to be served guarded) instead of registering them."""

    def __init__(self) -> None:
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """The same methods as the generic handler just added: nothing more to keep."""


def _services(config: ServeConfig, path: DecisionPath) -> tuple[list[grpc.GenericRpcHandler], list[str]]:
    """The protocol adapters served on every listener, and their service names
    (for reflection); each calls the one decision path."""
    admission = AdmissionServicer(path, config.batch_limit, max(1, config.workers // 2))
    authorization = envoy.AuthorizationServicer(path, envoy.mapper_from(config))
    return [admission_handlers(admission), envoy.handler(authorization)], [SERVICE_NAME, envoy.SERVICE_NAME]


def _bind(server: grpc.Server, listen: str, config: ServeConfig | None = None, *, health_only: bool = False) -> str:
    """Add ``listen`` to ``server``; with TLS when ``config`` carries certificates.

    :raises OSError: the address is busy or invalid, or a non-loopback address
        would be served without TLS (and ``--allow-insecure-remote`` is not set).
    """
    host, port = parse_listen(listen)
    if port is None:
        prepare_unix_socket(Path(host))
        target = f"unix:{host}"
        previous = os.umask(SOCKET_UMASK)
        try:
            bound = _add_port(server, target, None)
        finally:
            os.umask(previous)
        if not bound:
            raise OSError(f"cannot listen on {listen}: {_why_not_bound(socket.AF_UNIX, host)}")
        return target
    credentials = _server_credentials(config) if config is not None else None
    if not health_only:  # the health port only answers Health: it may be the pod IP, plaintext
        refuse_insecure_remote(listen, host, credentials is not None, config or ServeConfig())
    bound = _add_port(server, listen, credentials)
    if not bound:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        raise OSError(f"cannot listen on {listen}: {_why_not_bound(family, (host.strip('[]'), port))}")
    return f"{host}:{bound}"


def _add_port(server: grpc.Server, target: str, credentials: grpc.ServerCredentials | None) -> int:
    """The port gRPC bound ``target`` to, 0 when it could not.

    gRPC's C core writes its own line about a failed bind straight to the
    process's stderr (``E... add_port.cc:83] Failed to add port...``), before
    pdp can say the same in its words; stderr is pointed at /dev/null for the
    duration of the call, which only ever runs while the server starts.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with Path(os.devnull).open("wb") as null:
            os.dup2(null.fileno(), 2)
        try:
            return server.add_secure_port(target, credentials) if credentials else server.add_insecure_port(target)
        except RuntimeError:  # grpcio raises where older versions returned 0
            return 0
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _why_not_bound(family: socket.AddressFamily, address: str | tuple[str, int]) -> str:
    """Why the address cannot be bound, found by trying it with a plain socket."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(address)
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        return f"{reason} (another process listens there)" if error.errno == errno.EADDRINUSE else reason
    return "gRPC could not bind it (set GRPC_VERBOSITY=debug to see why)"


def _server_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    tls = tls_files(config)
    if tls is None:
        return None
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.client_ca, require_client_auth=tls.client_ca is not None
    )


_SIGNAL_CHECK_SECONDS = 0.25


class StopSignals:
    """SIGTERM and SIGINT, caught from construction on (main thread only), so
    that one sent the moment a server says it is ready is not lost."""

    def __init__(self) -> None:
        self._received: list[str] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Nothing here may take a lock: the handler runs in the main thread between two of
        # its bytecodes, and setting an Event the main thread was waiting on deadlocked on
        # the Event's own lock (`pdp serve` then ignored SIGTERM until killed).
        self._received.append(signal.Signals(signum).name)

    def wait(self) -> str:
        """Block until one arrives; returns its name.

        The kernel may hand a process's signal to any of its threads (it does when the
        main thread has one pending already, as after SIGSTOP and SIGCONT), and Python
        runs the handler only when the main thread next runs Python, so the wait wakes
        every 0.25 s rather than blocking for good.
        """
        while not self._received:
            time.sleep(_SIGNAL_CHECK_SECONDS)
        return self._received[0]
