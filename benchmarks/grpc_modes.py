"""Sync versus asyncio gRPC, side by side in one run, plus pdp's real Check.

    python -m benchmarks.grpc_modes [--seconds 4] [--repeats 3]

Starts, one after the other on a Unix socket: the floor server in sync mode,
the same with pdp's receive guard (pdp.receiving), the floor in aio mode, and
`pdp serve` (sync) on the demo database. Each
server is pinned to core 0 and driven closed-loop by a grpc.aio client pinned
to core 1, at 1 and at 16 calls in flight. Reports calls/s and p50/p99 in µs
(median over repeats). Closed-loop figures: this decides the server mode and
shows the decision's share; open-loop latency belongs to the full suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from pdp._proto import admission_pb2 as pb
from pdp._proto import admission_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
REQUEST = pb.CheckRequest(
    participant=pb.Participant(ip="175.16.199.1", user_id="u-1"),
    meeting=pb.Meeting(meeting_id="m-1", tags=["memorial"]),
    action=pb.ACTION_JOIN,
)


def pinned(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv] if os.cpu_count() and os.cpu_count() > 1 else argv  # type: ignore[operator]


def start(argv: list[str]) -> subprocess.Popen[str]:
    process = subprocess.Popen(pinned(0, argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"server did not start: {argv}")
    return process


async def drive(target: str, in_flight: int, seconds: float) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        check = pb_grpc.AdmissionServiceStub(channel).Check
        for _ in range(300):
            await check(REQUEST)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while (sent := time.perf_counter()) < deadline:
                await check(REQUEST)
                latencies.append(time.perf_counter() - sent)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "calls_per_s": len(latencies) / elapsed,
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
    }


def client_main(target: str, in_flight: int, seconds: float) -> None:
    result = asyncio.run(drive(target, in_flight, seconds))
    print(" ".join(f"{key}={value:.1f}" for key, value in result.items()))


def measure(target: str, in_flight: int, seconds: float) -> dict[str, float]:
    argv = [sys.executable, "-m", "benchmarks.grpc_modes", "--client", target, str(in_flight), str(seconds)]
    output = subprocess.run(pinned(1, argv), capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return {key: float(value) for key, value in (pair.split("=") for pair in output.split())}


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--client":
        client_main(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="pdp-bench-")
    servers = {
        "floor sync": [sys.executable, "-m", "benchmarks.floor_server", "--mode", "sync"],
        "floor sync, guarded": [sys.executable, "-m", "benchmarks.floor_server", "--mode", "sync-guarded"],
        "floor aio": [sys.executable, "-m", "benchmarks.floor_server", "--mode", "aio"],
        "pdp Check (sync)": [
            sys.executable, "-m", "pdp", "serve", "--geoip-db", "demo",
            "--snapshot", str(ROOT / "examples" / "rules.yaml"),
        ],
    }  # fmt: skip
    results: dict[str, dict[int, list[dict[str, float]]]] = {name: {1: [], 16: []} for name in servers}
    for repeat in range(options.repeats):
        for name, argv in servers.items():
            target = f"unix:{folder}/{name.split()[0]}-{repeat}.sock"
            process = start([*argv, "--listen", target])
            try:
                for in_flight in (1, 16):
                    results[name][in_flight].append(measure(target, in_flight, options.seconds))
            finally:
                process.terminate()
                process.wait(timeout=30)
    print(
        f"# closed loop, Unix socket, server on core 0, client on core 1, median of {options.repeats} x "
        f"{options.seconds:.0f}s; Python {sys.version.split()[0]}, grpcio {grpc.__version__}"
    )
    print(f"{'server':<20} {'in flight':>9} {'calls/s':>9} {'p50 µs':>8} {'p99 µs':>8}")
    summary: dict[str, Any] = {}
    for name, by_flight in results.items():
        for in_flight, runs in by_flight.items():
            row = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            summary[f"{name} @{in_flight}"] = row
            print(f"{name:<20} {in_flight:>9} {row['calls_per_s']:>9.0f} {row['p50_us']:>8.0f} {row['p99_us']:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
