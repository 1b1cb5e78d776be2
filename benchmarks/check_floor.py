"""pdp's Check against the floor, both floors, side by side in one run (issue 18's first target).

    python -m benchmarks.check_floor [--repeats 5] [--seconds 4] [--share 0.5] [--out DIR] [--baseline TREE]

Starts three servers on Unix sockets, each pinned to the server core: the bare
floor (``floor_server --mode sync``), the floor built exactly like `pdp serve`
(``--mode sync-guarded``: same pool, channel options and receive guard) and
`pdp serve` itself, on the suite's 10,000-rule snapshot and 20,000 located
addresses of the demo GeoLite2-City. The suite's load generator
(``benchmarks.load``, the ``pdp/loadtest`` engine, pinned to the client core)
then runs, repeat after repeat with the three servers taken in turn so that the
shared machine's drift hits them alike:

1. closed loop, 16 calls in flight: each server's maximum (median of the repeats), and
   pdp's ratio to each other server repeat by repeat (median of those pairs);
2. open loop at ``--share`` of the bare floor's maximum, the same rate for all three:
   p50 and p99 from each call's intended send time (median of the repeats).

``--baseline TREE`` adds a fourth server, `pdp serve` run from another checkout
(``git worktree add /tmp/old main``): its own ``pdp`` package, this one's
interpreter and packages, so that a change is measured against the code before it in
the same run, interleaved like the rest, and pdp/baseline is printed too.

Prints the ratios pdp/floor against both floors and writes them, with every run,
to ``results/<date>-<HHMM>-check-floor.{json,md}``. Every server first answers one
pass over all the addresses, unmeasured: what is compared is the steady state.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import inprocess
from benchmarks.harness import Server, pdp_serve, run_header, run_load, stolen, stolen_share, write_results

RESULTS = Path(__file__).resolve().parent / "results"
SERVERS = ("floor", "floor-guarded", "pdp")
BASELINE = "pdp-baseline"
KEYS = ("p50", "p90", "p99", "p99.9")
ADDRESSES = 20_000
TARGETS = {"closed_max": 0.90, "p50": 1.05, "p99": 1.20}  # pdp/floor: at least, at most, at most


def start(name: str, folder: Path, snapshot: Path, baseline: Path | None) -> Server:
    listen = f"unix:{folder}/{name}.sock"
    if name == "pdp":
        return pdp_serve(listen, snapshot)
    if name == BASELINE:
        assert baseline is not None
        return pdp_serve(listen, snapshot, cwd=baseline)  # `python -m pdp` imports the pdp found there first
    mode = "sync-guarded" if name == "floor-guarded" else "sync"
    return Server.start([sys.executable, "-m", "benchmarks.floor_server", "--mode", mode, "--listen", listen])


def measure(options: argparse.Namespace, folder: Path) -> dict[str, Any]:
    addresses = folder / "addresses.txt"
    addresses.write_text("\n".join(inprocess.located_addresses(ADDRESSES)))
    snapshot = folder / "rules-10000.json"
    snapshot.write_bytes(inprocess.make_rules(10_000))
    names = (*SERVERS, BASELINE) if options.baseline else SERVERS
    servers = {name: start(name, folder, snapshot, options.baseline) for name in names}
    seconds = str(options.seconds)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        "closed": {n: [] for n in names},
        "open": {n: [] for n in names},
    }
    load, steal = [os.getloadavg()[0]], stolen()
    try:
        # One pass over every address first: each server in its steady state (pdp's
        # location cache and memo filled, every pool thread started), not its first minute.
        for name in names:
            run_load("--target", servers[name].address, "--addresses", str(addresses), "--mode", "closed",
                     "--warmup", "0", "--seconds", "120", "--max-calls", str(ADDRESSES))  # fmt: skip
        for repeat in range(options.repeats):
            for name in _turns(repeat, names):
                runs["closed"][name].append(
                    _loaded(servers[name], addresses, "--mode", "closed", "--in-flight", "16", "--seconds", seconds)
                )
        maxima = {name: statistics.median(r["achieved_rate"] for r in runs["closed"][name]) for name in names}
        rate = round(maxima["floor"] * options.share)
        load.append(os.getloadavg()[0])
        for repeat in range(options.repeats):
            for name in _turns(repeat, names):
                runs["open"][name].append(
                    _loaded(servers[name], addresses, "--mode", "open", "--rate", str(rate), "--seconds", seconds)
                )
        load.append(os.getloadavg()[0])
    finally:
        for server in servers.values():
            server.stop()
    results = _summary(options, runs, maxima, rate, load)
    results["stolen"] = round(stolen_share(steal), 4)
    return results


def _loaded(server: Server, addresses: Path, *args: str) -> dict[str, Any]:
    """One load run against ``server``, with the server's CPU (every thread) per call,
    warm-up calls included: the figure least moved by other work on the machine."""
    before = server.cpu_seconds()
    result = run_load("--target", server.address, "--addresses", str(addresses), "--warmup", "0.5", *args)
    result["server_cpu_us_per_call"] = round((server.cpu_seconds() - before) / max(result["calls"], 1) * 1e6, 1)
    return result


def _turns(repeat: int, names: tuple[str, ...]) -> list[str]:
    """The servers in a rotating order, so that none is always first after a pause."""
    shift = repeat % len(names)
    return [*names[shift:], *names[:shift]]


def _summary(
    options: argparse.Namespace,
    runs: dict[str, dict[str, list[dict[str, Any]]]],
    maxima: dict[str, float],
    rate: int,
    load: list[float],
) -> dict[str, Any]:
    names = tuple(runs["closed"])
    latency = {
        name: {key: statistics.median(r["latency_us"][key] for r in runs["open"][name]) for key in KEYS}
        for name in names
    }
    server_cpu = {
        kind: {name: statistics.median(r["server_cpu_us_per_call"] for r in runs[kind][name]) for name in names}
        for kind in runs
    }
    ratios = {}
    for floor in (name for name in names if name != "pdp"):  # the floors, and the baseline when run
        pairs = zip(runs["closed"]["pdp"], runs["closed"][floor], strict=True)
        ratios[floor] = {
            "closed_max": round(maxima["pdp"] / maxima[floor], 3),
            # Repeat by repeat, each pair loaded within seconds: the machine's drift mostly cancels.
            "closed_max_paired": round(statistics.median(a["achieved_rate"] / b["achieved_rate"] for a, b in pairs), 3),
            **{key: round(latency["pdp"][key] / latency[floor][key], 3) for key in KEYS},
            **{f"server_cpu_per_call_{kind}": round(cpu["pdp"] / cpu[floor], 3) for kind, cpu in server_cpu.items()},
        }
    errors = {name: sum(sum(r["errors"].values()) for r in runs[kind][name]) for kind in runs for name in names}
    return {
        **run_header("check_floor", options),
        "share": options.share,
        "load_average": load,
        "closed_loop_max": maxima,
        "open_loop_rate": rate,
        "open_loop_us": latency,
        "server_cpu_us_per_call": server_cpu,
        "ratios": ratios,
        "errors": errors,
        "runs": runs,
    }


def markdown(results: dict[str, Any]) -> str:
    maxima, latency, cpu = results["closed_loop_max"], results["open_loop_us"], results["server_cpu_us_per_call"]
    lines = [
        f"# Check against the floor, {results['date']}",
        "",
        f"`{results['command']}`: {results['repeats']} interleaved repeats of {results['seconds']:g} s, "
        f"Unix socket, {results['facts']['pinning']}; load average "
        f"{', '.join(f'{v:.2f}' for v in results['load_average'])} (start, after the closed loop, end); "
        f"{results['stolen']:.1%} of the CPU time stolen by the hypervisor.",
        "",
        f"Open loop at {results['open_loop_rate']:,} calls/s ({results['share']:.0%} of the bare floor's maximum):",
        "",
        "| server | closed-loop max (calls/s) | p50 µs | p90 µs | p99 µs | server CPU µs/call, closed / open |",
        "|---|---|---|---|---|---|",
    ]
    for name in maxima:
        lines.append(
            f"| {name} | {maxima[name]:,.0f} | {latency[name]['p50']:,.0f} | {latency[name]['p90']:,.0f} | "
            f"{latency[name]['p99']:,.0f} | {cpu['closed'][name]:.0f} / {cpu['open'][name]:.0f} |"
        )
    lines += [
        "",
        "| pdp / … | closed-loop max (≥ 0.90) | paired by repeat | p50 (≤ 1.05) | p99 (≤ 1.20) "
        "| server CPU per call, closed / open |",
        "|---|---|---|---|---|---|",
    ]
    for floor, ratio in results["ratios"].items():
        if floor == BASELINE:  # the targets are against the floors; against the code before, the figures alone
            figures = [f"{ratio[key]:.3f}×" for key in ("closed_max", "closed_max_paired", "p50", "p99")]
            cpu_ratios = f"{ratio['server_cpu_per_call_closed']:.2f}× / {ratio['server_cpu_per_call_open']:.2f}×"
            lines.append(f"| {BASELINE} ({results['baseline']}) | {' | '.join(figures)} | {cpu_ratios} |")
            continue
        marks = [
            _mark(ratio["closed_max"], ratio["closed_max"] >= TARGETS["closed_max"]),
            _mark(ratio["closed_max_paired"], ratio["closed_max_paired"] >= TARGETS["closed_max"]),
            _mark(ratio["p50"], ratio["p50"] <= TARGETS["p50"]),
            _mark(ratio["p99"], ratio["p99"] <= TARGETS["p99"]),
        ]
        cpu_ratios = f"{ratio['server_cpu_per_call_closed']:.2f}× / {ratio['server_cpu_per_call_open']:.2f}×"
        lines.append(f"| {floor} | {' | '.join(marks)} | {cpu_ratios} |")
    lines += ["", f"Failed calls: {results['errors']}."]
    return "\n".join(lines) + "\n"


def _mark(value: float, met: bool) -> str:
    return f"{value:.3f}×" + ("" if met else " (**no**)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--share", type=float, default=0.5, help="open-loop rate as a share of the floor's maximum")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--baseline", type=Path, metavar="TREE", help="also run `pdp serve` from this checkout, for pdp/baseline"
    )
    options = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pdp-check-floor-") as folder:
        results = measure(options, Path(folder))
    results["duration_s"] = round(time.monotonic() - started, 1)
    write_results(options.out, "check-floor", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
