"""The benchmark suite: every claim a ratio measured side by side in one run.

    python -m benchmarks.suite            # make bench: the full run (about 10 minutes)
    python -m benchmarks.suite --quick    # make bench-quick: under 2 minutes, fewer repeats

Writes benchmarks/results/<date>.json, <date>.md (summary with targets) and
<date>.png (latency percentiles, floor against pdp). Sections:

1. in-process decision cost (tier 1);
2. floor (a constant-answer server for the same proto, built like `pdp serve`)
   against pdp's Check: closed-loop maximum, then open loop at 10/50/80 % of
   the floor's maximum (tiers 2 and 3), Unix socket and TCP;
3. CheckBatch of 1, 10, 100 and 1,000 participants, decisions per server
   CPU-second, next to nginx with the geoip2 module doing the same country deny;
4. reload under load: p99 while a 10,000-rule snapshot is activated every second;
5. telemetry overhead: Check p50 with Prometheus metrics, with the audit log, off;
6. peak RSS with GeoLite2-City, 10,000 rules and 100,000 cache entries;
7. Envoy plain, with geoip+RBAC and with ext_authz to pdp (benchmarks/envoy_peer.py);
8. the fleet: 50 pdp serve and 1,000 followers of one Redis through a one-rule change
   (benchmarks/fleet.py).

The server runs on core 0, each load generator on core 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import envoy_peer, fleet, inprocess, nginx_peer
from benchmarks.harness import Server, floor_serve, machine_facts, pdp_serve, run_load

RESULTS = Path(__file__).resolve().parent / "results"
PERCENTILE_KEYS = ("p50", "p90", "p99", "p99.9", "max")


class Run:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.folder = Path(tempfile.mkdtemp(prefix="pdp-suite-"))
        self.repeats = 2 if quick else 5
        self.seconds = 2.0 if quick else 5.0
        self.results: dict[str, Any] = {"quick": quick, "facts": machine_facts(), "started": _now()}
        self.addresses = self.folder / "addresses.txt"
        self.addresses.write_text("\n".join(inprocess.located_addresses(20_000)))
        self.rules = self.folder / "rules-10000.json"
        self.rules.write_bytes(inprocess.make_rules(10_000))

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def load(self, target: str, *args: str) -> dict[str, Any]:
        return run_load("--target", target, "--addresses", str(self.addresses), *args)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _median_latency(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {key: statistics.median(run["latency_us"][key] for run in runs) for key in PERCENTILE_KEYS}


def _errors(runs: list[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for run in runs:
        for code, count in run["errors"].items():
            total[code] = total.get(code, 0) + count
    return total


# --------------------------------------------------------------------------- sections


def section_inprocess(run: Run) -> None:
    run.say("tier 1: in-process decision cost")
    sizes = [10_000] if run.quick else [10, 1_000, 10_000]
    rows = [inprocess.measure(n, 3 if run.quick else 7, 1000, 2000 if run.quick else 5000) for n in sizes]
    run.results["inprocess"] = {"rows": rows, "mix": inprocess.realistic_mix(10_000)}


def section_transport(run: Run) -> None:
    transports = {"unix": f"unix:{run.folder}/{{name}}.sock"}
    if not run.quick:
        transports["tcp"] = "127.0.0.1:0"
    shares = (0.5,) if run.quick else (0.1, 0.5, 0.8)
    results: dict[str, Any] = {}
    for transport, template in transports.items():
        run.say(f"tiers 2 and 3 over {transport}: floor and pdp Check")
        floor = floor_serve(template.format(name="floor"))
        pdp = pdp_serve(template.format(name="pdp"), run.rules)
        try:
            closed = {
                name: run.load(server.address, "--mode", "closed", "--in-flight", "16", "--seconds", str(run.seconds))
                for name, server in (("floor", floor), ("pdp", pdp))
            }
            floor_max = closed["floor"]["achieved_rate"]
            entry: dict[str, Any] = {
                "closed_loop_max": {name: result["achieved_rate"] for name, result in closed.items()},
                "open_loop": {},
            }
            for share in shares:
                rate = round(floor_max * share)
                runs: dict[str, list[dict[str, Any]]] = {"floor": [], "pdp": []}
                cpu_before = pdp.cpu_seconds()
                for _ in range(run.repeats):
                    for name, server in (("floor", floor), ("pdp", pdp)):
                        args = ("--mode", "open", "--rate", str(rate), "--seconds", str(run.seconds), "--warmup", "0.5")
                        runs[name].append(run.load(server.address, *args))
                pdp_cpu = pdp.cpu_seconds() - cpu_before
                decisions = sum(r["decisions"] for r in runs["pdp"])
                floor_latency, pdp_latency = _median_latency(runs["floor"]), _median_latency(runs["pdp"])
                entry["open_loop"][f"{int(share * 100)}%"] = {
                    "rate": rate,
                    "achieved": {name: statistics.median(r["achieved_rate"] for r in rs) for name, rs in runs.items()},
                    "floor_us": floor_latency,
                    "pdp_us": pdp_latency,
                    "ratio": {
                        key: round(pdp_latency[key] / floor_latency[key], 3) if floor_latency[key] else None
                        for key in PERCENTILE_KEYS
                    },
                    "errors": {"floor": _errors(runs["floor"]), "pdp": _errors(runs["pdp"])},
                    # Includes the warm-up calls' CPU, so it is an upper bound.
                    "pdp_cpu_s_per_1000_decisions": round(pdp_cpu / decisions * 1000, 4) if decisions else None,
                    "curves": {name: rs[0]["curve_us"] for name, rs in runs.items()},
                }
            results[transport] = entry
        finally:
            floor.stop()
            pdp.stop()
    run.results["transport"] = results


def section_batch_and_peer(run: Run) -> None:
    sizes = (100,) if run.quick else (1, 10, 100, 1000)
    run.say(f"CheckBatch {sizes} and the nginx-geoip2 peer")
    pdp = pdp_serve(f"unix:{run.folder}/batch.sock", run.rules)
    batches: dict[str, Any] = {}
    try:
        run.load(
            pdp.address, "--mode", "closed", "--rpc", "batch", "--batch", "1000", "--seconds", "1"
        )  # warm the cache
        for size in sizes:
            cpu_before = pdp.cpu_seconds()
            result = run.load(
                pdp.address, "--mode", "closed", "--in-flight", "4", "--rpc", "batch", "--batch", str(size),
                "--seconds", str(run.seconds), "--warmup", "0",
            )  # fmt: skip
            cpu = pdp.cpu_seconds() - cpu_before
            batches[str(size)] = {
                "decisions_per_s": round(result["decisions"] / result["seconds"]),
                "decisions_per_cpu_s": round(result["decisions"] / cpu) if cpu else None,
                "latency_us": result["latency_us"],
                "errors": result["errors"],
            }
    finally:
        pdp.stop()
    missing = nginx_peer.available()
    peer = {"skipped": missing} if missing else nginx_peer.measure(run.addresses, run.seconds)
    run.results["batch"] = batches
    run.results["nginx_geoip2"] = peer


def section_envoy(run: Run) -> None:
    run.say("Envoy: plain, geoip+RBAC and ext_authz to pdp")
    run.results["envoy"] = envoy_peer.run_section(run.addresses, run.quick, run.say)


def section_reload(run: Run) -> None:
    run.say("reload under load: a 10,000-rule activation every second")
    activation_ms = inprocess.activation_ms(10_000, 3 if run.quick else 7)
    snapshot = run.folder / "live.json"
    snapshot.write_bytes(run.rules.read_bytes())
    pdp = pdp_serve(f"unix:{run.folder}/reload.sock", snapshot, "--poll-seconds", "0.2")
    steady: list[dict[str, Any]] = []
    reloading: list[dict[str, Any]] = []
    activations = 0
    try:
        rate = str(round(run.results["transport"]["unix"]["closed_loop_max"]["floor"] * 0.5))
        args = ("--mode", "open", "--rate", rate, "--seconds", str(run.seconds), "--warmup", "0.5")
        # All steady runs first: a run during reloads may leave a backlog behind it.
        for _ in range(run.repeats):
            steady.append(run.load(pdp.address, *args))
        for repeat in range(run.repeats):
            stop = threading.Event()
            versions = _versions(snapshot, 1000 * (repeat + 1), int(run.seconds) + 3)
            publisher = threading.Thread(target=_publish, args=(snapshot, versions, 1.0, stop))
            before = _activations(pdp)
            publisher.start()
            try:
                reloading.append(run.load(pdp.address, *args))
            finally:
                stop.set()
                publisher.join()
            activations += _activations(pdp) - before
    finally:
        pdp.stop()
    steady_latency, reload_latency = _median_latency(steady), _median_latency(reloading)
    run.results["reload"] = {
        "activation_ms_median": activation_ms,
        "activations_during_load": activations,
        "steady_us": steady_latency,
        "reloading_us": reload_latency,
        "p99_ratio": round(reload_latency["p99"] / steady_latency["p99"], 3),
        "errors": {"steady": _errors(steady), "reloading": _errors(reloading)},
    }


def section_fleet(run: Run) -> None:
    """Sidecars following one Redis through a one-rule change (benchmarks/fleet.py)."""
    serve, followers = (10, 200) if run.quick else (50, 1000)
    run.say(f"fleet: {serve} pdp serve, {followers} followers, one change of 10,000 rules")
    run.results["fleet"] = fleet.run(serve, followers, per_process=100, rules=10_000, repeats=3 if run.quick else 5)


def _versions(path: Path, first_version: int, count: int) -> list[Path]:
    """``count`` later versions of the snapshot at ``path``, written beside it
    before the measurement: publishing is then one rename, so the benchmark's own
    JSON encoding and file writing do not run on a measured core."""
    document = json.loads(path.read_bytes())
    staged = []
    for number in range(count):
        document["version"] = first_version + number + 1
        document["rules"][1]["priority"] = (first_version + number) % 100  # the content changes, not only the number
        version = path.with_suffix(f".v{first_version + number + 1}")
        version.write_text(json.dumps(document))
        staged.append(version)
    return staged


def _publish(path: Path, versions: list[Path], every: float, stop: threading.Event) -> None:
    for version in versions:
        version.replace(path)
        if stop.wait(every):
            return


def _activations(server: Server) -> int:
    from pdp.client import Client

    with Client(server.address, timeout=10) as client:
        return int(client.status().activations)


def section_telemetry(run: Run) -> None:
    run.say("telemetry overhead: off, Prometheus metrics, audit log")
    key = run.folder / "audit.key"
    key.write_bytes(b"benchmark-audit-key-0123456789")
    variants: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
        "off": ((), {}),
        "prometheus": ((), {"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": "0"}),
        "audit": (("--audit-log", str(run.folder / "audit.jsonl"), "--audit-hmac-key-file", str(key)), {}),
    }
    servers = {
        name: pdp_serve(f"unix:{run.folder}/telemetry-{name}.sock", run.rules, *extra, env=env)
        for name, (extra, env) in variants.items()
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    try:
        for _ in range(run.repeats + 1):
            for name, server in servers.items():
                args = ("--mode", "closed", "--in-flight", "1", "--seconds", str(run.seconds), "--warmup", "0.5")
                runs[name].append(run.load(server.address, *args))
    finally:
        for server in servers.values():
            server.stop()
    latency = {name: _median_latency(rs) for name, rs in runs.items()}
    run.results["telemetry"] = {
        "p50_us": {name: value["p50"] for name, value in latency.items()},
        "ratio_p50": {name: round(latency[name]["p50"] / latency["off"]["p50"], 3) for name in latency},
        "errors": {name: _errors(rs) for name, rs in runs.items()},
        "note": "closed loop, one call in flight; deny share of the address mix is logged by the audit variant",
    }


def section_memory(run: Run) -> None:
    run.say("peak RSS with 10,000 rules and 100,000 cache entries")
    unique = run.folder / "unique.txt"
    unique.write_text("\n".join(inprocess.located_addresses(100_000, seed=7)))
    pdp = pdp_serve(f"unix:{run.folder}/memory.sock", run.rules, "--cache-size", "100000")
    try:
        result = run_load(
            "--target", pdp.address, "--addresses", str(unique), "--mode", "closed", "--in-flight", "1",
            "--rpc", "batch", "--batch", "1000", "--seconds", "60", "--warmup", "0", "--max-calls", "100",
        )  # fmt: skip
        from pdp.client import Client

        with Client(pdp.address, timeout=10) as client:
            status = client.status()
        run.results["memory"] = {
            "peak_rss_mb": round(pdp.peak_rss_mb(), 1),
            "cache_entries": int(status.cache_size),
            "rules": int(status.rule_count),
            "errors": result["errors"],
        }
    finally:
        pdp.stop()


def _sustainable_maximum(run: Run, address: str, ceiling: float) -> tuple[float, list[dict[str, Any]]]:
    """The highest open-loop rate pdp keeps up with, searched down from ``ceiling``
    (its closed-loop maximum) in steps of 10 %, 5 s each (3 s quick): every call answered,
    98 % of the rate achieved, p99 under 10 ms. Past that knee latency grows
    without bound.

    Why not the closed-loop maximum itself: with 16 calls in flight the server
    takes several calls per wake-up, while calls arriving one by one cost a
    wake-up each; the floor itself does not keep up with 80 % of its own
    closed-loop maximum in open loop (see the transport section)."""
    rate = ceiling
    search = []
    while rate > ceiling * 0.3:
        args = ("--mode", "open", "--rate", str(round(rate)), "--seconds", "3" if run.quick else "5", "--warmup", "0.5")
        result = run.load(address, *args)
        kept_up = (
            not result["errors"] and result["achieved_rate"] >= 0.98 * rate and result["latency_us"]["p99"] <= 10_000
        )
        step = {"rate": round(rate), "achieved": result["achieved_rate"], "p99_us": result["latency_us"]["p99"]}
        search.append(step | {"errors": result["errors"], "kept_up": kept_up})
        if kept_up:
            break
        rate *= 0.9
    return rate, search


def section_soak(run: Run) -> None:
    seconds = 15.0 if run.quick else 60.0
    run.say(
        f"soak: {seconds:.0f} s at 80 % of pdp's sustainable maximum, activation every 2 s, GeoIP reload every 10 s"
    )
    snapshot = run.folder / "soak.json"
    snapshot.write_bytes(run.rules.read_bytes())
    from pdp.geo import demo_database_path

    database = run.folder / "GeoLite2-City.mmdb"
    shutil.copy(demo_database_path(), database)
    pdp = pdp_serve(f"unix:{run.folder}/soak.sock", snapshot, "--poll-seconds", "0.5", "--geoip-poll-seconds", "1",
                    geoip=str(database))  # fmt: skip
    stop = threading.Event()
    samples: list[tuple[float, float, int, int]] = []
    # The search for the maximum runs under the same churn as the soak: up to 12 steps of 5.5 s.
    versions = _versions(snapshot, 1, int((seconds + 12 * 5.5) / 2) + 2)
    # Two names for one database file, alternated: each swap is a new file to the
    # watcher, and costs a link and a rename rather than a 60 MB copy.
    originals = [database.with_suffix(f".{n}") for n in range(2)]
    for original in originals:
        shutil.copy(demo_database_path(), original)

    def churn() -> None:
        started = time.monotonic()
        next_geo = started + 10
        swaps = 0
        for version in versions:
            if stop.wait(2.0):
                return
            version.replace(snapshot)
            if time.monotonic() >= next_geo:
                next_geo += 10
                link = database.with_suffix(".new")
                link.unlink(missing_ok=True)
                link.hardlink_to(originals[swaps % 2])
                link.replace(database)
                swaps += 1

    def sample() -> None:
        started = time.monotonic()
        while not stop.wait(1.0):
            samples.append((time.monotonic() - started, pdp.rss_mb(), pdp.fds(), pdp.threads()))

    workers = [threading.Thread(target=churn), threading.Thread(target=sample)]
    try:
        # The maximum is searched with the churn already running: 80 % of a maximum
        # measured without activations and database swaps would leave no headroom for them.
        workers[0].start()
        ceiling = run.results["transport"]["unix"]["closed_loop_max"]["pdp"]
        maximum, search = _sustainable_maximum(run, pdp.address, ceiling)
        rate = str(round(maximum * 0.8))
        workers[1].start()
        result = run.load(pdp.address, "--mode", "open", "--rate", rate, "--seconds", str(seconds), "--warmup", "0")
    finally:
        stop.set()
        for worker in workers:
            if worker.ident is not None:
                worker.join()
        activations = _activations(pdp) if pdp.process.poll() is None else -1
        pdp.stop()
    warm = [row for row in samples if row[0] >= seconds * 0.25] or samples
    first, last = warm[0], warm[-1]
    # Threads: the RPC pool starts threads as concurrency asks, up to its bound, so
    # growth is judged half against half (a leak keeps growing), not first against last.
    halves = warm[: len(warm) // 2] or warm, warm[len(warm) // 2 :] or warm
    run.results["soak"] = {
        "seconds": seconds,
        "max_rate": round(maximum),
        "max_rate_search": search,
        "rate": float(rate),
        "achieved": result["achieved_rate"],
        "errors": result["errors"],
        "latency_us": result["latency_us"],
        "activations": activations,
        "rss_mb_after_warmup": first[1],
        "rss_mb_end": last[1],
        "rss_growth": round(last[1] / first[1] - 1, 4) if first[1] else None,
        "fds": [first[2], last[2]],
        "threads": [max(row[3] for row in halves[0]), max(row[3] for row in halves[1])],
    }


# --------------------------------------------------------------------------- report


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for every target of the suite."""
    rows: list[tuple[str, str, bool]] = fleet.targets(results["fleet"]) if "fleet" in results else []
    inproc = {row["rules"]: row for row in results["inprocess"]["rows"]}[10_000]
    rows.append(("in-process warm ≤ 3 µs (10,000 rules)", f"{inproc['warm_us']:.2f} µs", inproc["warm_us"] <= 3))
    rows.append(("in-process cold ≤ 10 µs (10,000 rules)", f"{inproc['cold_us']:.2f} µs", inproc["cold_us"] <= 10))
    half = results["transport"]["unix"]["open_loop"]["50%"]
    rows.append(("Check p50 ≤ 1.10× floor (Unix, 50 %)", f"{half['ratio']['p50']:.2f}×", half["ratio"]["p50"] <= 1.10))
    rows.append(("Check p99 ≤ 1.25× floor (Unix, 50 %)", f"{half['ratio']['p99']:.2f}×", half["ratio"]["p99"] <= 1.25))
    peer = results["nginx_geoip2"].get("decisions_per_cpu_s")
    batch = results["batch"]["100"]["decisions_per_cpu_s"]
    if peer:
        rows.append(("CheckBatch(100) per core ≥ 1.5× nginx-geoip2", f"{batch / peer:.2f}× ({batch:,} vs {peer:,}/s)",
                     batch >= 1.5 * peer))  # fmt: skip
    reload = results["reload"]
    rows.append(("10,000-rule activation ≤ 250 ms", f"{reload['activation_ms_median']:.0f} ms",
                 reload["activation_ms_median"] <= 250))  # fmt: skip
    rows.append(("p99 during reloads ≤ 1.5× steady", f"{reload['p99_ratio']:.2f}×", reload["p99_ratio"] <= 1.5))
    errors = sum(sum(v.values()) for v in reload["errors"].values())
    rows.append(("zero errors during reloads", f"{errors} errors", errors == 0))
    memory = results["memory"]
    rows.append(("peak RSS ≤ 150 MB (100,000 cache entries)", f"{memory['peak_rss_mb']:.0f} MB",
                 memory["peak_rss_mb"] <= 150))  # fmt: skip
    soak = results.get("soak")
    if soak:
        errors = sum(soak["errors"].values())
        rows.append(("soak: zero failed calls", f"{errors} failed of {soak['achieved'] * soak['seconds']:,.0f}",
                     errors == 0))  # fmt: skip
        rows.append(("soak: RSS growth ≤ 5 % after warm-up", f"{soak['rss_growth']:+.1%}",
                     soak["rss_growth"] is not None and soak["rss_growth"] <= 0.05))  # fmt: skip
        rows.append(("soak: no fd or thread growth", f"fds {soak['fds']}, threads {soak['threads']}",
                     soak["fds"][1] <= soak["fds"][0] and soak["threads"][1] <= soak["threads"][0]))  # fmt: skip
    telemetry = results["telemetry"]["ratio_p50"]
    rows.append(("p50 with Prometheus ≤ 1.10× off", f"{telemetry['prometheus']:.3f}×", telemetry["prometheus"] <= 1.10))
    rows.append(("p50 with audit log ≤ 1.05× off", f"{telemetry['audit']:.3f}×", telemetry["audit"] <= 1.05))
    if "summary" in results.get("envoy", {}):
        rows += envoy_peer.targets(results["envoy"])
    return rows


def markdown(results: dict[str, Any]) -> str:
    facts = results["facts"]
    lines = [
        f"# pdp benchmark, {results['started']}{' (quick)' if results['quick'] else ''}",
        "",
        f"{facts['cpu']}, {facts['cores']} cores, Linux {facts['kernel']}; Python {facts['python']}, grpcio "
        f"{facts['grpcio']}, protobuf {facts['protobuf']}, maxminddb {facts['maxminddb']}; {facts['database']}; "
        f"{facts['pinning']}; {results['repeats']} repeats of {results['seconds']:g} s.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {value} | {'yes' if met else '**no**'} |" for name, value, met in targets(results)]
    lines += [
        "",
        "## In process (µs per decision)",
        "",
        "| rules | warm | cold | full record decode |",
        "|---:|---:|---:|---:|",
    ]
    for row in results["inprocess"]["rows"]:
        lines.append(
            f"| {row['rules']:,} | {row['warm_us']:.2f} | {row['cold_us']:.2f} | {row['full_decode_us']:.2f} |"
        )
    mix = results["inprocess"]["mix"]
    lines += ["", f"Realistic mix ({mix['description']}): {mix['us_per_decision']:.2f} µs per decision, "
              f"cache hit ratio {mix['hit_ratio']:.1%}."]  # fmt: skip
    for transport, entry in results["transport"].items():
        maxima = entry["closed_loop_max"]
        lines += ["", f"## Floor and Check over {transport}", "",
                  f"Closed-loop maximum (16 in flight, labelled closed-loop): floor {maxima['floor']:,.0f}/s, "
                  f"pdp Check {maxima['pdp']:,.0f}/s.", "",
                  "| load | server | p50 | p90 | p99 | p99.9 | max | achieved/s | errors |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for share, row in entry["open_loop"].items():
            for name in ("floor", "pdp"):
                latency = row[f"{name}_us"]
                cells = " | ".join(f"{latency[key]:,.0f}" for key in PERCENTILE_KEYS)
                lines.append(f"| {share} ({row['rate']:,}/s) | {name} | {cells} | {row['achieved'][name]:,.0f} | "
                             f"{row['errors'][name] or 'none'} |")  # fmt: skip
            ratios = " | ".join(f"{row['ratio'][key]:.2f}×" for key in PERCENTILE_KEYS)
            lines.append(f"| | ratio | {ratios} | | |")
        cpu = entry["open_loop"].get("50%", {}).get("pdp_cpu_s_per_1000_decisions")
        lines += ["", f"CPU-seconds per 1,000 Check decisions at 50 %: {cpu} (including the gRPC transport)."]
    lines += [
        "",
        "## CheckBatch and nginx-geoip2 (closed loop)",
        "",
        "| participants | decisions/s | per server CPU-second | p50 µs | p99 µs |",
        "|---:|---:|---:|---:|---:|",
    ]
    for size, row in results["batch"].items():
        lines.append(f"| {size} | {row['decisions_per_s']:,} | {row['decisions_per_cpu_s']:,} | "
                     f"{row['latency_us']['p50']:,} | {row['latency_us']['p99']:,} |")  # fmt: skip
    peer = results["nginx_geoip2"]
    if "skipped" in peer:
        lines.append(f"\nnginx-geoip2 skipped: {peer['skipped']}")
    else:
        lines.append(f"| nginx-geoip2 (wrk, {peer['connections']} connections) | {peer['decisions_per_s']:,} | "
                     f"{peer['decisions_per_cpu_s']:,} | | |")  # fmt: skip
    reload = results["reload"]
    lines += ["", "## Reload under load", "",
              f"10,000-rule snapshot compiled in {reload['activation_ms_median']:.0f} ms (median); "
              f"{reload['activations_during_load']} activations during the loaded runs.", "",
              "| | p50 | p90 | p99 | p99.9 | max |", "|---|---:|---:|---:|---:|---:|",
              "| steady | " + " | ".join(f"{reload['steady_us'][k]:,.0f}" for k in PERCENTILE_KEYS) + " |",
              "| reloading every second | " + " | ".join(f"{reload['reloading_us'][k]:,.0f}" for k in PERCENTILE_KEYS)
              + " |", "", f"Errors: {reload['errors']}."]  # fmt: skip
    telemetry = results["telemetry"]
    lines += ["", "## Telemetry overhead (Check p50, one call in flight)", "", "| variant | p50 µs | ratio |",
              "|---|---:|---:|"]  # fmt: skip
    for name, value in telemetry["p50_us"].items():
        lines.append(f"| {name} | {value:,.0f} | {telemetry['ratio_p50'][name]:.3f}× |")
    soak = results.get("soak")
    if soak:
        lines += [
            "",
            "## Soak",
            "",
            f"{soak['seconds']:.0f} s open loop at {soak['rate']:,.0f}/s (80 % of pdp's sustainable maximum, "
            f"{soak['max_rate']:,}/s: see the search in the JSON), a "
            f"snapshot activation every 2 s ({soak['activations']} in all, the search for the maximum included) "
            "and a GeoIP reload every 10 s: "
            f"errors {soak['errors'] or 'none'}; RSS {soak['rss_mb_after_warmup']:.0f} -> "
            f"{soak['rss_mb_end']:.0f} MB after warm-up; fds {soak['fds']} (first, last); threads {soak['threads']} "
            "(most in the first half, in the second); "
            f"latency {soak['latency_us']}.",
        ]
    if "summary" in results.get("envoy", {}):
        lines += envoy_peer.markdown(results["envoy"])
    memory = results["memory"]
    lines += ["", f"Peak RSS: {memory['peak_rss_mb']:.0f} MB with {memory['rules']:,} rules and "
              f"{memory['cache_entries']:,} cache entries (GeoLite2-City mapped)."]  # fmt: skip
    if "fleet" in results:
        lines += ["", "## Fleet", "", fleet.markdown(results["fleet"])]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    for transport, entry in results["transport"].items():
        for share, row in entry["open_loop"].items():
            for name, curve in row["curves"].items():
                percentiles = [point[0] for point in curve]
                axes.plot(
                    [100 - p for p in percentiles],
                    [point[1] for point in curve],
                    marker="o",
                    linestyle="-" if name == "pdp" else "--",
                    label=f"{name} {transport} {share}",
                )
    axes.set_xscale("log")
    axes.invert_xaxis()
    axes.set_yscale("log")
    axes.set_xlabel("100 - percentile (log)")
    axes.set_ylabel("latency from intended send, µs (log)")
    axes.set_title("Check latency percentiles, open loop: floor (dashed) and pdp (solid)")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="x-small", ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes, repeats and seconds (under 2 minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    options = parser.parse_args()
    run = Run(options.quick)
    run.results["repeats"], run.results["seconds"] = run.repeats, run.seconds
    sections: list[Callable[[Run], None]] = [
        section_inprocess, section_transport, section_batch_and_peer, section_envoy, section_reload,
        section_telemetry, section_memory, section_soak, section_fleet,
    ]  # fmt: skip
    started = time.monotonic()
    for section in sections:
        section(run)
    run.results["duration_s"] = round(time.monotonic() - started, 1)
    options.out.mkdir(parents=True, exist_ok=True)
    stem = options.out / (dt.date.today().isoformat() + ("-quick" if options.quick else ""))
    stem.with_suffix(".json").write_text(json.dumps(run.results, indent=2))
    stem.with_suffix(".md").write_text(markdown(run.results))
    drawn = plot(run.results, stem.with_suffix(".png"))
    print(markdown(run.results))
    run.say(f"done in {run.results['duration_s']:.0f} s: {stem}.json, .md" + (", .png" if drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
