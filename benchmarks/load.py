"""The suite's load generator: ``pdp loadtest``'s engine behind the flags the suite passes.

    python -m benchmarks.load --target unix:/tmp/pdp.sock --mode open --rate 4000 --seconds 10
    python -m benchmarks.load --target 127.0.0.1:50051 --mode closed --in-flight 16 --rpc batch --batch 100

One process, meant to be pinned to its own core; prints one JSON object (see
``pdp.loadtest.run``): calls, decisions, achieved rate, errors by status and
latency percentiles in microseconds.
"""

from __future__ import annotations

import argparse
import json
import sys

from pdp.loadtest.run import DEFAULT_ADDRESSES, LoadSettings, read_participants, run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--rpc", choices=("check", "batch"), default="check")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--mode", choices=("open", "closed"), default="closed")
    parser.add_argument("--rate", type=float, default=1000.0, help="open loop: calls per second")
    parser.add_argument("--in-flight", type=int, default=16, help="closed loop: concurrent callers")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--addresses", help="file of IP addresses to cycle through")
    parser.add_argument("--max-calls", type=int, default=0, help="closed loop: stop after this many calls")
    options = parser.parse_args()
    settings = LoadSettings(
        target=options.target,
        seconds=options.seconds,
        rate=options.rate if options.mode == "open" else 0.0,
        in_flight=options.in_flight,
        batch=options.batch if options.rpc == "batch" else 0,
        addresses=read_participants(options.addresses) if options.addresses else DEFAULT_ADDRESSES,
        warmup=options.warmup,
        max_calls=options.max_calls,
    )
    print(json.dumps(run(settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
