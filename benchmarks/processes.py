"""`pdp serve --processes 2` against `--processes 1`: closed-loop Check, side by side.

    python -m benchmarks.processes [--repeats 5] [--slices 4] [--seconds 2] [--connections 8] [--in-flight 32] [--json]
    python -m benchmarks.processes --activations 5 [--rules 10000]

Each repeat starts two real `pdp serve` on loopback TCP (port 0), one with
`--processes 1` and one with `--processes 2`, and loads them in turn: ``--slices``
closed-loop slices of ``--seconds`` each, alternating ABBA (the first server swaps
every repeat), so that both see the same machine within seconds of each other
(the one not loaded is idle). The load is `pdp loadtest`'s engine over several
HTTP/2 connections (SO_REUSEPORT balances connections, not calls), run in this
process: it shares the machine's cores with the servers, as issue 18 asks.
Printed per repeat: both rates, their ratio, calls per server CPU-second, each
worker's CPU (from /proc/PID/stat) and its share of 32 fresh connections (which
worker answered GetStatus on each); then the median ratio and the load average.

``--activations K`` measures instead what each worker following the store costs
(README, "Serving on every core"): two workers follow one file snapshot of
``--rules`` rules; per one-rule change, each worker's CPU, the time between the
first and the last worker serving it (the consistency window), each process's
RSS; and, for the design not taken (one reloader compiling once and handing the
compiled policy over), what pickling and unpickling the compiled policy costs
next to compiling it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from benchmarks.harness import ROOT, cpu_seconds
from pdp._proto import admission_pb2 as pb
from pdp._proto import admission_pb2_grpc as pb_grpc
from pdp.loadtest.h2 import grpc_message
from pdp.loadtest.run import DEFAULT_ADDRESSES, LoadSettings, build_requests, run

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
CHECK_PATH = "/pdp.v1.AdmissionService/Check"


class Served:
    """A `pdp serve --processes N` on 127.0.0.1:0, up once it prints its banner."""

    def __init__(self, processes: int, rules: Path, log: Path | None = None) -> None:
        argv = [sys.executable, "-m", "pdp", "serve", "--listen", "127.0.0.1:0", "--snapshot", str(rules)]
        argv += ["--geoip-db", str(CITY_DB), "--processes", str(processes), "--log-format", "text"]
        argv += ["--log-level", "info" if log else "warning"]
        errors = log.open("w") if log else subprocess.DEVNULL
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True)
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


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _watch(channels: list[grpc.Channel], version: int, seconds: float) -> dict[int, float]:
    """Ask every worker's GetStatus each 10 ms until all serve ``version`` or ``seconds`` pass:
    index -> seconds until it did."""
    started = time.perf_counter()
    seen: dict[int, float] = {}
    while len(seen) < len(channels) and time.perf_counter() < started + seconds:
        for index, on in enumerate(channels):
            if index not in seen:
                answer = pb_grpc.AdmissionServiceStub(on).GetStatus(pb.GetStatusRequest(), timeout=10)
                if answer.policy_version == version:
                    seen[index] = time.perf_counter() - started
        time.sleep(0.01)  # the probe's pace (the window's resolution), not a synchronisation
    return seen


def one_activation(served: Served, channels: list[grpc.Channel], path: Path, version: int) -> dict[str, Any]:
    """Publish ``version`` (one rule changed) by rename; time each worker's switch, and its CPU
    beyond what it spends idle under the same probe (measured for a second just before)."""
    document = json.loads(path.read_bytes())
    document["version"] = version
    document["rules"][version % len(document["rules"])]["legal_basis"] += " (amended)"
    staged = path.with_name(".staged")
    staged.write_text(json.dumps(document))
    before = [cpu_seconds(pid) for pid in served.pids]
    _watch(channels, -1, 1.0)
    idle = [cpu_seconds(pid) - start for pid, start in zip(served.pids, before, strict=True)]  # per second
    before = [cpu_seconds(pid) for pid in served.pids]
    published = time.perf_counter()
    staged.replace(path)
    seen = _watch(channels, version, 60)
    elapsed = time.perf_counter() - published
    spent = [cpu_seconds(pid) - start for pid, start in zip(served.pids, before, strict=True)]
    return {
        "seconds_to_serve": [round(seen.get(i, -1), 3) for i in range(len(channels))],
        "window_s": round(max(seen.values()) - min(seen.values()), 3),
        "worker_cpu_s": [round(max(cpu - rate * elapsed, 0.0), 3) for cpu, rate in zip(spent, idle, strict=True)],
    }


def handoff_cost(data: bytes) -> dict[str, float]:
    """CPU seconds to compile the snapshot, and to pickle and unpickle the compiled policy (the design not taken)."""
    import pickle

    from pdp.rules import parse_policy

    started = time.process_time()
    policy = parse_policy(data, "handoff.json")
    compiled = time.process_time() - started
    started = time.process_time()
    blob = pickle.dumps(policy, protocol=pickle.HIGHEST_PROTOCOL)
    dumped = time.process_time() - started
    started = time.process_time()
    pickle.loads(blob)  # noqa: S301 - bytes this function has just made
    loaded = time.process_time() - started
    return {"compile_s": round(compiled, 3), "pickle_s": round(dumped, 3), "unpickle_s": round(loaded, 3),
            "pickle_mb": round(len(blob) / 1e6, 1)}  # fmt: skip


def activations(options: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.inprocess import make_rules

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rules.json"
        data = make_rules(options.rules)
        path.write_bytes(data)
        single = Served(1, path)
        single_rss = rss_mib(single.pids[0])
        single.stop()
        log = Path(folder) / "serve.log"
        served = Served(2, path, log)
        try:
            supervisor_rss = rss_mib(served.process.pid)
            channels = [channel for _, channel in sorted(worker_channels(served.target).items())]
            runs = [one_activation(served, channels, path, version) for version in range(2, 2 + options.activations)]
            worker_rss = [rss_mib(pid) for pid in served.pids]
        finally:
            served.stop()
        compiled = [
            int(ms) for ms in re.findall(r"activated policy version [0-9]+ .* compiled in ([0-9]+) ms", log.read_text())
        ]
    return {
        "rules": options.rules,
        "runs": runs,
        "median_window_s": statistics.median(run["window_s"] for run in runs),
        "median_worker_cpu_s": statistics.median(cpu for run in runs for cpu in run["worker_cpu_s"]),
        # each worker's own log line per activation ("compiled in N ms", wall time of the compile):
        "compile_ms_first_then_changes": [*compiled[:2], statistics.median(compiled[2:])]
        if len(compiled) > 2
        else compiled,
        "rss_mib": {"one_process": single_rss, "supervisor": supervisor_rss, "workers": worker_rss},
        "handoff": handoff_cost(data),
        "loadavg": [round(value, 2) for value in os.getloadavg()],
    }


def worker_channels(target: str) -> dict[int, grpc.Channel]:
    """One open connection per worker, found by opening connections until each index answered."""
    found: dict[int, grpc.Channel] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        candidate = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        answer = pb_grpc.AdmissionServiceStub(candidate).GetStatus(pb.GetStatusRequest(), timeout=10)
        if answer.worker_index in found:
            candidate.close()
        else:
            found[answer.worker_index] = candidate
        if len(found) == answer.worker_count:
            return found
    raise RuntimeError(f"only workers {sorted(found)} answered in 30 s")


def get_status(target: str) -> Any:
    """GetStatus on a fresh connection (its own subchannel pool: never a shared one)."""
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return pb_grpc.AdmissionServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)


def _slice(served: Served, options: argparse.Namespace) -> tuple[dict[str, Any], list[float]]:
    """One closed-loop slice against ``served``: the load figures and each worker's CPU."""
    before = [cpu_seconds(pid) for pid in served.pids]
    if options.generator == "h2load":
        figures = _h2load(served.target, options)
    else:
        settings = LoadSettings(
            target=served.target,
            seconds=options.seconds,
            in_flight=options.in_flight,
            connections=options.connections,
            warmup=0.5,
        )
        figures = run(settings)
    return figures, [cpu_seconds(pid) - start for pid, start in zip(served.pids, before, strict=True)]


def _h2load(target: str, options: argparse.Namespace) -> dict[str, Any]:
    """The same closed loop from nghttp2's h2load, a C client that leaves the servers more of
    the cores. It sees HTTP statuses only: a gRPC error (HTTP 200, grpc-status in the
    trailers) counts as done, which the engine's runs, counting by gRPC status, do not."""
    streams = max(1, options.in_flight // options.connections)
    argv = ["h2load", "-D", f"{max(1, round(options.seconds))}", "--warm-up-time", "1", "-t", "1"]  # whole seconds
    argv += ["-c", str(options.connections), "-m", str(streams), "--data", str(options.body)]
    argv += ["-H", "content-type: application/grpc", "-H", "te: trailers", f"http://{target}{CHECK_PATH}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=options.seconds + 60).stdout
    finished = re.search(r"finished in ([0-9.]+)s", out)
    done = re.search(r"requests: [0-9]+ total, [0-9]+ started, ([0-9]+) done, [0-9]+ succeeded, ([0-9]+) failed", out)
    if finished is None or done is None:
        raise RuntimeError(f"h2load said: {out}")
    failed = int(done.group(2))
    return {
        "calls": int(done.group(1)),
        "seconds": float(finished.group(1)),
        "errors": {"HTTP": failed} if failed else {},
    }


@dataclass
class _Totals:
    processes: int
    calls: int = 0
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    cpu: list[float] = field(default_factory=list)

    def add(self, figures: dict[str, Any], cpu: list[float]) -> None:
        self.calls += figures["calls"]
        self.seconds += figures["seconds"]
        self.errors.update(figures["errors"])
        self.cpu = [a + b for a, b in zip(self.cpu or [0.0] * len(cpu), cpu, strict=True)]


def measure_pair(rules: Path, options: argparse.Namespace, first: int) -> dict[int, dict[str, Any]]:
    """Both servers up at once, idle but for the slice that loads one of them: ``--slices``
    slices each, alternating (ABBA from ``first``), so that the two see the same machine."""
    served = {n: Served(n, rules) for n in (1, 2)}
    totals = {n: _Totals(n) for n in (1, 2)}
    try:
        spread = Counter(get_status(served[2].target).worker_index for _ in range(32))
        for number in range(options.slices):
            order = (first, 3 - first) if number % 2 == 0 else (3 - first, first)
            for n in order:
                totals[n].add(*_slice(served[n], options))
    finally:
        for each in served.values():
            each.stop()
    return {
        n: {
            "processes": n,
            "rate": round(total.calls / total.seconds, 1),
            "errors": dict(total.errors),
            "worker_cpu_s": [round(value, 2) for value in total.cpu],
            "calls_per_server_cpu_s": round(total.calls / sum(total.cpu), 1) if sum(total.cpu) else 0.0,
            "connections_by_worker": [spread.get(index, 0) for index in range(n)] if n == 2 else [32],
        }
        for n, total in totals.items()
    }


def _pair_line(number: int, one: dict[str, Any], two: dict[str, Any], ratio: float) -> str:
    return (
        f"repeat {number}: 1 process {one['rate']:,.0f}/s, 2 processes {two['rate']:,.0f}/s, ratio {ratio:.2f};"
        f" calls per server CPU-second {one['calls_per_server_cpu_s']:,.0f} / {two['calls_per_server_cpu_s']:,.0f};"
        f" 2 workers' CPU {two['worker_cpu_s']} s, 32 connections by worker {two['connections_by_worker']},"
        f" errors {one['errors'] or 0} / {two['errors'] or 0}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one slice")
    parser.add_argument("--slices", type=int, default=4, help="slices per server per repeat")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--generator", choices=("engine", "h2load"), default="engine", help="the load generator")
    parser.add_argument("--activations", type=int, default=0, help="measure following the store instead")
    parser.add_argument("--rules", type=int, default=10_000, help="--activations: rules in the snapshot")
    options = parser.parse_args()
    if options.activations:
        print(json.dumps(activations(options), indent=2))
        return
    load_before = os.getloadavg()
    pairs = []
    with tempfile.TemporaryDirectory() as folder:
        rules = Path(folder) / "rules.yaml"
        rules.write_text(RULES)
        options.body = Path(folder) / "check.bin"
        options.body.write_bytes(grpc_message(build_requests(DEFAULT_ADDRESSES[:1], 0)[0]))
        for repeat in range(options.repeats):
            results = measure_pair(rules, options, first=1 if repeat % 2 == 0 else 2)
            pair = {"one": results[1], "two": results[2], "ratio": round(results[2]["rate"] / results[1]["rate"], 3)}
            pairs.append(pair)
            if not options.json:
                print(_pair_line(repeat + 1, results[1], results[2], pair["ratio"]), flush=True)
    summary = {
        "pairs": pairs,
        "median_ratio": statistics.median(pair["ratio"] for pair in pairs),
        "loadavg_before": [round(value, 2) for value in load_before],
        "loadavg_after": [round(value, 2) for value in os.getloadavg()],
        "settings": {
            "seconds": options.seconds,
            "slices": options.slices,
            "connections": options.connections,
            "in_flight": options.in_flight,
            "generator": options.generator,
        },
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
