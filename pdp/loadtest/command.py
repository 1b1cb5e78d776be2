"""``pdp loadtest``: open-loop load at a fixed rate against a running sidecar.

Kept apart from ``pdp/cli.py`` so the command imports hpack and hdrhistogram
only when it runs; cli.py registers it with :func:`add_parser`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pdp.config import parse_listen

EXIT_OK, EXIT_FAILED_CALLS, EXIT_USAGE = 0, 1, 2

_DESCRIPTION = """\
Send Check (or CheckBatch with --batch N) calls to a running sidecar at a fixed
rate and report latency percentiles, errors by gRPC status and the achieved rate.

Open loop (--rate R): calls leave on schedule whether or not earlier ones have
returned, and each latency is measured from its intended send time, so a server
that stalls shows in the percentiles (no coordinated omission). Closed loop
(--closed): --in-flight callers each send the next call when the previous one
returns; it finds the maximum rate, not the latency under load.

The client is one thread on one HTTP/2 connection (--connections N for more) without TLS (loopback TCP or a
Unix socket, as meeting nodes use); run it on its own core (taskset -c 1 ...) so
it never sets the pace. --repeat N with --json gives the repeats that
`python -m benchmarks.compare` needs to tell a regression from noise.
"""

_EPILOG = "Exit codes: 0 every call succeeded, 1 some calls failed, 2 usage or connection error."


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _target(text: str) -> str:
    try:
        parse_listen(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_parser(commands: Any) -> None:
    """Register ``loadtest`` on the ``pdp`` command's subparsers."""
    parser = commands.add_parser(
        "loadtest",
        help="open-loop load at a fixed rate against a running sidecar",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", required=True, type=_target, help="HOST:PORT or unix:/path of the sidecar")
    loop = parser.add_mutually_exclusive_group(required=True)
    loop.add_argument("--rate", type=_positive_float, metavar="CALLS_PER_S", help="open loop at this rate")
    loop.add_argument("--closed", action="store_true", help="closed loop: find the maximum rate instead")
    parser.add_argument("--in-flight", type=_count, default=16, help="--closed: concurrent callers (default 16)")
    parser.add_argument(
        "--connections",
        type=_count,
        default=1,
        metavar="N",
        help="HTTP/2 connections to spread the calls over (default 1); several reach every worker of"
        " `pdp serve --processes N` on TCP",
    )
    parser.add_argument(
        "--duration", type=_positive_float, default=10.0, metavar="SECONDS", help="measured time (default 10)"
    )
    parser.add_argument("--warmup", type=float, default=1.0, metavar="SECONDS", help="unmeasured warm-up (default 1)")
    parser.add_argument("--batch", type=_count, metavar="N", help="send CheckBatch calls of N participants")
    parser.add_argument(
        "--participants",
        metavar="FILE",
        help="addresses to cycle through, one per line ('#' comments); default a mainland-China and a UK address",
    )
    parser.add_argument(
        "--tag", action="append", metavar="TAG", help="meeting tag sent with every call (repeatable; default memorial)"
    )
    parser.add_argument("--repeat", type=_count, default=1, metavar="N", help="run N times (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON: one run, or {'runs': [...]} with --repeat")
    parser.set_defaults(handler=cmd_loadtest)


def cmd_loadtest(options: argparse.Namespace) -> int:
    try:
        from pdp.loadtest.h2 import ProtocolError
        from pdp.loadtest.run import DEFAULT_ADDRESSES, LoadSettings, read_participants, run
    except ImportError:
        from pdp.loadtest import MISSING_EXTRA

        print(f"pdp: {MISSING_EXTRA}", file=sys.stderr)
        return EXIT_USAGE
    try:
        addresses = read_participants(options.participants) if options.participants else DEFAULT_ADDRESSES
    except (OSError, ValueError) as error:
        print(f"pdp: --participants: {error}", file=sys.stderr)
        return EXIT_USAGE
    settings = LoadSettings(
        target=options.target,
        seconds=options.duration,
        rate=options.rate or 0.0,
        in_flight=options.in_flight,
        batch=options.batch or 0,
        addresses=addresses,
        warmup=max(options.warmup, 0.0),
        tags=tuple(options.tag or ("memorial",)),
        connections=options.connections,
    )
    progress = None if options.json else (lambda text: print(f"pdp loadtest: {text}", file=sys.stderr))
    runs = []
    try:
        for _ in range(options.repeat):
            runs.append(run(settings, progress))
    except (OSError, ProtocolError) as error:
        print(f"pdp: {options.target}: {error}", file=sys.stderr)
        return EXIT_USAGE
    if options.json:
        print(json.dumps(runs[0] if len(runs) == 1 else {"runs": runs}, indent=2))
    else:
        for number, figures in enumerate(runs, start=1):
            print("\n".join(summary_lines(figures, number if len(runs) > 1 else 0)))
    return EXIT_FAILED_CALLS if any(figures["errors"] for figures in runs) else EXIT_OK


def summary_lines(figures: dict[str, Any], number: int = 0) -> list[str]:
    """The text report of one run."""
    loop = (
        f"open loop at {figures['requested_rate']:g}/s"
        if figures["mode"] == "open"
        else f"closed loop, {figures['in_flight']} in flight"
    )
    batch = f" of {figures['batch']}" if figures["rpc"] == "CheckBatch" else ""
    heading = f"run {number}: " if number else ""
    lines = [
        f"{heading}{figures['rpc']}{batch}, {loop}, {figures['seconds']:g} s against {figures['target']}",
        f"  achieved   {figures['achieved_rate']:,.1f} calls/s ({figures['calls']:,} calls, {figures['ok']:,} ok,"
        f" {figures['decisions']:,} decisions)",
    ]
    latency = figures["latency_us"]
    if latency:
        lines.append("  latency    " + "  ".join(f"{name} {value:,} µs" for name, value in latency.items()))
    errors = figures["errors"]
    lines.append(
        "  errors     " + (", ".join(f"{status} {count:,}" for status, count in sorted(errors.items())) or "none")
    )
    return lines
