"""What `pdp serve --workers N` costs per call at saturation, against the bare floor, side by side.

    python -m benchmarks.threads [--workers 2,4,8,16,40] [--repeats 12] [--seconds 2] [--baseline TREE]
                                 [--addresses 20000]

Starts the bare floor (``floor_server --mode sync``, 8 threads) and one `pdp serve`
per ``--workers`` value (10,000 rules, the demo GeoLite2-City, Unix sockets, all
pinned to the server core), warms each over every address, then loads them in a
rotating order, repeat after repeat: closed loop, 16 calls in flight, from the
suite's load generator on the client core. ``--baseline TREE`` adds `pdp serve
--workers 8` run from another checkout (``git worktree add /tmp/old main``).

For each server: the median rate and server CPU per call, the median of its
ratios to the floor *within each repeat*, and the first `pdp serve`'s rate over its
own, repeat by repeat (with how often the first was the faster) (the floor loaded seconds before or after
it): on a shared machine whose speed drifts by half from one minute to the next,
only such pairs compare. A thread pool busier than the calls need costs CPU per
call (each call wakes a sleeping thread instead of being taken by one that has
just finished); this is where that shows. Writes ``results/<date>-<HHMM>-threads.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import inprocess
from benchmarks.check_floor import ADDRESSES, RESULTS
from benchmarks.harness import (
    Server,
    floor_serve,
    pdp_serve,
    run_header,
    run_load,
    stolen,
    stolen_share,
    write_results,
)

FLOOR = "floor"
BASELINE = "baseline --workers 8"


def measure(options: argparse.Namespace, folder: Path) -> dict[str, Any]:
    addresses = folder / "addresses.txt"
    addresses.write_text("\n".join(inprocess.located_addresses(options.addresses)))
    snapshot = folder / "rules-10000.json"
    snapshot.write_bytes(inprocess.make_rules(10_000))
    servers: dict[str, Server] = {FLOOR: floor_serve(f"unix:{folder}/floor.sock")}
    try:
        for workers in options.workers:
            servers[f"--workers {workers}"] = pdp_serve(
                f"unix:{folder}/w{workers}.sock", snapshot, "--workers", str(workers)
            )
        if options.baseline:
            servers[BASELINE] = pdp_serve(f"unix:{folder}/baseline.sock", snapshot, cwd=options.baseline)
        return _loaded(options, servers, addresses)
    finally:
        for server in servers.values():
            server.stop()


def _loaded(options: argparse.Namespace, servers: dict[str, Server], addresses: Path) -> dict[str, Any]:
    names = list(servers)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    steal = stolen()
    for name in names:  # every address located and every thread started: the steady state
        run_load("--target", servers[name].address, "--addresses", str(addresses), "--mode", "closed",
                 "--warmup", "0", "--seconds", "120", "--max-calls", str(options.addresses))  # fmt: skip
    for repeat in range(options.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            server = servers[name]
            before = server.cpu_seconds()
            result = run_load("--target", server.address, "--addresses", str(addresses), "--warmup", "0.3",
                              "--mode", "closed", "--in-flight", "16", "--seconds", str(options.seconds))  # fmt: skip
            cpu = (server.cpu_seconds() - before) / max(result["calls"], 1) * 1e6
            runs[name].append({"rate": result["achieved_rate"], "cpu_us_per_call": round(cpu, 1),
                               "errors": sum(result["errors"].values())})  # fmt: skip
    summary = {}
    first = names[1]  # the first pdp serve: the others are compared with it too
    for name in names:
        against_first = [run["rate"] / other["rate"] for run, other in zip(runs[first], runs[name], strict=True)]
        pairs = zip(runs[name], runs[FLOOR], strict=True)
        ratios = [
            (run["rate"] / floor["rate"], floor["cpu_us_per_call"] / run["cpu_us_per_call"]) for run, floor in pairs
        ]
        summary[name] = {
            "rate": statistics.median(run["rate"] for run in runs[name]),
            "cpu_us_per_call": statistics.median(run["cpu_us_per_call"] for run in runs[name]),
            "rate_vs_floor": round(statistics.median(rate for rate, _ in ratios), 3),
            "rate_vs_floor_range": [
                round(min(rate for rate, _ in ratios), 3),
                round(max(rate for rate, _ in ratios), 3),
            ],
            "cpu_vs_floor": round(statistics.median(cpu for _, cpu in ratios), 3),
            "errors": sum(run["errors"] for run in runs[name]),
            # the first pdp serve's rate over this one's, repeat by repeat, and in how many repeats it was faster
            "first_vs_this": round(statistics.median(against_first), 3),
            "first_faster": sum(ratio > 1 for ratio in against_first),
        }
    return {
        **run_header("threads", options),
        "stolen": round(stolen_share(steal), 4),
        "summary": summary,
        "runs": runs,
    }


def markdown(results: dict[str, Any]) -> str:
    first, repeats = list(results["summary"])[1], results["repeats"]
    lines = [
        f"# `pdp serve --workers N` against the floor, {results['date']}",
        "",
        f"`{results['command']}`: {results['repeats']} rotating repeats of {results['seconds']:g} s, closed loop, "
        f"16 in flight, Unix socket, {results['facts']['pinning']}; "
        f"{results['stolen']:.1%} of the CPU time stolen by the hypervisor.",
        "",
        "| server | calls/s | server CPU µs/call | calls/s ÷ floor's, paired (range) "
        f"| floor's CPU ÷ its, paired | {first}'s calls/s ÷ its, paired (repeats {first} was faster) | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results["summary"].items():
        low, high = row["rate_vs_floor_range"]
        against = "" if name in (FLOOR, first) else f"{row['first_vs_this']:.3f}× ({row['first_faster']} of {repeats})"
        lines.append(
            f"| {name} | {row['rate']:,.0f} | {row['cpu_us_per_call']:.1f} | {row['rate_vs_floor']:.3f}× "
            f"({low:.2f}–{high:.2f}) | {row['cpu_vs_floor']:.3f}× | {against} | {row['errors']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workers", type=lambda text: [int(n) for n in text.split(",")], default=[2, 4, 8, 16, 40],
        help="comma-separated --workers values, one pdp serve each",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--addresses", type=int, default=ADDRESSES, help="located addresses the calls cycle through")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--baseline", type=Path, metavar="TREE", help="also `pdp serve --workers 8` from this checkout")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pdp-threads-") as folder:
        results = measure(options, Path(folder))
    write_results(options.out, "threads", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
