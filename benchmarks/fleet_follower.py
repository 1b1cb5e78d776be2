"""Many sidecar followers in one process, for the fleet simulation (benchmarks/fleet.py).

Each follower is what ``pdp serve`` runs without the gRPC server: a real
Redis source (its own connections, pub/sub thread and head polls), a real
reloader (delta application or full fetch, signature checks, complete
validation, incremental compile, swap) and a policy holder. Only the first
compile is shared: every follower's first fetch is real, and it is then given
the one policy compiled from those bytes instead of compiling 10,000 rules
again (200 ms each, a thousand times, would only measure the simulation).

Protocol on stdout, one JSON object a line: ``{"ready": ...}`` once every
follower follows, then ``{"done": ...}`` when all have activated the target
version (or the timeout passed).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pdp.geo import GeoDatabase
from pdp.reload import Reloader, read_snapshot
from pdp.rules import Policy
from pdp.signing import TrustedKeys
from pdp.sources import SourceOptions, open_source
from pdp.sources.redis_source import RedisSource
from pdp.state import Active, PolicyHolder

CITY_DB = Path(__file__).resolve().parent.parent / "tests" / "data" / "maxmind" / "test-data" / "GeoIP2-City-Test.mmdb"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class OneAtATime(Reloader):
    """The real reloader, one step at a time in this process.

    In a fleet every sidecar has a CPU of its own; here a hundred share one
    interpreter, and a hundred compiles at once (each pacing itself with a
    0.1 ms switch interval, see pdp.pacing) measured the GIL, not pdp: even four
    at a time cost three times the CPU of one. Steps overlap across the
    simulation's processes.
    """

    slots = threading.Lock()

    def run_once(self) -> str:
        with self.slots:
            return super().run_once()


class Follower:
    def __init__(self, url: str, keys: TrustedKeys, geo: GeoDatabase, poll_seconds: float, target: int = 0) -> None:
        self.holder = PolicyHolder()
        self.holder.activate_geo(geo)
        self.source = open_source(url, SourceOptions(keys=keys))
        self.reloader = OneAtATime(self.holder, self.source, keys=keys, poll_seconds=poll_seconds)
        self.activated: dict[int, float] = {}
        self.reached = threading.Event()
        self.target = target  # the version to wait for (0: none)
        self.holder.subscribe(self._on_activation)

    def _on_activation(self, active: Active) -> None:
        self.activated.setdefault(active.policy.version, time.time())
        if self.target and active.policy.version >= self.target:
            self.reached.set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--pubkey", required=True)
    parser.add_argument("--target-version", type=int, required=True)
    parser.add_argument("--poll-seconds", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    options = parser.parse_args()
    keys = TrustedKeys.from_files([options.pubkey])
    # A hundred subscribers waking four times a second to look for close() cost this
    # interpreter more than their reloads did; once every two seconds is enough here.
    RedisSource.close_check_seconds = 2.0
    geo = GeoDatabase(CITY_DB, cache_size=100)
    followers = [
        Follower(options.url, keys, geo, options.poll_seconds, options.target_version) for _ in range(options.count)
    ]
    compiled: dict[str, Policy] = {}  # by the fetched bytes' digest: one compile for all
    for follower in followers:
        fetched = follower.source.fetch()  # a real first fetch each
        assert fetched is not None
        if fetched.sha256 not in compiled:
            compiled[fetched.sha256] = read_snapshot(fetched.data, keys, options.url)
        shared = compiled[fetched.sha256]
        follower.holder.activate_policy(shared, options.url)
        follower.source.commit(fetched)
        follower.reloader.start()
    print(json.dumps({"ready": len(followers)}), flush=True)

    cpu_before = _cpu_seconds()
    deadline = time.monotonic() + options.timeout
    for follower in followers:
        follower.reached.wait(max(0.0, deadline - time.monotonic()))
    cpu = _cpu_seconds() - cpu_before
    statuses = [follower.holder.status for follower in followers]
    done = {
        "activated_at": [f.activated.get(options.target_version) for f in followers],
        "via_delta": sum(s.delta_activations for s in statuses),
        "fallbacks": sum(s.delta_fallbacks for s in statuses),
        "rejections": sum(s.rejections for s in statuses),
        "errors": sum(s.fetch_errors for s in statuses),
        "cpu_seconds": round(cpu, 3),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps({"done": done}), flush=True)
    with ThreadPoolExecutor(max_workers=64) as pool:  # each stop waits for its threads: wait together
        list(pool.map(lambda follower: follower.reloader.stop(), followers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
