"""Fleet simulation: many sidecars following one real redis-server, one rule of 10,000 changed.

    python -m benchmarks.fleet                      # 50 pdp serve + 1,000 followers (about 3 minutes)
    python -m benchmarks.fleet --serve 3 --followers 40 --per-process 20 --rules 500   # what make test runs

Three measurements, each from one publication of a one-rule change:

1. ``--serve`` full ``pdp serve`` processes (MaxMind's small test database,
   signed snapshots, default poll interval): time from the publish until each
   serves the new version, from the activation time each reports on WatchPolicy;
2. ``--followers`` real reload paths without gRPC (benchmarks/fleet_follower.py,
   ``--per-process`` to a process), first with deltas, then with ``deltas=off``
   (every follower fetches the full snapshot, as landed main did): Redis egress
   (``INFO stats`` total_net_output_bytes) and Redis CPU (``INFO cpu``
   used_cpu_sys + used_cpu_user) before and after, and time until all serve;
3. one follower alone: its CPU time (thread time) to take a change as a delta,
   and as a full fetch, median of several.

The store keeps the snapshot gzip-compressed (``--compress gzip``), as the
README recommends; the uncompressed size is reported for the arithmetic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, cast

import redis

from benchmarks import inprocess
from benchmarks.fleet_follower import CITY_DB
from benchmarks.harness import ROOT
from pdp.canonical import canonical_snapshot
from pdp.client import Client
from pdp.publish import publish
from pdp.signing import generate_keypair, load_private_key, sign

KEY = "pdp:fleet"
BASELINE_SECONDS = 3.0


class Store:
    """A redis-server of the simulation's own, on a Unix socket (and a TCP port for the followers)."""

    def __init__(self, folder: Path) -> None:
        self.port = _free_port()
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(folder), "--maxclients", "10000"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if "Ready to accept connections" in line:
                break
        threading.Thread(target=_drain, args=(self.process.stdout,), daemon=True).start()
        self.client = redis.Redis(port=self.port)
        self.url = f"redis://127.0.0.1:{self.port}/0?key={KEY}"

    def counters(self) -> tuple[int, float]:
        """(bytes sent so far, CPU seconds used so far), the second INFO's reply left out."""
        sent = int(self.client.info("stats")["total_net_output_bytes"])
        cpu = self.client.info("cpu")
        return sent, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])

    def subscribers(self) -> int:
        return int(self.client.pubsub_numsub(f"{KEY}:updates")[0][1])

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(timeout=30)


def _drain(stream: IO[str]) -> None:
    with stream:
        stream.read()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Publisher:
    def __init__(self, folder: Path, store: Store, rules: int) -> None:
        generate_keypair(folder / "ops.key", folder / "ops.pub")
        self.pubkey = folder / "ops.pub"
        self.key = load_private_key(folder / "ops.key")
        self.store = store
        self.document = json.loads(canonical_snapshot(inprocess.make_rules(rules), "rules.json"))
        self.sizes: dict[str, int] = {}

    def publish(self, compression: str = "gzip") -> float:
        """Publish the current document; the next call changes one rule. Returns when the EXEC returned."""
        data = sign(
            canonical_snapshot(json.dumps(self.document).encode(), "r.json"), self.document["version"], self.key
        )
        publish(data, self.store.url, self.document["version"], key=self.key, compression=compression)
        published = time.time()
        self.sizes["snapshot_bytes"] = len(data)
        self.document["version"] += 1
        rule = self.document["rules"][len(self.document["rules"]) // 2]
        rule["priority"] = (rule["priority"] + 1) % 1000
        return published


def _wait(condition: Callable[[], bool], what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        threading.Event().wait(0.05)


def _percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "max_ms": round(1000 * ordered[-1], 1),
    }


def _measured(store: Store, act: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    sent, cpu = store.counters()
    result = act()
    sent_after, cpu_after = store.counters()
    overhead = store.counters()[0] - sent_after  # the replies to one pair of INFO calls
    return result, {
        "redis_egress_bytes": sent_after - sent - overhead,
        "redis_cpu_ms": round(1000 * (cpu_after - cpu), 1),
    }


# --------------------------------------------------------------------------- 1. full pdp serve processes


def full_sidecars(folder: Path, store: Store, publisher: Publisher, count: int) -> dict[str, Any]:
    version = publisher.document["version"] - 1
    servers: list[subprocess.Popen[str]] = []
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:  # start in parallel: each compiles the snapshot once
            servers = list(pool.map(lambda n: _serve(folder, store, publisher, n), range(count)))
        _wait(lambda: store.subscribers() >= count, "every pdp serve to subscribe")
        clients = [Client(f"unix:{folder}/pdp-{n}.sock", timeout=10) for n in range(count)]
        events: list[float] = [0.0] * count
        watchers = [threading.Thread(target=_watch, args=(c, version + 1, events, n)) for n, c in enumerate(clients)]
        for watcher in watchers:
            watcher.start()
        _wait(lambda: all(event == -1.0 for event in events), "every WatchPolicy stream to open")
        published, cost = _measured(store, lambda: _publish_and_join(publisher, watchers))
        statuses = [client.status() for client in clients]
        for client in clients:
            client.close()
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.communicate(timeout=60)
    return {
        "sidecars": count,
        **_percentiles([event - published for event in events]),
        **cost,
        "via_delta": sum(status.delta_activations for status in statuses),
        "fallbacks": sum(status.delta_fallbacks for status in statuses),
        "all_serving": all(status.policy_version == version + 1 for status in statuses),
    }


def _serve(folder: Path, store: Store, publisher: Publisher, n: int) -> subprocess.Popen[str]:
    """``pdp serve`` with its defaults (poll every 2 s), returned once it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pdp", "serve", "--listen", f"unix:{folder}/pdp-{n}.sock", "--snapshot", store.url,
         "--geoip-db", str(CITY_DB), "--snapshot-pubkey", str(publisher.pubkey), "--log-level", "warning",
         "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )  # fmt: skip
    assert process.stdout is not None
    if "listening on" not in process.stdout.readline():
        process.kill()
        raise RuntimeError(f"pdp serve {n} did not start")
    return process


def _watch(client: Client, version: int, events: list[float], n: int) -> None:
    for event in client.watch_policy(timeout=300):
        if event.policy_version < version:
            events[n] = -1.0  # subscribed, the old version seen
        else:
            events[n] = event.activated_at
            return


def _publish_and_join(publisher: Publisher, watchers: list[threading.Thread]) -> float:
    published = publisher.publish()
    for watcher in watchers:
        watcher.join(timeout=300)
    return published


# --------------------------------------------------------------------------- 2. many followers


def followers(
    store: Store, publisher: Publisher, count: int, per_process: int, deltas: bool, compression: str = "gzip"
) -> dict[str, Any]:
    url = store.url + ("" if deltas else "&deltas=off")
    version = publisher.document["version"]
    sizes = [min(per_process, count - start) for start in range(0, count, per_process)]
    command = [sys.executable, "-m", "benchmarks.fleet_follower", "--url", url, "--pubkey", str(publisher.pubkey),
               "--target-version", str(version), "--count"]  # fmt: skip
    children = [subprocess.Popen([*command, str(size)], stdout=subprocess.PIPE, text=True, cwd=ROOT) for size in sizes]
    try:
        for child in children:
            assert child.stdout is not None
            if "ready" not in json.loads(child.stdout.readline()):
                raise RuntimeError("a follower process failed to start")
        _wait(lambda: store.subscribers() >= count, "every follower to subscribe")
        # What the connected followers cost Redis while nothing changes (their polls, Redis's
        # own housekeeping of the connections), to tell the publication's cost from it.
        _, idle = _measured(store, lambda: threading.Event().wait(BASELINE_SECONDS))
        started = time.monotonic()
        published, cost = _measured(store, lambda: _publish_and_read(publisher, children, compression))
        window = time.monotonic() - started
        reports = [_done(child) for child in children]
    finally:
        for child in children:
            child.wait(timeout=120)
            if child.stdout is not None:
                child.stdout.close()
    times = [at for report in reports for at in report["activated_at"]]
    served = [at - published for at in times if at is not None]
    return {
        "followers": count,
        "processes": len(children),
        "deltas": deltas,
        "compression": compression,
        "serving": len(served),
        **(_percentiles(served) if served else {}),
        **cost,
        "window_s": round(window, 2),
        "idle_egress_bytes_per_s": round(idle["redis_egress_bytes"] / BASELINE_SECONDS),
        "idle_cpu_ms_per_s": round(idle["redis_cpu_ms"] / BASELINE_SECONDS, 2),
        "net_redis_egress_bytes": round(
            cost["redis_egress_bytes"] - idle["redis_egress_bytes"] * window / BASELINE_SECONDS
        ),
        "net_redis_cpu_ms": round(cost["redis_cpu_ms"] - idle["redis_cpu_ms"] * window / BASELINE_SECONDS, 1),
        "via_delta": sum(report["via_delta"] for report in reports),
        "fallbacks": sum(report["fallbacks"] for report in reports),
        "rejections": sum(report["rejections"] for report in reports),
        "follower_cpu_s": round(sum(report["cpu_seconds"] for report in reports), 2),
        "max_rss_mb_per_process": max(report["max_rss_mb"] for report in reports),
    }


_reports: dict[int, dict[str, Any]] = {}


def _publish_and_read(publisher: Publisher, children: list[subprocess.Popen[str]], compression: str) -> float:
    published = publisher.publish(compression)
    for child in children:
        _done(child)
    return published


def _done(child: subprocess.Popen[str]) -> dict[str, Any]:
    """The child's final report (read once, remembered)."""
    if child.pid not in _reports:
        assert child.stdout is not None
        _reports[child.pid] = json.loads(child.stdout.readline())["done"]
    return _reports[child.pid]


# --------------------------------------------------------------------------- 3. one follower's CPU


def apply_cost(store: Store, publisher: Publisher, repeats: int) -> dict[str, Any]:
    """Thread CPU of one run_once that takes a one-rule change as a delta, and as a full fetch."""
    from benchmarks.fleet_follower import Follower
    from pdp.geo import GeoDatabase
    from pdp.signing import TrustedKeys

    keys = TrustedKeys.from_files([publisher.pubkey])
    geo = GeoDatabase(CITY_DB, cache_size=100)
    by_delta = Follower(store.url, keys, geo, 3600)
    whole = Follower(store.url + "&deltas=off", keys, geo, 3600)
    costs: dict[str, list[float]] = {"delta": [], "full": []}
    try:
        for follower in (by_delta, whole):
            assert follower.reloader.run_once().startswith(("activated", "unchanged"))
        idle, idle_cost = _measured(store, lambda: _idle_polls(by_delta, 200))
        for _ in range(repeats):
            publisher.publish()
            for name, follower in (("delta", by_delta), ("full", whole)):
                started = time.thread_time()
                outcome = follower.reloader.run_once()
                costs[name].append(time.thread_time() - started)
                assert outcome.startswith("activated"), outcome
        assert by_delta.holder.status.delta_activations == repeats
    finally:
        by_delta.reloader.stop()
        whole.reloader.stop()
    delta_ms, full_ms = (1000 * statistics.median(costs[name]) for name in ("delta", "full"))
    return {
        "repeats": repeats,
        "delta_cpu_ms": round(delta_ms, 2),
        "full_cpu_ms": round(full_ms, 2),
        "idle_polls": idle,
        "idle_bytes_per_poll": round(idle_cost["redis_egress_bytes"] / idle, 1),
        "idle_redis_cpu_us_per_poll": round(1000 * idle_cost["redis_cpu_ms"] / idle, 2),
    }


def _idle_polls(follower: Any, polls: int) -> int:
    for _ in range(polls):
        assert follower.reloader.run_once() == "unchanged"
    return polls


# --------------------------------------------------------------------------- report


def extrapolate(results: dict[str, Any], sidecars: int = 10_000, poll_seconds: float = 2.0) -> list[str]:
    """The arithmetic, line by line, from the measured per-sidecar figures."""
    lines: list[str] = []
    delta, full, apply = results.get("followers_delta"), results.get("followers_full"), results["apply"]
    if delta and full:
        n = delta["followers"]
        named = [("delta", delta), ("full fetch", full), ("gzip full fetch", results.get("followers_full_gzip"))]
        for name, row in [(name, row) for name, row in named if row]:
            per_bytes, per_cpu = row["net_redis_egress_bytes"] / n, row["net_redis_cpu_ms"] / n
            lines.append(
                f"one change, {name}: {row['net_redis_egress_bytes']:,} B / {n:,} = {per_bytes:,.0f} B per sidecar; "
                f"x {sidecars:,} = {per_bytes * sidecars / 1e6:,.1f} MB of Redis egress; "
                f"Redis CPU {row['net_redis_cpu_ms']:,} ms / {n:,} x {sidecars:,} = {per_cpu * sidecars / 1000:,.2f} s"
            )
    raw, packed = results["sizes"]["snapshot_bytes"], results["sizes"]["stored_gzip_bytes"]
    lines.append(f"uncompressed full fetches (landed main): {raw:,} B x {sidecars:,} = {raw * sidecars / 1e9:,.1f} GB")
    lines.append(f"gzip full fetches: {packed:,} B x {sidecars:,} = {packed * sidecars / 1e9:,.2f} GB")
    polls = sidecars / poll_seconds
    lines.append(
        f"idle: {sidecars:,} sidecars / {poll_seconds:g} s = {polls:,.0f} polls/s x {apply['idle_bytes_per_poll']:g} B"
        f" = {polls * apply['idle_bytes_per_poll'] / 1e3:,.0f} KB/s of egress"
        f" ({apply['idle_bytes_per_poll'] / poll_seconds:,.0f} B/s per sidecar), and"
        f" {polls:,.0f} x {apply['idle_redis_cpu_us_per_poll']:g} us = "
        f"{polls * apply['idle_redis_cpu_us_per_poll'] / 1e4:,.1f} % of Redis's one core"
    )
    return lines


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met): issue #14's acceptance figures, where this run measured them."""
    rows: list[tuple[str, str, bool]] = []
    serve = results.get("serve")
    if serve and serve["sidecars"] >= 50:
        rows.append(("50 pdp serve all serve the change within 1 s (p100)", f"{serve['max_ms']:,.0f} ms",
                     serve["max_ms"] <= 1000 and serve["all_serving"]))  # fmt: skip
    delta, full = results.get("followers_delta"), results.get("followers_full")
    if delta and full and delta["followers"] >= 1000:
        egress = delta["net_redis_egress_bytes"] / full["net_redis_egress_bytes"]
        cpu = delta["net_redis_cpu_ms"] / max(full["net_redis_cpu_ms"], 0.001)
        rows.append(("Redis egress of a change ≤ 2 % of full fetches (N ≥ 1,000)", f"{egress:.2%}", egress <= 0.02))
        rows.append(("Redis CPU of a change ≤ 1/10 of full fetches (N ≥ 1,000)", f"{cpu:.1%}", cpu <= 0.10))
    return rows


def _followers_markdown(results: dict[str, Any]) -> list[str]:
    out: list[str] = []
    rows = [results[name] for name in ("followers_delta", "followers_full", "followers_full_gzip") if name in results]
    if rows:
        out += [
            "| followers | fetch | p50 | p99 | max | Redis egress | Redis CPU | of which idle | follower CPU (all) |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            fetch = "delta" if row["deltas"] else f"full ({'gzip' if row['compression'] == 'gzip' else 'uncompressed'})"
            out.append(
                f"| {row['followers']:,} | {fetch} | {row.get('p50_ms')} ms | "
                f"{row.get('p99_ms')} ms | {row.get('max_ms')} ms | {row['net_redis_egress_bytes']:,} B | "
                f"{row['net_redis_cpu_ms']} ms | {row['redis_cpu_ms'] - row['net_redis_cpu_ms']:.1f} ms over "
                f"{row['window_s']} s | {row['follower_cpu_s']} s |"
            )
        out += [
            "",
            "Redis egress and CPU of the publication, less what the same followers cost it while idle over as long "
            f"(measured for {BASELINE_SECONDS:g} s before; 'of which idle'). Times to serve on this 2-core machine "
            "measure the simulation (a thousand reloads share its two cores, one at a time per process), not a "
            "fleet, where each sidecar has its own CPU.",
            "",
        ]
    if len(rows) >= 2:
        delta, full = rows[:2]
        egress, cpu = "net_redis_egress_bytes", "net_redis_cpu_ms"
        out.append(
            f"Delta against full fetches (uncompressed, as landed main): Redis egress "
            f"{delta[egress] / full[egress]:.2%}, Redis CPU {delta[cpu] / max(full[cpu], 0.001):.1%}."
        )
        if len(rows) == 3:
            out[-1] += (
                f" Against gzip full fetches: egress {delta[egress] / rows[2][egress]:.2%}, "
                f"CPU {delta[cpu] / max(rows[2][cpu], 0.001):.1%}."
            )
        out.append("")
    return out


def markdown(results: dict[str, Any]) -> str:
    sizes = results["sizes"]
    out = [
        f"Fleet simulation, {results['rules']:,} rules, one rule changed per publication (signed; snapshot "
        f"{sizes['snapshot_bytes']:,} B, stored gzip {sizes['stored_gzip_bytes']:,} B, "
        f"delta entry {sizes['delta_entry_bytes']:,} B)",
        "",
    ]
    if "followers_reduced" in results:
        out += [f"Followers reduced: {results['followers_reduced']}.", ""]
    if checks := targets(results):
        out += ["| target | measured | met |", "|---|---|---|"]
        out += [f"| {name} | {value} | {'yes' if met else '**no**'} |" for name, value, met in checks] + [""]
    if "serve" in results:
        row = results["serve"]
        out += [
            "| full `pdp serve` | p50 | p99 | max | Redis egress | Redis CPU | via delta |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {row['sidecars']} | {row['p50_ms']} ms | {row['p99_ms']} ms | {row['max_ms']} ms | "
            f"{row['redis_egress_bytes']:,} B | {row['redis_cpu_ms']} ms | {row['via_delta']} |",
            "",
        ]
    out += _followers_markdown(results)
    apply = results["apply"]
    out += [
        f"One follower alone, CPU to take the change (median of {apply['repeats']}): as a delta "
        f"{apply['delta_cpu_ms']} ms, as a full fetch {apply['full_cpu_ms']} ms. Idle: "
        f"{apply['idle_bytes_per_poll']} B of Redis egress and {apply['idle_redis_cpu_us_per_poll']} us of Redis CPU "
        "per poll.",
        "",
        "Extrapolated to 10,000 sidecars:",
        "",
        *[f"- {line}" for line in extrapolate(results)],
    ]
    return "\n".join(out)


FOLLOWER_MB = 8  # a follower's peak resident size with 10,000 rules, measured (two texts of 1.5 MB, and heap)


def _affordable_followers(reserve_mb: int = 4096) -> int:
    """Followers that fit in half the memory available beyond a reserve: the machine is shared."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return max(0, (int(line.split()[1]) // 1024 - reserve_mb) // 2 // FOLLOWER_MB)
    return 0


def run(
    serve: int, follower_count: int, per_process: int, rules: int, repeats: int, gzip_full: bool = False
) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="pdp-fleet-"))
    store = Store(folder)
    try:
        publisher = Publisher(folder, store, rules)
        publisher.publish()
        results: dict[str, Any] = {"rules": rules}
        if serve:
            results["serve"] = full_sidecars(folder, store, publisher, serve)
        affordable = _affordable_followers()
        if follower_count > affordable:
            results["followers_reduced"] = f"{follower_count:,} asked, {affordable:,} fit in the memory available"
            follower_count = affordable
        if follower_count:
            results["followers_delta"] = followers(store, publisher, follower_count, per_process, deltas=True)
            # As landed main fetched: the whole snapshot, uncompressed.
            results["followers_full"] = followers(store, publisher, follower_count, per_process, False, "none")
            if gzip_full:  # and compressed, as a store may keep it now
                results["followers_full_gzip"] = followers(store, publisher, follower_count, per_process, False)
        results["apply"] = apply_cost(store, publisher, repeats)
        last = cast("list[tuple[bytes, dict[bytes, bytes]]]", store.client.xrevrange(f"{KEY}:deltas", count=1))
        stored = store.client.get(KEY)
        assert isinstance(stored, bytes)
        results["sizes"] = {
            **publisher.sizes,
            "stored_gzip_bytes": len(stored),
            "delta_entry_bytes": len(last[0][1][b"delta"]),
        }
    finally:
        store.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=int, default=50, help="full pdp serve processes (default 50)")
    parser.add_argument("--followers", type=int, default=1000, help="followers without gRPC (default 1,000)")
    parser.add_argument("--per-process", type=int, default=100, help="followers per process (default 100)")
    parser.add_argument("--rules", type=int, default=10_000, help="rules in the snapshot (default 10,000)")
    parser.add_argument("--repeats", type=int, default=5, help="publications for the per-follower CPU figures")
    parser.add_argument("--gzip-full", action="store_true", help="also measure full fetches of a gzip store")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    options = parser.parse_args()
    started = time.monotonic()
    results = run(
        options.serve, options.followers, options.per_process, options.rules, options.repeats, options.gzip_full
    )
    results["duration_s"] = round(time.monotonic() - started, 1)
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"\n(run took {results['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
