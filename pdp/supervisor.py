"""The supervisor of ``pdp serve --processes N`` (see :mod:`pdp.workers` for the design):
it forks the workers, reports when all of them serve, forks again the ones that
die, and stops them all on SIGTERM or SIGINT.

It never creates a gRPC object, so that it can fork at any time: a worker is
forked from a process whose gRPC core never ran.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdp.config import ServeConfig, parse_listen
from pdp.errors import PdpError
from pdp.listen import prepare_unix_socket
from pdp.workers import Board, Worker, worker_config

if TYPE_CHECKING:
    from pdp.app import Sidecar

__all__ = ["RESTARTS", "RESTART_WINDOW_S", "supervise"]

log = logging.getLogger("pdp.workers")
RESTARTS, RESTART_WINDOW_S = 5, 60.0
_STOP_MARGIN_S = 10.0  # beyond the grace: gRPC's own shutdown bound twice, and the flushes after it


def _reserve(listen: str) -> tuple[str, socket.socket | None]:
    """The TCP address with its port resolved, and the socket holding it; Unix: as given
    (its directory prepared), None.

    :raises OSError: the port is in use (by anyone, with or without SO_REUSEPORT), or the
        socket's directory is not pdp's own.
    """
    host, port = parse_listen(listen)
    if port is None:
        # Here, not in N workers at once: they would race to create the directory.
        prepare_unix_socket(Path(host))
        return listen, None
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    try:
        holder.bind((bare, port))  # without SO_REUSEPORT: refused if anyone has the port
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError as error:
        holder.close()
        raise OSError(f"cannot listen on {listen}: {(error.strerror or str(error)).lower()}") from None
    return f"{host}:{holder.getsockname()[1]}", holder


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGTERM this worker when the supervisor dies (killed, OOM): no orphan keeps the port."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _run_worker(worker: Worker, config: ServeConfig, report: int, describe: Callable[[Sidecar], list[str]]) -> int:
    """The body of a forked worker: start a sidecar, report, serve until signalled."""
    from pdp import workers
    from pdp.app import Sidecar

    workers.set_current(worker)

    attributes = os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    os.environ["OTEL_RESOURCE_ATTRIBUTES"] = ",".join(filter(None, [attributes, f"pdp.worker={worker.index}"]))
    sidecar = Sidecar(config, worker=worker)
    try:
        sidecar.start()
    except PdpError as error:
        _send(report, {"error": str(error)})
        return 2
    except OSError as error:
        _send(report, {"error": f"{error.filename + ': ' if error.filename else ''}{error.strerror or error}"})
        return 2
    _send(report, {"lines": describe(sidecar)})
    sidecar.run_until_signal()
    return 0


def _send(fd: int, message: dict[str, Any]) -> None:
    os.write(fd, json.dumps(message).encode() + b"\n")
    os.close(fd)


@dataclass
class _Child:
    index: int
    pid: int
    report: int  # read end of its start-up report
    ready: bool = False  # its report was read (or it closed the pipe without one)
    lines: list[str] = field(default_factory=list)  # set once it serves: what `pdp serve` prints


class _Supervisor:
    def __init__(self, config: ServeConfig, describe: Callable[[Sidecar], list[str]]) -> None:
        self.config, self.describe = config, describe
        self.count = config.processes
        self.board = Board(self.count)
        self.children: dict[int, _Child] = {}  # by pid
        self.deaths: deque[float] = deque()
        self.stopping = ""
        self.failed = ""
        self.starting = True
        self.exits: list[int] = []
        self.listen = config.listen
        self.reuseport = False
        self.health_listen = ""
        self.health_reuseport = False
        self.holders: list[socket.socket] = []  # the reserved ports; closed in every child
        self.wake_fds: tuple[int, ...] = ()

    def fork(self, index: int) -> None:
        read, write = os.pipe()
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker: nothing of the supervisor's signal plumbing stays
            code = 70
            try:
                signal.set_wakeup_fd(-1)
                for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                    signal.signal(signum, signal.SIG_DFL)
                os.close(read)
                for fd in self.wake_fds:
                    os.close(fd)
                for holder in self.holders:
                    holder.close()
                _die_with_parent(supervisor)
                also = f"{self.config.listen}.0" if index == 0 and not self.reuseport else ""
                worker = Worker(index, self.count, self.board, self.reuseport, also, self.health_reuseport)
                config = worker_config(self.config, self.listen, index, self.health_listen)
                code = _run_worker(worker, config, write, self.describe)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(write)
        self.children[pid] = _Child(index, pid, read)

    def signal_all(self, signum: int) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):  # exited: reaped at the next step
                os.kill(pid, signum)

    def step(self, wake: int, timeout: float | None) -> None:
        """Wait for a signal, a child's exit or a start-up report (or ``timeout``), then handle them."""
        reports = {child.report: child for child in self.children.values() if not child.ready}
        try:
            readable, _, _ = select.select([wake, *reports], [], [], timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            readable = []
        if wake in readable:
            while True:
                try:
                    if not os.read(wake, 512):
                        break
                except BlockingIOError:
                    break
        for fd in readable:
            if fd in reports:
                self._read_report(reports[fd])
        self._reap()

    def _read_report(self, child: _Child) -> None:
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(child.report, 65536)
            if not chunk:
                break
            data += chunk
        os.close(child.report)
        child.ready = True  # nothing more to read: reported, or died (reaped next)
        message = json.loads(data) if data.endswith(b"\n") else {}
        if "lines" in message:
            child.lines = message["lines"]
            log.info("worker %d of %d serving (pid %d)", child.index, self.count, child.pid)
            return
        error = message.get("error", "")
        if error and self.starting:
            self.failed = self.failed or error
        elif error:
            log.error("worker %d (pid %d) could not start: %s", child.index, child.pid, error)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            self.board.mark(child.index, False)
            if not child.ready:
                os.close(child.report)
            if self.stopping:
                self.exits.append(os.waitstatus_to_exitcode(status))
                continue
            self._died(child, status)

    def _died(self, child: _Child, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
        if self.starting:
            self.failed = self.failed or f"worker {child.index} exited with {how} before serving"
            return
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - RESTART_WINDOW_S:
            self.deaths.popleft()
        if len(self.deaths) > RESTARTS:
            self.failed = f"worker {child.index} exited with {how}: over {RESTARTS} deaths in {RESTART_WINDOW_S:g} s"
            log.error("%s; stopping every worker", self.failed)
            return
        log.warning("worker %d (pid %d) exited with %s; starting it again", child.index, child.pid, how)
        self.fork(child.index)

    def stop(self, wake: int) -> bool:
        """SIGTERM every worker and wait for them to drain; True when every one exited 0."""
        self.stopping = self.stopping or "stop"
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_seconds + _STOP_MARGIN_S
        while self.children and (left := deadline - time.monotonic()) > 0:
            self.step(wake, left)
        if self.children:
            log.error("%d worker(s) still running after the grace period: killed", len(self.children))
            self.signal_all(signal.SIGKILL)
            while self.children:
                self.step(wake, 1.0)
        # A worker stopped while it was still starting ends by the signal itself: clean too.
        return all(code in (0, -signal.SIGTERM) for code in self.exits)


def supervise(config: ServeConfig, describe: Callable[[Sidecar], list[str]], ready: Callable[[list[str]], None]) -> int:
    """Run ``config.processes`` workers until SIGTERM or SIGINT; return the exit status
    (0: every worker drained and exited cleanly, 1: a worker failed or kept dying).

    ``describe`` runs in worker 0 once it serves; ``ready`` gets its lines and a line about the workers.

    :raises SetupError: an address cannot be bound, a setting does not suit several
        processes, or a worker could not start (its own error).
    """
    from pdp.app import SetupError
    from pdp.telemetry import exporter_names

    if config.audit_log == "stdout":
        raise SetupError("--audit-log stdout needs --processes 1: give a file, each worker K writes FILE.K")
    if exporter_names(os.environ)[0] == "prometheus":
        # Each worker has its own meter: one port could serve only one of them.
        port = os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT") or "9464"
        raise SetupError(
            f"OTEL_METRICS_EXPORTER=prometheus needs --processes 1: every worker would serve /metrics on port {port};"
            " use otlp, whose series carry the worker as pdp.worker=K"
        )
    supervisor = _Supervisor(config, describe)
    try:
        supervisor.listen, holder = _reserve(config.listen)
        supervisor.reuseport = holder is not None
        supervisor.holders += [holder] if holder is not None else []
        if config.health_listen:
            supervisor.health_listen, holder = _reserve(config.health_listen)
            supervisor.health_reuseport = holder is not None
            supervisor.holders += [holder] if holder is not None else []
    except OSError as error:
        for each in supervisor.holders:
            each.close()
        raise SetupError(str(error)) from None
    wake, wake_in = os.pipe()
    supervisor.wake_fds = (wake, wake_in)
    os.set_blocking(wake, False)
    os.set_blocking(wake_in, False)
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)}

    def stop_requested(signum: int, _frame: object) -> None:
        supervisor.stopping = supervisor.stopping or signal.Signals(signum).name

    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)  # only to write to the wake-up pipe
    signal.signal(signal.SIGTERM, stop_requested)
    signal.signal(signal.SIGINT, stop_requested)
    old_wakeup = signal.set_wakeup_fd(wake_in)
    try:
        return _serve(supervisor, wake, ready)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(wake)
        os.close(wake_in)
        for each in supervisor.holders:
            each.close()


def _serve(supervisor: _Supervisor, wake: int, ready: Callable[[list[str]], None]) -> int:
    from pdp.app import SetupError

    sys.stdout.flush()
    sys.stderr.flush()  # what is buffered now would otherwise be written again by every child
    for index in range(supervisor.count):
        supervisor.fork(index)
    # Until every worker serves; one that fails or dies first sets `failed`.
    while not supervisor.failed and not supervisor.stopping and not all(c.lines for c in supervisor.children.values()):
        supervisor.step(wake, None)
    if supervisor.failed:
        supervisor.stop(wake)
        raise SetupError(supervisor.failed)
    supervisor.starting = False
    if not supervisor.stopping:
        first = next(child for child in supervisor.children.values() if child.index == 0)
        pids = ", ".join(str(child.pid) for child in sorted(supervisor.children.values(), key=lambda c: c.index))
        path = supervisor.config.listen.removeprefix("unix:")
        where = "one SO_REUSEPORT port" if supervisor.reuseport else f"{path}.K"
        ready([*first.lines[:2], f"{supervisor.count} worker processes on {where} (pids {pids})", *first.lines[2:]])
    while not supervisor.failed and not supervisor.stopping:
        supervisor.step(wake, None)
    log.info("%s: stopping %d workers", supervisor.stopping or supervisor.failed, len(supervisor.children))
    clean = supervisor.stop(wake)
    return 0 if clean and not supervisor.failed else 1
