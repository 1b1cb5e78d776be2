"""`pdp serve --processes 2` against `--processes 1`: closed-loop Check, side by side.

    python -m benchmarks.processes [--repeats 5] [--seconds 5] [--connections 8] [--in-flight 32] [--json]

Each repeat starts a real `pdp serve` on loopback TCP (port 0) with one process,
then with two (the order swaps every repeat, ABBA, so drift over the run cancels),
and drives it with `pdp loadtest`'s engine in closed loop over several HTTP/2
connections (SO_REUSEPORT balances connections, not calls). The load generator
runs in this process and shares the machine's cores with the server, as the
issue asks. Printed per repeat: both rates, their ratio, each worker's share of
the server CPU (from /proc/PID/stat) and of 32 fresh connections (which worker
answered GetStatus on each); then the median ratio and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from pdp._proto import admission_pb2 as pb
from pdp._proto import admission_pb2_grpc as pb_grpc
from pdp.loadtest.run import LoadSettings, run

ROOT = Path(__file__).resolve().parent.parent
CITY_DB = ROOT / "tests" / "data" / "maxmind" / "test-data" / "GeoIP2-City-Test.mmdb"
RULES = """\
version: 1
rules:
  - id: cn-memorial
    effect: deny
    jurisdiction: [CN]
    meetings: {tags: [memorial]}
    legal_basis: Order 17/2020
"""
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


class Served:
    """A `pdp serve --processes N` on 127.0.0.1:0, up once it prints its banner."""

    def __init__(self, processes: int, rules: Path) -> None:
        argv = [sys.executable, "-m", "pdp", "serve", "--listen", "127.0.0.1:0", "--snapshot", str(rules)]
        argv += ["--geoip-db", str(CITY_DB), "--processes", str(processes), "--log-level", "warning"]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.process.stdout is not None
        banner = self.process.stdout.readline()
        if " listening on " not in banner:
            self.process.kill()
            raise RuntimeError(f"pdp serve did not start: {banner!r}")
        self.target = banner.split(" listening on ", 1)[1].split(": ", 1)[0]
        self.pids = self.worker_pids()

    def worker_pids(self) -> list[int]:
        """The processes that answer: the workers (or the one process), by asking until each index is seen."""
        seen: dict[int, int] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = get_status(self.target)
            seen[status.worker_index] = status.worker_pid
            if len(seen) == status.worker_count:
                return [seen[index] for index in sorted(seen)]
        raise RuntimeError(f"only workers {sorted(seen)} answered in 30 s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.communicate(timeout=60)


def get_status(target: str) -> Any:
    """GetStatus on a fresh connection (its own subchannel pool: never a shared one)."""
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return pb_grpc.AdmissionServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)


def measure(processes: int, rules: Path, options: argparse.Namespace) -> dict[str, Any]:
    served = Served(processes, rules)
    try:
        spread = Counter(get_status(served.target).worker_index for _ in range(32))
        before = [cpu_seconds(pid) for pid in served.pids]
        settings = LoadSettings(
            target=served.target,
            seconds=options.seconds,
            in_flight=options.in_flight,
            connections=options.connections,
            warmup=1.0,
        )
        figures = run(settings)
        cpu = [cpu_seconds(pid) - start for pid, start in zip(served.pids, before, strict=True)]
    finally:
        served.stop()
    return {
        "processes": processes,
        "rate": figures["achieved_rate"],
        "errors": figures["errors"],
        "p50_us": figures["latency_us"].get("p50"),
        "worker_cpu_s": [round(value, 2) for value in cpu],
        "connections_by_worker": [spread.get(index, 0) for index in range(processes)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    load_before = os.getloadavg()
    pairs = []
    with tempfile.TemporaryDirectory() as folder:
        rules = Path(folder) / "rules.yaml"
        rules.write_text(RULES)
        for repeat in range(options.repeats):
            order = (1, 2) if repeat % 2 == 0 else (2, 1)
            results = {n: measure(n, rules, options) for n in order}
            pair = {"one": results[1], "two": results[2], "ratio": round(results[2]["rate"] / results[1]["rate"], 3)}
            pairs.append(pair)
            if not options.json:
                two = results[2]
                print(
                    f"repeat {repeat + 1}: 1 process {results[1]['rate']:,.0f}/s, 2 processes {two['rate']:,.0f}/s,"
                    f" ratio {pair['ratio']:.2f}; 2 workers' CPU {two['worker_cpu_s']} s, 32 connections by worker"
                    f" {two['connections_by_worker']}, errors {results[1]['errors'] or 0} / {two['errors'] or 0}",
                    flush=True,
                )
    summary = {
        "pairs": pairs,
        "median_ratio": statistics.median(pair["ratio"] for pair in pairs),
        "loadavg_before": [round(value, 2) for value in load_before],
        "loadavg_after": [round(value, 2) for value in os.getloadavg()],
        "settings": {"seconds": options.seconds, "connections": options.connections, "in_flight": options.in_flight},
    }
    if options.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"median ratio (2 processes / 1) over {options.repeats} repeats: {summary['median_ratio']:.2f};"
            f" load average before {summary['loadavg_before']}, after {summary['loadavg_after']}"
        )


if __name__ == "__main__":
    main()
