"""Load generator for pdp's proto; one process, meant to be pinned to its own core.

    python -m benchmarks.load --target unix:/tmp/pdp.sock --mode open --rate 4000 --seconds 10
    python -m benchmarks.load --target 127.0.0.1:50051 --mode closed --in-flight 16 --rpc batch --batch 100

open:   requests leave at fixed intervals whether or not earlier ones returned;
        latency is measured from each request's *intended* send time, so a
        stalled server shows up in the percentiles (no coordinated omission).
closed: ``--in-flight`` callers each send the next request when the previous
        returns; reports the maximum rate, labelled closed-loop.

Prints one JSON object: calls, decisions, achieved rate, errors by status,
latency percentiles in microseconds (HdrHistogram, 3 significant digits).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from benchmarks.h2client import Connection, grpc_message
from pdp._proto import admission_pb2 as pb

PERCENTILES = (50, 90, 99, 99.9)
MAX_LATENCY_US = 60_000_000
CALL_TIMEOUT_S = 10  # sent as grpc-timeout; calls still out 2 s later count as UNFINISHED


def build_requests(addresses: list[str], rpc: str, batch: int) -> list[Any]:
    meeting = pb.Meeting(meeting_id="m-bench", host_account_id="account-1", tags=["memorial", "tag-7"])
    if rpc == "check":
        return [
            pb.CheckRequest(participant=pb.Participant(ip=ip, user_id="u"), meeting=meeting, action=pb.ACTION_JOIN)
            for ip in addresses
        ]
    requests = []
    for start in range(0, max(len(addresses) - batch, 1), batch):
        people = [pb.Participant(ip=ip) for ip in addresses[start : start + batch]]
        requests.append(pb.CheckBatchRequest(meeting=meeting, participants=people, action=pb.ACTION_JOIN))
    return requests


class Recorder:
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


def open_loop(connection: Connection, messages: list[bytes], rate: float, seconds: float, drain: float) -> float:
    """Calls leave at fixed intervals whether or not earlier ones returned. Calls
    that fell due while the loop was busy leave together, still timed from
    their intended moments; ``select`` sleeps to the microsecond, where
    epoll-based timers (asyncio's) wake a millisecond late."""
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
    connection: Connection, messages: list[bytes], in_flight: int, seconds: float, drain: float, max_calls: int = 0
) -> float:
    """``in_flight`` calls outstanding at all times until ``seconds`` or ``max_calls``."""
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


def _drain(connection: Connection, seconds: float) -> None:
    """Wait for the calls still out; those unanswered by then count as UNFINISHED."""
    deadline = time.perf_counter() + seconds
    while connection.in_flight and (left := deadline - time.perf_counter()) > 0:
        connection.poll(left)
    now = time.perf_counter()
    for started in [*connection.open.values(), *(started for _, started in connection.blocked)]:
        connection.on_done(now - started, "UNFINISHED")
    connection.open.clear()
    connection.blocked.clear()


def run(options: argparse.Namespace) -> dict[str, Any]:
    addresses = Path(options.addresses).read_text().split() if options.addresses else ["175.16.199.1", "81.2.69.142"]
    messages = [grpc_message(request) for request in build_requests(addresses, options.rpc, options.batch)]
    path = "/pdp.v1.AdmissionService/" + ("Check" if options.rpc == "check" else "CheckBatch")
    warm, recorder = Recorder(), Recorder()
    connection = Connection(options.target, path, warm.done, timeout_s=CALL_TIMEOUT_S)
    try:
        if options.warmup:
            closed_loop(connection, messages, 4, options.warmup, CALL_TIMEOUT_S + 2)
        connection.on_done = recorder.done
        if options.mode == "open":
            elapsed = open_loop(connection, messages, options.rate, options.seconds, CALL_TIMEOUT_S + 2)
        else:
            elapsed = closed_loop(
                connection, messages, options.in_flight, options.seconds, CALL_TIMEOUT_S + 2, options.max_calls
            )
    finally:
        connection.close()
    histogram = recorder.histogram
    per_call = options.batch if options.rpc == "batch" else 1
    ok_calls = histogram.get_total_count()
    return {
        "mode": options.mode,
        "rpc": options.rpc,
        "batch": per_call,
        "requested_rate": options.rate if options.mode == "open" else None,
        "in_flight": options.in_flight if options.mode == "closed" else None,
        "seconds": round(elapsed, 3),
        "calls": recorder.calls,
        "decisions": ok_calls * per_call,
        "achieved_rate": round(recorder.calls / elapsed, 1),
        "errors": dict(recorder.errors),
        "latency_us": {f"p{p:g}": histogram.get_value_at_percentile(p) for p in PERCENTILES}
        | {"max": histogram.get_max_value()},
        "curve_us": [[p, histogram.get_value_at_percentile(p)] for p in (1, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9)],
        "client_cpu_seconds": round(time.process_time(), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--rpc", choices=("check", "batch"), default="check")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--mode", choices=("open", "closed"), default="closed")
    parser.add_argument("--rate", type=float, default=1000.0, help="open loop: calls per second")
    parser.add_argument("--in-flight", type=int, default=16, help="closed loop: concurrent callers")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--addresses", help="file of IP addresses to cycle through")
    parser.add_argument("--max-calls", type=int, default=0, help="closed loop: stop after this many calls")
    options = parser.parse_args()
    print(json.dumps(run(options)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
