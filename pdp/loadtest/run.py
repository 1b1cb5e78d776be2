"""Open- and closed-loop load against a pdp server, timed into an HdrHistogram.

Open loop: calls leave at fixed intervals whether or not earlier ones returned,
and each latency counts from the call's *intended* send time, so a stalled
server shows in the percentiles instead of slowing the sender (no coordinated
omission). Closed loop: ``in_flight`` callers each send the next call when the
previous one returns; it measures the maximum rate, not latency under load.

Raises :class:`FileNotFoundError`/:class:`ValueError` for an unreadable or empty
participants file and :class:`pdp.loadtest.h2.ProtocolError` when the server
breaks the connection.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from pdp._proto import admission_pb2 as pb
from pdp.loadtest.h2 import Connection, Pool, grpc_message

PERCENTILES = (50, 90, 99, 99.9)
CURVE = (1, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9)
MAX_LATENCY_US = 60_000_000
CALL_TIMEOUT_S = 10  # sent as grpc-timeout; calls still out 2 s after the last send count as UNFINISHED
DEFAULT_ADDRESSES = ("175.16.199.1", "81.2.69.142")  # mainland China and the UK in MaxMind's test database


@dataclass(frozen=True, slots=True)
class LoadSettings:
    """One load run. ``rate`` > 0 means open loop at that many calls per second;
    otherwise closed loop with ``in_flight`` callers."""

    target: str
    seconds: float
    rate: float = 0.0
    in_flight: int = 16
    batch: int = 0  # 0: Check; N: CheckBatch of N participants
    addresses: tuple[str, ...] = DEFAULT_ADDRESSES
    warmup: float = 1.0
    max_calls: int = 0  # closed loop: stop after this many calls (0: no limit)
    tags: tuple[str, ...] = ("memorial",)
    connections: int = 1  # HTTP/2 connections the calls are spread over


def read_participants(path: str | Path) -> tuple[str, ...]:
    """Addresses from a file, one per line; blank lines and ``#`` comments are skipped.

    Raises ValueError naming the file and line of the first address that is not one,
    or when the file holds none.
    """
    addresses = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"{path}:{number}: {text!r} is not an IPv4 or IPv6 address") from None
        addresses.append(text)
    if not addresses:
        raise ValueError(f"{path}: no addresses (one IPv4 or IPv6 address per line)")
    return tuple(addresses)


def build_requests(addresses: Sequence[str], batch: int, tags: Sequence[str] = ("memorial",)) -> list[Any]:
    """Check requests (``batch`` 0) or CheckBatch requests of ``batch`` participants, cycling addresses."""
    meeting = pb.Meeting(meeting_id="m-loadtest", host_account_id="account-1", tags=list(tags))
    if batch <= 0:
        return [
            pb.CheckRequest(participant=pb.Participant(ip=ip, user_id="u"), meeting=meeting, action=pb.ACTION_JOIN)
            for ip in addresses
        ]
    requests = []
    for start in range(0, max(len(addresses) - batch, 1), batch):
        people = [pb.Participant(ip=addresses[(start + n) % len(addresses)]) for n in range(batch)]
        requests.append(pb.CheckBatchRequest(meeting=meeting, participants=people, action=pb.ACTION_JOIN))
    return requests


class Recorder:
    """Latencies of successful calls in an HdrHistogram; failures counted by status."""

    def __init__(self) -> None:
        self.histogram = HdrHistogram(1, MAX_LATENCY_US, 3)
        self.errors: Counter[str] = Counter()
        self.calls = 0

    def done(self, seconds: float, status: str) -> None:
        self.calls += 1
        if status == "OK":
            self.histogram.record_value(max(1, min(int(seconds * 1e6), MAX_LATENCY_US)))
        else:
            self.errors[status] += 1


def open_loop(connection: Connection | Pool, messages: list[bytes], rate: float, seconds: float, drain: float) -> float:
    """Send ``rate`` calls a second for ``seconds``; return the elapsed time.

    Calls that fell due while the loop was busy leave together, still timed from
    their intended moments; ``select`` sleeps to the microsecond, where
    epoll-based timers (asyncio's) wake a millisecond late.
    """
    interval = 1.0 / rate
    total = int(rate * seconds)
    start = time.perf_counter() + 0.01
    sent = 0
    while sent < total:
        now = time.perf_counter()
        while sent < total and (intended := start + sent * interval) <= now:
            connection.call(messages[sent % len(messages)], intended)
            sent += 1
        connection.poll(start + sent * interval - time.perf_counter() if sent < total else 0.0)
    _drain(connection, drain)
    return time.perf_counter() - start


def closed_loop(
    connection: Connection | Pool,
    messages: list[bytes],
    in_flight: int,
    seconds: float,
    drain: float,
    max_calls: int = 0,
) -> float:
    """Keep ``in_flight`` calls outstanding until ``seconds`` or ``max_calls``; return the elapsed time."""
    started = time.perf_counter()
    deadline = started + seconds
    limit = max_calls or 10**12
    sent = 0
    while (now := time.perf_counter()) < deadline and sent < limit:
        while connection.in_flight < in_flight and sent < limit:
            connection.call(messages[sent % len(messages)], now)
            sent += 1
        connection.poll(deadline - now)
    _drain(connection, drain)
    return time.perf_counter() - started


def _drain(connection: Connection | Pool, seconds: float) -> None:
    """Wait for the calls still out; those unanswered by then count as UNFINISHED."""
    deadline = time.perf_counter() + seconds
    while connection.in_flight and (left := deadline - time.perf_counter()) > 0:
        connection.poll(left)
    connection.abandon(time.perf_counter())


def run(settings: LoadSettings, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one load test and return its figures (JSON-ready; latencies in µs).

    Raises OSError when the target cannot be reached.
    """
    messages = [grpc_message(request) for request in build_requests(settings.addresses, settings.batch, settings.tags)]
    path = "/pdp.v1.AdmissionService/" + ("CheckBatch" if settings.batch > 0 else "Check")
    warm, recorder = Recorder(), Recorder()
    connection: Connection | Pool
    if settings.connections == 1:
        connection = Connection(settings.target, path, warm.done, timeout_s=CALL_TIMEOUT_S)
    else:
        members = [Connection(settings.target, path, warm.done, timeout_s=CALL_TIMEOUT_S)]
        try:
            while len(members) < settings.connections:
                members.append(Connection(settings.target, path, warm.done, timeout_s=CALL_TIMEOUT_S))
        except OSError:
            for member in members:
                member.close()
            raise
        connection = Pool(members)
    try:
        if settings.warmup > 0:
            if on_progress:
                on_progress(f"warming up for {settings.warmup:g} s")
            closed_loop(connection, messages, 4, settings.warmup, CALL_TIMEOUT_S + 2)
        connection.on_done = recorder.done
        if on_progress:
            on_progress(f"measuring for {settings.seconds:g} s")
        if settings.rate > 0:
            elapsed = open_loop(connection, messages, settings.rate, settings.seconds, CALL_TIMEOUT_S + 2)
        else:
            elapsed = closed_loop(
                connection, messages, settings.in_flight, settings.seconds, CALL_TIMEOUT_S + 2, settings.max_calls
            )
    finally:
        connection.close()
    return _figures(settings, recorder, elapsed)


def _figures(settings: LoadSettings, recorder: Recorder, elapsed: float) -> dict[str, Any]:
    histogram = recorder.histogram
    per_call = max(settings.batch, 1)
    ok_calls = histogram.get_total_count()
    latency = {f"p{p:g}": histogram.get_value_at_percentile(p) for p in PERCENTILES} if ok_calls else {}
    return {
        "target": settings.target,
        "mode": "open" if settings.rate > 0 else "closed",
        "rpc": "CheckBatch" if settings.batch > 0 else "Check",
        "batch": per_call,
        "requested_rate": settings.rate if settings.rate > 0 else None,
        "in_flight": None if settings.rate > 0 else settings.in_flight,
        "connections": settings.connections,
        "seconds": round(elapsed, 3),
        "calls": recorder.calls,
        "ok": ok_calls,
        "decisions": ok_calls * per_call,
        "achieved_rate": round(recorder.calls / elapsed, 1) if elapsed > 0 else 0.0,
        "errors": dict(recorder.errors),
        "latency_us": latency | ({"max": histogram.get_max_value()} if ok_calls else {}),
        "curve_us": [[p, histogram.get_value_at_percentile(p)] for p in CURVE] if ok_calls else [],
        "client_cpu_seconds": round(time.process_time(), 3),
    }
