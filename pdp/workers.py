"""Serving on every core: ``pdp serve --processes N``.

A supervisor forks N workers before any gRPC object exists in it (gRPC's C
core does not survive a fork once it runs: grpc's own multiprocessing example
does the same) and never creates one itself, so that it can fork a replacement
later. Each worker is a whole sidecar (:class:`pdp.app.Sidecar`) that follows
the store and the GeoIP file itself (README, "Serving on every core", says why
rather than one reloader handing compiled snapshots over).

- TCP: every worker binds the same port with ``SO_REUSEPORT`` and the kernel
  spreads *connections* over them. The supervisor binds the port first without
  the option (so a port someone else listens on is refused as with one
  process), then sets it and holds the socket, unlistened, while it runs.
- Unix sockets cannot be shared that way: worker K listens on ``PATH.K`` and
  worker 0 on ``PATH`` too, so a client that knows nothing of workers still works
  (through worker 0) and one that spreads dials ``PATH.0`` .. ``PATH.N-1``.
- Health: one byte per worker in shared memory (:class:`Board`); every
  worker's health service answers SERVING only when every byte says so. The
  supervisor clears the byte of a worker that dies.
- A worker that dies is forked again (:mod:`pdp.supervisor`); more than five deaths
  within a minute stop everything with exit status 1, so that
  the pod's restart policy (and its backoff) takes over a crash loop.
- SIGTERM or SIGINT: every worker drains as one process does; the supervisor
  waits for all of them.
"""

from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from grpc_health.v1 import health, health_pb2

from pdp.config import ServeConfig, parse_listen

if TYPE_CHECKING:
    import grpc

__all__ = ["Board", "SharedHealth", "Worker", "current", "set_current", "worker_config"]

_REFRESH_S = 0.25  # how often Watch streams are told of another worker's change


class Board:
    """One byte per worker (1: serving) in anonymous shared memory, made before the fork."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._bytes = mmap.mmap(-1, count)  # MAP_SHARED | MAP_ANONYMOUS: children write the parent's pages

    def mark(self, index: int, serving: bool) -> None:
        self._bytes[index] = 1 if serving else 0

    def all_serving(self) -> bool:
        return self._bytes[:] == b"\x01" * self.count


@dataclass(frozen=True, slots=True)
class Worker:
    """What a worker knows of itself: its index among ``count``, the board, and
    its listeners: ``reuseport`` on a shared TCP port, ``also`` the second Unix
    socket of worker 0 (``PATH.0``), ``health_reuseport`` for the health port."""

    index: int
    count: int
    board: Board
    reuseport: bool = False
    also: str = ""
    health_reuseport: bool = False  # the --health-listen TCP port is shared too


_current: Worker | None = None


def set_current(worker: Worker) -> None:
    """Called once in a forked worker, before its sidecar starts."""
    global _current
    _current = worker


def current() -> tuple[int, int]:
    """(index, count) of this process among the workers; (0, 1) when it serves alone."""
    return (_current.index, _current.count) if _current is not None else (0, 1)


class SharedHealth(health.HealthServicer):
    """grpc.health.v1 for one worker: SERVING only while this worker and every other one is."""

    def __init__(self, worker: Worker, services: tuple[str, ...]) -> None:
        super().__init__()
        self._worker, self._services = worker, services
        self._own = False
        self._shown: bool | None = None
        self._shown_lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="pdp-shared-health", daemon=True)
        self._thread.start()

    def own(self, serving: bool) -> None:
        """This worker's own state: written to the board, then shown."""
        self._own = serving
        self._worker.board.mark(self._worker.index, serving)
        self.refresh()

    def refresh(self) -> None:
        serving = self._own and self._worker.board.all_serving()
        with self._shown_lock:
            if serving == self._shown:
                return
            self._shown = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in self._services:
            self.set(service, status)  # ignored once shutting down

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.refresh()  # exact for Check; Watch streams learn of other workers within _REFRESH_S
        return super().Check(request, context)

    def enter_graceful_shutdown(self) -> None:
        self._stopped.set()
        self._worker.board.mark(self._worker.index, False)  # the others stop saying SERVING at once
        super().enter_graceful_shutdown()

    def _follow(self) -> None:
        while not self._stopped.wait(_REFRESH_S):
            self.refresh()


def worker_config(config: ServeConfig, listen: str, index: int, health_listen: str = "") -> ServeConfig:
    """Worker ``index``'s settings: its own listener and audit file. A TCP health
    port (``health_listen``, its port resolved) is shared by every worker, as the
    main one is; a Unix one, and AuthZEN, are worker 0's only."""
    host, port = parse_listen(listen)
    own = listen if port is not None or index == 0 else f"unix:{host}.{index}"  # worker 0: PATH and PATH.0
    audit = f"{config.audit_log}.{index}" if config.audit_log else ""
    first = index == 0
    return replace(
        config,
        listen=own,
        audit_log=audit,
        health_listen=_health_listen(config.health_listen, health_listen, first),
        http_listen=config.http_listen if first else "",
    )


def _health_listen(configured: str, resolved: str, first: bool) -> str:
    if not configured:
        return ""
    if parse_listen(configured)[1] is not None:
        return resolved or configured  # every worker, one SO_REUSEPORT port
    return configured if first else ""
