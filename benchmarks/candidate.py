"""What a candidate in shadow costs: Check with and without ``--candidate-snapshot``, side by side.

    python -m benchmarks.candidate [--rate 1000] [--duration 5] [--repeat 5] [--out DIR]

Two sidecars, both pinned to the server core and both loaded all along, serve
the same 10,000-rule snapshot on the real GeoLite2-City (the ``demo`` extra);
one also follows a candidate that differs in one rule, so that the shadow flips
part of the traffic. ``pdp loadtest`` (pinned to the client core) sends open-loop
Check at ``--rate`` to each in turn, repeat after repeat, so that drift of the
shared machine hits both alike. Writes ``without.json`` and ``with.json`` (the
``{"runs": [...]}`` form of ``pdp loadtest --repeat N --json``), then prints
``python -m benchmarks.compare without.json with.json`` and the p50 ratio.
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
from pathlib import Path
from typing import Any

from benchmarks import inprocess
from benchmarks.harness import CLIENT_CORE, ROOT, Server, pdp_serve, pinned

CANDIDATE_RULE = {
    "id": "candidate-gb-memorial",
    "effect": "deny",
    "jurisdiction": ["GB"],
    "meetings": {"tags": ["memorial"]},
    "legal_basis": "benchmark candidate",
}


def snapshots(folder: Path) -> tuple[Path, Path]:
    """The active snapshot (10,000 rules) and a candidate adding one GB rule."""
    data = inprocess.make_rules(10_000)
    active = folder / "active.json"
    active.write_bytes(data)
    document = json.loads(data)
    document = {**document, "version": document["version"] + 1, "rules": [*document["rules"], CANDIDATE_RULE]}
    candidate = folder / "candidate.json"
    candidate.write_text(json.dumps(document))
    return active, candidate


def loadtest(server: Server, participants: Path, rate: int, duration: float) -> dict[str, Any]:
    """One ``pdp loadtest`` run against ``server``, with the server's CPU per call
    (every thread, the shadow's included: what a candidate costs in all)."""
    command = [sys.executable, "-m", "pdp", "loadtest", "--target", server.address, "--rate", str(rate),
               "--duration", str(duration), "--participants", str(participants), "--json"]  # fmt: skip
    cpu = server.cpu_seconds()
    done = subprocess.run(pinned(CLIENT_CORE, command), capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode not in (0, 1):  # 1: some calls failed, which the result counts
        raise RuntimeError(f"pdp loadtest failed ({done.returncode}): {done.stderr[-2000:]}{done.stdout[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    result["server_cpu_us_per_call"] = round((server.cpu_seconds() - cpu) / result["calls"] * 1e6, 1)
    return result


def summary(runs: dict[str, list[dict[str, Any]]], rate: int, load: tuple[float, float]) -> list[str]:
    p50 = {name: statistics.median(r["latency_us"]["p50"] for r in rs) for name, rs in runs.items()}
    cpu = {name: statistics.median(r["server_cpu_us_per_call"] for r in rs) for name, rs in runs.items()}
    repeats = len(runs["without"])
    return [
        f"Check p50, median of {repeats} repeats at {rate}/s: without {p50['without']:.0f} µs, "
        f"with a candidate {p50['with']:.0f} µs: {p50['with'] / p50['without']:.3f}×",
        f"server CPU per call (every thread): without {cpu['without']:.0f} µs, with {cpu['with']:.0f} µs: "
        f"{cpu['with'] / cpu['without']:.3f}×",
        f"load average {load[0]:.1f} before, {load[1]:.1f} after",
    ]


def in_process(active: Path, candidate: Path, addresses: list[str], rounds: int = 7) -> list[str]:
    """The request path alone, without gRPC: DecisionPath.check with and without a
    candidate, alternating rounds; and what the shadow thread pays per decision."""
    from pdp.candidate import CandidateShadow
    from pdp.decisions import DecisionPath, Outcome
    from pdp.geo import GeoDatabase, demo_database_path
    from pdp.model import Meeting
    from pdp.rules import load_policy
    from pdp.servicer import CHECK
    from pdp.state import PolicyHolder

    holder, shadow_holder = PolicyHolder(), PolicyHolder()
    holder.activate(load_policy(active), GeoDatabase(demo_database_path()), "bench")
    shadow_holder.activate_policy(load_policy(candidate), "bench")
    shadow = CandidateShadow(shadow_holder, queue_size=10**7)
    shadow.close()  # its thread stopped: the rounds measure the request path alone, drain() the rest
    paths = {"without": DecisionPath(holder), "with": DecisionPath(holder, candidate=shadow)}
    meeting = Meeting("m-1", "account-1", frozenset({"memorial"}))
    per_call: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            started = time.perf_counter()
            for ip in addresses:
                path.check(ip, "u", "a", meeting, 1, endpoint=CHECK, present=Outcome)
            per_call[name].append((time.perf_counter() - started) / len(addresses) * 1e6)
    started = time.perf_counter()
    shadow.drain()
    worker = (time.perf_counter() - started) / (len(addresses) * rounds) * 1e6
    without, with_ = statistics.median(per_call["without"]), statistics.median(per_call["with"])
    return [
        f"in process, request path per Check: without {without:.2f} µs, with a candidate {with_:.2f} µs "
        f"(+{with_ - without:.2f} µs); the shadow thread then decides each again in {worker:.2f} µs"
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=1000, help="Check calls per second (default 1000)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per repeat (default 5)")
    parser.add_argument("--repeat", type=int, default=5, help="repeats per side (default 5)")
    parser.add_argument("--in-process-only", action="store_true", help="only the request path, without gRPC")
    parser.add_argument("--out", type=Path, help="where to write without.json and with.json (default a temp dir)")
    options = parser.parse_args(argv)
    folder = options.out or Path(tempfile.mkdtemp(prefix="pdp-candidate-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    active, candidate = snapshots(folder)
    participants = folder / "participants.txt"
    addresses = inprocess.located_addresses(2_000)
    participants.write_text("\n".join(addresses) + "\n")
    print("\n".join(in_process(active, candidate, addresses * 10)))
    if options.in_process_only:
        return 0
    servers = {
        "without": pdp_serve(f"unix:{folder}/without.sock", active),
        "with": pdp_serve(f"unix:{folder}/with.sock", active, "--candidate-snapshot", str(candidate)),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    load_before = os.getloadavg()[0]
    try:
        for _ in range(options.repeat):
            for name, server in servers.items():
                runs[name].append(loadtest(server, participants, options.rate, options.duration))
    finally:
        for server in servers.values():
            server.stop()
    for name, results in runs.items():
        (folder / f"{name}.json").write_text(json.dumps({"runs": results}, indent=2))
    print("\n".join(summary(runs, options.rate, (load_before, os.getloadavg()[0]))))
    compared = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", str(folder / "without.json"), str(folder / "with.json")],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    print(compared.stdout, end="")
    print(f"results in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
