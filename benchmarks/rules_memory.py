"""Peak memory of `pdp serve` against the number of rules, for sizing the chart's memory limit.

    python -m benchmarks.rules_memory [--rules 1 10000 100000 300000] [--json FILE]

For each size, a fresh `pdp serve` (real GeoLite2-City 2018, 100,000 cache entries) is
taken through what raises its peak in production, and its peak RSS (``VmHWM``, the
kernel's ``ru_maxrss`` of that process) is read after each step:

1. start: the snapshot of N rules (``benchmarks.inprocess.make_rules``, JSON) compiled;
2. a full cache: 100,000 distinct located addresses checked;
3. a snapshot reload in which every rule changed (nothing can be reused, old and new
   policy both live until the swap);
4. a GeoIP database reload (old and new private copies both live until the last call
   holding the old one finishes).

RSS counts only the database pages that lookups touched; a container's memory cgroup
charges the whole private copy, and two of them during a database reload. So the
figure to size a memory limit by is the charge estimate: the peak after the rules
reload, less the copy's resident pages, plus two whole copies.

The per-10,000-rule figure is the least-squares slope of the final peak against N.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import inprocess
from benchmarks.harness import pdp_serve
from pdp.client import Client
from pdp.geo import demo_database_path


def _wait(predicate: Callable[[], bool], what: str, deadline: float = 900.0) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _status_mb(pid: int, key: str) -> float:
    """A field of /proc/PID/status, in MiB (the kernel counts in KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _all_rules_changed(data: bytes) -> bytes:
    document = json.loads(data)
    document["version"] = 2
    for rule in document["rules"]:
        rule["legal_basis"] += " (amended)"
    return json.dumps(document).encode()


def measure(count: int, folder: Path, addresses: list[str]) -> dict[str, Any]:
    snapshot = folder / f"rules-{count}.json"
    data = inprocess.make_rules(count)
    snapshot.write_bytes(data)
    database = folder / "GeoLite2-City.mmdb"
    shutil.copy(demo_database_path(), database)
    started = time.perf_counter()
    server = pdp_serve(
        f"unix:{folder}/rules-memory.sock", snapshot, "--cache-size", "100000",
        "--poll-seconds", "0.2", "--geoip-poll-seconds", "0.2", geoip=str(database),
    )  # fmt: skip
    peaks: dict[str, float] = {"start": round(server.peak_rss_mb(), 1)}
    start_seconds = time.perf_counter() - started
    try:
        with Client(server.address, timeout=60) as client:
            for offset in range(0, len(addresses), 1000):
                client.check_batch("m-1", addresses[offset : offset + 1000], tags=["memorial"])
            cached = int(client.status().cache_size)
            peaks["full cache"] = round(server.peak_rss_mb(), 1)
            staged = folder / "staged.json"
            staged.write_bytes(_all_rules_changed(data))
            staged.replace(snapshot)
            _wait(lambda: client.status().policy_version == 2, "the reload of every rule")
            peaks["rules reload"] = round(server.peak_rss_mb(), 1)
            resident_copy = _status_mb(server.process.pid, "RssShmem")
            staged_db = folder / "staged.mmdb"
            shutil.copy(demo_database_path(), staged_db)
            staged_db.replace(database)
            _wait(lambda: client.status().geoip_reloads == 1, "the database reload")
            # Calls after the swap drop the last references to the old copy.
            client.check_batch("m-1", addresses[:1000], tags=["memorial"])
            peaks["database reload"] = round(server.peak_rss_mb(), 1)
            steady = round(server.rss_mb(), 1)
            anon = _status_mb(server.process.pid, "RssAnon")
    finally:
        server.stop()
    database_mb = database.stat().st_size / 2**20
    return {
        "rules": count,
        # What a container's memory limit must hold: RSS counts only the pages of the
        # database copy that lookups touched, a cgroup charges the whole memfd, and during
        # a database reload two of them (see the module docstring).
        "charge_estimate_mib": round(peaks["rules reload"] - resident_copy + 2 * database_mb, 1),
        "snapshot_mb": round(len(data) / 1e6, 2),
        "start_seconds": round(start_seconds, 1),
        "cache_entries": cached,
        "peak_rss_mb": peaks,
        "rss_after_mb": steady,
        "anon_after_mb": anon,
    }


def slope_per_10k(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares line through (rules, MB): MB per 10,000 rules and the intercept."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return slope * 10_000, mean_y - slope * mean_x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", type=int, nargs="+", default=[1, 10_000, 100_000, 300_000])
    parser.add_argument("--json", metavar="FILE")
    options = parser.parse_args(argv)
    addresses = inprocess.located_addresses(100_000, seed=7)
    rows = []
    print(
        "| rules | snapshot MB | start s | peak RSS MiB: at start | full cache | rules reload | database reload |",
        end="",
    )
    print(" RSS after | anon after | charge estimate MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="pdp-rules-memory-") as folder:
        for count in options.rules:
            row = measure(count, Path(folder), addresses)
            rows.append(row)
            peaks = row["peak_rss_mb"]
            print(
                f"| {count:,} | {row['snapshot_mb']} | {row['start_seconds']} | {peaks['start']} | "
                f"{peaks['full cache']} | {peaks['rules reload']} | {peaks['database reload']} | "
                f"{row['rss_after_mb']} | {row['anon_after_mb']} | {row['charge_estimate_mib']} |",
                flush=True,
            )
    if len(rows) > 1:
        for key, name in (("peak_rss_mb", "peak RSS"), ("charge_estimate_mib", "charge estimate")):
            points = [(row["rules"], row[key]["database reload"] if key == "peak_rss_mb" else row[key]) for row in rows]
            per_10k, intercept = slope_per_10k(points)
            print(f"{name} = {intercept:.0f} MiB + {per_10k:.1f} MiB per 10,000 rules (least squares)")
    if options.json:
        Path(options.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
