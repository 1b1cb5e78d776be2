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
import asyncio
import functools
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from hdrh.histogram import HdrHistogram

from pdp._proto import admission_pb2 as pb
from pdp._proto import admission_pb2_grpc as pb_grpc

PERCENTILES = (50, 90, 99, 99.9)
MAX_LATENCY_US = 60_000_000


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


async def call_once(method: Any, request: Any, intended: float, recorder: Recorder, timeout: float) -> None:
    try:
        await method(request, timeout=timeout)
        status = "OK"
    except grpc.aio.AioRpcError as error:
        status = error.code().name
    recorder.done(time.perf_counter() - intended, status)


def open_loop(target: str, rpc: str, requests: list[Any], rate: float, seconds: float, recorder: Recorder) -> float:
    """Fixed-rate sending from one thread with sync futures: time.sleep is precise
    to tens of microseconds, where the asyncio timer wakes a millisecond late."""
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.AdmissionServiceStub(channel)
    method = stub.Check if rpc == "check" else stub.CheckBatch
    interval = 1.0 / rate
    total = int(rate * seconds)
    lock = threading.Lock()
    finished = threading.Event()
    outstanding = [total]

    def completed(future: grpc.Future[Any], intended: float) -> None:
        exception = future.exception()
        status = "OK" if exception is None else getattr(exception, "code", lambda: grpc.StatusCode.UNKNOWN)().name
        with lock:
            recorder.done(time.perf_counter() - intended, status)
            outstanding[0] -= 1
            if outstanding[0] == 0:
                finished.set()

    start = time.perf_counter() + 0.05
    for sent in range(total):
        intended = start + sent * interval
        wait = intended - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        future = method.future(requests[sent % len(requests)], timeout=10)
        future.add_done_callback(functools.partial(completed, intended=intended))
    finished.wait(timeout=60)
    elapsed = time.perf_counter() - start
    channel.close()
    return elapsed


async def closed_loop(
    method: Any, requests: list[Any], in_flight: int, seconds: float, recorder: Recorder, max_calls: int = 0
) -> float:
    deadline = time.perf_counter() + seconds
    counter = iter(range(max_calls or 10**12))

    async def caller() -> None:
        while (sent := time.perf_counter()) < deadline:
            number = next(counter, None)
            if number is None:
                return
            await call_once(method, requests[number % len(requests)], sent, recorder, 10)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return time.perf_counter() - started


async def run(options: argparse.Namespace) -> dict[str, Any]:
    addresses = Path(options.addresses).read_text().split() if options.addresses else ["175.16.199.1", "81.2.69.142"]
    requests = build_requests(addresses, options.rpc, options.batch)
    async with grpc.aio.insecure_channel(options.target) as channel:
        stub = pb_grpc.AdmissionServiceStub(channel)
        method = stub.Check if options.rpc == "check" else stub.CheckBatch
        warm = Recorder()
        if options.warmup:
            await closed_loop(method, requests, 4, options.warmup, warm)
        recorder = Recorder()
        if options.mode == "open":
            elapsed = await asyncio.to_thread(
                open_loop, options.target, options.rpc, requests, options.rate, options.seconds, recorder
            )
        else:
            elapsed = await closed_loop(
                method, requests, options.in_flight, options.seconds, recorder, options.max_calls
            )
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
    print(json.dumps(asyncio.run(run(options))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
