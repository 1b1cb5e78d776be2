"""Memory and start-up of three ways to hold a GeoIP database, each in a fresh process.

    python -m benchmarks.geo_memory [--lookups 200000] [--repeats 3] [--json FILE]

- ``file-mmap`` (what pdp did before): both readers map the file itself. Cheap, but any
  write to the file reaches the serving reader (``cp`` over it is SIGBUS).
- ``memfd`` (pdp now, :func:`pdp.mmdb.load`): the file is copied into a sealed
  memory file, both readers map the copy.
- ``memory``: the file is read into Python bytes, gated by the C extension on a
  memory-file copy, then handed to maxminddb-rust's ``MODE_FD`` reader, which keeps
  its own buffer; the bytes and the memory file are dropped.

Each mode runs the same probe validation, then random public IPv4 lookups through
``get_path`` (touching the pages a server touches). Reported per database: start-up
(load and validate), RSS after the load and after the lookups, split into anonymous,
file-backed and shared memory (memfd pages are "shared"; a container's memory limit
counts anonymous and shared memory, and file pages only as reclaimable cache), and
the peak RSS (``ru_maxrss``). Median of ``--repeats`` fresh processes.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODES = ("file-mmap", "memfd", "memory")


def _status() -> dict[str, float]:
    """VmRSS and its parts, in MB, from /proc/self/status."""
    wanted = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in wanted:
            values[wanted[key]] = int(rest.split()[0]) / 1024
    return values


def _open(mode: str, path: str) -> Any:
    import maxminddb_rust

    from pdp import mmdb

    if mode == "memfd":
        return mmdb.load(path).reader
    if mode == "file-mmap":
        metadata, expected = mmdb._gate(path, path)
        reader = maxminddb_rust.open_database(path, maxminddb_rust.MODE_MMAP)
    else:
        data = Path(path).read_bytes()
        with mmdb._private_copy(path) as (copy, _digest, _look):
            metadata, expected = mmdb._gate(path, copy)
        reader = maxminddb_rust.open_database(io.BytesIO(data), maxminddb_rust.MODE_FD)
        del data
    if [mmdb._served_codes(reader, probe) for probe in mmdb._probes(metadata.ip_version)] != expected:
        raise RuntimeError("readers disagree")
    return reader


def child(mode: str, path: str, lookups: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    from pdp import mmdb

    rng = random.Random(6052)
    addresses = [
        f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        for _ in range(lookups)
    ]
    before = _status()
    started = time.perf_counter()
    reader = _open(mode, path)
    load_ms = (time.perf_counter() - started) * 1000
    loaded = _status()
    for address in addresses:
        reader.get_path(address, mmdb.COUNTRY)
    served = _status()
    return {
        "mode": mode,
        "load_ms": load_ms,
        "baseline_rss_mb": before["rss"],
        "loaded": {key: loaded[key] - before.get(key, 0) for key in loaded},
        "after_lookups": {key: served[key] - before.get(key, 0) for key in served},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure(mode: str, path: str, lookups: int) -> dict[str, Any]:
    output = subprocess.run(
        [sys.executable, "-m", "benchmarks.geo_memory", "--child", mode, path, str(lookups)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(output)
    return result


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(get: Callable[[dict[str, Any]], float]) -> float:
        return round(float(statistics.median(get(run) for run in runs)), 1)

    return {
        "load_ms": med(lambda r: r["load_ms"]),
        "loaded_rss_mb": med(lambda r: r["loaded"]["rss"]),
        "rss_mb": med(lambda r: r["after_lookups"]["rss"]),
        "anon_mb": med(lambda r: r["after_lookups"]["anon"]),
        "file_mb": med(lambda r: r["after_lookups"]["file"]),
        "shmem_mb": med(lambda r: r["after_lookups"]["shmem"]),
        "peak_rss_mb": med(lambda r: r["peak_rss_mb"]),
        "baseline_rss_mb": med(lambda r: r["baseline_rss_mb"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lookups", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "LOOKUPS"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        mode, path, lookups = options.child
        print(json.dumps(child(mode, path, int(lookups))))
        return 0
    from pdp.geo import demo_database_path

    root = Path(__file__).resolve().parent.parent
    databases = {
        "GeoLite2-City 2018": str(demo_database_path()),
        "GeoIP2-City-Test": str(root / "tests/data/maxmind/test-data/GeoIP2-City-Test.mmdb"),
    }
    results: dict[str, Any] = {}
    print("| database | size MB | mode | start-up ms | RSS after load MB | RSS after lookups MB |", end="")
    print(" anon | file | shmem | peak RSS MB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, path in databases.items():
        size = Path(path).stat().st_size / 1e6
        for mode in MODES:
            # Interleaved runs, so that a busy moment of the shared machine hits every mode alike.
            runs = [measure(mode, path, options.lookups) for _ in range(options.repeats)]
            row = median_of(runs)
            results[f"{name}/{mode}"] = row
            print(
                f"| {name} | {size:.1f} | {mode} | {row['load_ms']} | {row['loaded_rss_mb']} | {row['rss_mb']} | "
                f"{row['anon_mb']} | {row['file_mb']} | {row['shmem_mb']} | {row['peak_rss_mb']} |"
            )
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
