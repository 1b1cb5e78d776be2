"""In-process decision cost: GeoIP lookup plus policy evaluation, no gRPC.

    python -m benchmarks.inprocess [--rules 10 1000 10000] [--repeats 7] [--json FILE]

Uses the real full-size GeoLite2-City (2018) from maxminddb-geolite2. A
"decision" is what the server does per participant after decoding the
request: ``geo.locate(ip)`` then ``policy.decide(...)``.

- warm: 1,000 distinct addresses, all already in the location cache.
- cold: every address seen for the first time (a cache miss, a database
  lookup and a cache insertion each).
- full decode: the official C extension's ``Reader.get`` on unseen addresses,
  in the same runs: what one cold lookup would cost if the whole record were
  decoded (pdp decodes only the country and subdivision codes).

Each figure is the median over ``--repeats`` runs of the mean cost per decision.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import maxminddb

from pdp.geo import GeoDatabase, demo_database_path
from pdp.iso3166 import COUNTRIES
from pdp.model import Action, Meeting
from pdp.rules import Policy, parse_policy

SEED = 20201
TAGS = [f"tag-{n}" for n in range(200)] + ["memorial"]
# Where real traffic comes from is skewed; these carry most of the rules.
BUSY = ["CN", "US", "RU", "IR", "GB", "DE", "IN", "BR", "TR", "HK"]


def make_rules(count: int, seed: int = SEED) -> bytes:
    """A JSON snapshot of ``count`` plausible rules over every country.

    Half the rules name a busy country, the rest any country or a US state;
    most are scoped to a tag, some to a host account or meeting id, a few
    apply to every meeting; one in ten is an allow exception, one in twenty a
    shadow rule.
    """
    rng = random.Random(seed)
    countries = sorted(COUNTRIES)
    rules: list[dict[str, Any]] = []
    for n in range(count):
        roll = rng.random()
        if roll < 0.5:
            jurisdiction = [rng.choice(BUSY)]
        elif roll < 0.9:
            jurisdiction = [rng.choice(countries)]
        else:
            jurisdiction = [f"US-{rng.choice(['CA', 'WA', 'NY', 'TX', 'FL'])}"]
        rule: dict[str, Any] = {
            "id": f"rule-{n}",
            "effect": "allow" if rng.random() < 0.1 else "deny",
            "jurisdiction": jurisdiction,
            "priority": rng.randint(0, 100),
            "legal_basis": f"Order {n}/2026",
        }
        scope = rng.random()
        if scope < 0.7:
            rule["meetings"] = {"tags": rng.sample(TAGS, 2)}
        elif scope < 0.85:
            rule["meetings"] = {"host_accounts": [f"account-{rng.randrange(5000)}"]}
        elif scope < 0.97:
            rule["meetings"] = {"meeting_ids": [f"meeting-{rng.randrange(100_000)}"]}
        if rng.random() < 0.05:
            rule["mode"] = "shadow"
        rules.append(rule)
    if count:
        rules[0] = {
            "id": "cn-memorial",
            "effect": "deny",
            "jurisdiction": ["CN"],
            "meetings": {"tags": ["memorial"]},
            "priority": 100,
            "legal_basis": "Order 17/2020",
        }
    return json.dumps({"version": 1, "rules": rules}).encode()


def located_addresses(count: int, seed: int = SEED) -> list[str]:
    """``count`` distinct public IPv4 and IPv6 addresses the database has a country for."""
    rng = random.Random(seed)
    reader = maxminddb.open_database(str(demo_database_path()), maxminddb.MODE_MMAP_EXT)
    found: dict[str, None] = {}
    while len(found) < count:
        if rng.random() < 0.8:
            address = str(ipaddress.IPv4Address(rng.getrandbits(32)))
        else:
            address = str(ipaddress.IPv6Address((0x2001 << 112) | rng.getrandbits(112)))
        record = reader.get(address)
        if isinstance(record, dict) and "country" in record:
            found[address] = None
    reader.close()
    return list(found)


def meetings(count: int, seed: int = SEED) -> list[Meeting]:
    rng = random.Random(seed)
    return [
        Meeting(f"meeting-{rng.randrange(100_000)}", f"account-{rng.randrange(5000)}", frozenset(rng.sample(TAGS, 2)))
        for _ in range(count)
    ]


def per_decision(geo: GeoDatabase, policy: Policy, addresses: Sequence[str], rooms: Sequence[Meeting]) -> float:
    """Mean µs per decision over ``addresses`` (one pass)."""
    locate, decide, join, now = geo.locate, policy.decide, Action.JOIN, time.time()
    pairs = [(address, rooms[n % len(rooms)]) for n, address in enumerate(addresses)]
    started = time.perf_counter()
    for address, room in pairs:
        decide(locate(address), join, room, now)
    return (time.perf_counter() - started) / len(pairs) * 1e6


def full_decode(addresses: Sequence[str]) -> float:
    """Mean µs of the official C extension's Reader.get on ``addresses``."""
    reader = maxminddb.open_database(str(demo_database_path()), maxminddb.MODE_MMAP_EXT)
    get = reader.get
    started = time.perf_counter()
    for address in addresses:
        get(address)
    elapsed = time.perf_counter() - started
    reader.close()
    return elapsed / len(addresses) * 1e6


def measure(rule_count: int, repeats: int, warm_size: int, cold_size: int) -> dict[str, Any]:
    policy = parse_policy(make_rules(rule_count), f"{rule_count}-rules.json")
    addresses = located_addresses(warm_size + 2 * cold_size * repeats)
    warm_set, cold_pool = addresses[:warm_size], addresses[warm_size:]
    rooms = meetings(997)
    warm_runs, cold_runs, get_runs = [], [], []
    for run in range(repeats):
        geo = GeoDatabase(demo_database_path(), cache_size=100_000)
        gc.collect()
        chunk = cold_pool[2 * run * cold_size : (2 * run + 1) * cold_size]
        cold_runs.append(per_decision(geo, policy, chunk, rooms))
        get_runs.append(full_decode(cold_pool[(2 * run + 1) * cold_size : (2 * run + 2) * cold_size]))
        per_decision(geo, policy, warm_set, rooms)  # fill the cache
        warm_runs.append(statistics.mean(per_decision(geo, policy, warm_set, rooms) for _ in range(20)))
        geo.close()
    return {
        "rules": rule_count,
        "warm_us": round(statistics.median(warm_runs), 3),
        "cold_us": round(statistics.median(cold_runs), 3),
        "full_decode_us": round(statistics.median(get_runs), 3),
        "warm_runs_us": [round(v, 3) for v in warm_runs],
        "cold_runs_us": [round(v, 3) for v in cold_runs],
    }


def realistic_mix(rule_count: int, distinct: int = 50_000, lookups: int = 200_000) -> dict[str, Any]:
    """Decisions over a skewed address mix (popularity ~ 1/rank), cold start, one pass."""
    policy = parse_policy(make_rules(rule_count), f"{rule_count}-rules.json")
    addresses = located_addresses(distinct, seed=SEED + 1)
    rng = random.Random(SEED + 2)
    weights = [1 / (rank + 1) for rank in range(distinct)]
    stream = rng.choices(addresses, weights=weights, k=lookups)
    geo = GeoDatabase(demo_database_path(), cache_size=100_000)
    gc.collect()
    cost = per_decision(geo, policy, stream, meetings(997))
    hit_ratio = geo.hits / (geo.hits + geo.misses)
    geo.close()
    return {
        "description": f"{lookups:,} lookups over {distinct:,} addresses, popularity 1/rank, {rule_count:,} rules",
        "us_per_decision": round(cost, 3),
        "hit_ratio": round(hit_ratio, 4),
    }


def activation_ms(rule_count: int, repeats: int) -> float:
    """Median milliseconds to parse, validate and compile a JSON snapshot of ``rule_count`` rules."""
    data = make_rules(rule_count)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        parse_policy(data, "activation.json")
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", type=int, nargs="+", default=[10, 1000, 10_000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warm-size", type=int, default=1000)
    parser.add_argument("--cold-size", type=int, default=5000)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    options = parser.parse_args(argv)
    results = [measure(n, options.repeats, options.warm_size, options.cold_size) for n in options.rules]
    meta = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "database": "GeoLite2-City 2018-07-03 (maxminddb-geolite2)",
        "repeats": options.repeats,
    }
    print(f"# in-process decision cost, µs per decision (median of {options.repeats} runs); {meta['python']}")
    print(f"{'rules':>7} {'warm µs':>9} {'cold µs':>9} {'full decode µs':>15}")
    for row in results:
        print(f"{row['rules']:>7} {row['warm_us']:>9.2f} {row['cold_us']:>9.2f} {row['full_decode_us']:>15.2f}")
    if options.json:
        with Path(options.json).open("w", encoding="utf-8") as handle:
            json.dump({"meta": meta, "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
