"""What a Check's stages cost inside a loaded `pdp serve`, against the same stages in a tight loop.

    python -m benchmarks.in_situ [--seconds 4] [--repeats 3] [--addresses 2000]

The closed-loop gap to the floor (``benchmarks.check_floor``) is far larger than
pdp's code costs when timed in a loop. This says where the rest goes. It starts
`pdp serve` (10,000 rules, the demo GeoLite2-City, a Unix socket, pinned to the
server core) with a stage clock installed before the server is built: each stage
of the Check path (decode, the meeting from the memo of meetings by their bytes
(see pdp.wire.MeetingMemo), its bounds, location, the decision with its answer, from
the state's memo (see pdp.batch.decide_place), and the handler as a whole) is
wrapped to add up the *thread* CPU time it takes (``CLOCK_THREAD_CPUTIME_ID``), so
that waiting, and other threads, never count.
The load generator warms every address into the location cache, then drives
closed loop, 16 in flight. On stop the server writes its totals.

The same stages are then timed in a tight loop in this process, on the same
requests, and a fixed pure-Python workload is timed both ways as the control:
what the machine itself does to code that runs between a loaded server's
thread switches. The clock's own cost (two reads, measured in the server) is
taken off every stage, once per clock the stage contains.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from benchmarks import inprocess
from benchmarks.harness import Server, run_load

_clock = time.thread_time_ns
# Stage: the clocks nested inside it (taken off with its own). Leaves first.
STAGES = {
    "decode": 0,
    "meeting memo": 0,
    "meeting bounds": 0,
    "location": 0,
    "decision and answer": 0,
    "decision path": 3,
    "handler": 8,  # the six above, the control and the clock's own measure
}
_totals: dict[str, list[int]] = {}
_WORK = {n: n for n in range(64)}


def control() -> int:
    """The control workload: plain dict reads and integer adds, no allocation."""
    total = 0
    for n in range(40):
        total += _WORK[n & 63]
    return total


def _timed(stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
    total = _totals.setdefault(stage, [0, 0])

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = _clock()
        try:
            return function(*args, **kwargs)
        finally:
            total[0] += _clock() - started
            total[1] += 1

    return timed


def install(out: str) -> None:
    """Wrap the Check path's stages (before the server is built) and write the
    totals to ``out`` when the process exits."""
    from pdp import batch, bounds, decisions, geo, servicer, wire

    # The names as the Check path looks them up: module globals and class attributes.
    setattr(servicer, "check_parts", _timed("decode", wire.check_parts))  # noqa: B010  # mypy: a module's name
    setattr(wire.MeetingMemo, "meeting", _timed("meeting memo", wire.MeetingMemo.meeting))  # noqa: B010
    setattr(decisions, "checked_meeting", _timed("meeting bounds", bounds.checked_meeting))  # noqa: B010  # not exported
    setattr(decisions, "decide_place", _timed("decision and answer", batch.decide_place))  # noqa: B010
    setattr(geo.GeoDatabase, "locate", _timed("location", geo.GeoDatabase.locate))  # noqa: B010  # mypy: a method
    setattr(decisions.DecisionPath, "check", _timed("decision path", decisions.DecisionPath.check))  # noqa: B010
    control_total, clock_total = _totals.setdefault("control", [0, 0]), _totals.setdefault("clock", [0, 0])
    check = servicer.AdmissionServicer.check_encoded

    def with_control(self: Any, data: bytes, context: Any) -> bytes:
        started = _clock()
        clock_total[0] += _clock() - started
        clock_total[1] += 1
        started = _clock()
        control()
        control_total[0] += _clock() - started
        control_total[1] += 1
        return check(self, data, context)

    setattr(servicer.AdmissionServicer, "check_encoded", _timed("handler", with_control))  # noqa: B010
    atexit.register(lambda: Path(out).write_text(json.dumps(_totals)))
    # SIGUSR1: the totals so far (the warm-up's), to be taken off the final ones.
    signal.signal(signal.SIGUSR1, lambda *_: Path(out + ".warm").write_text(json.dumps(_totals)))


def _per_call(totals: dict[str, list[int]]) -> dict[str, float]:
    """Mean µs per call of each stage, the clocks' own cost taken off."""
    clock = totals["clock"][0] / max(totals["clock"][1], 1)
    return {
        stage: (total - (STAGES.get(stage, 0) + 1) * clock * calls) / max(calls, 1) / 1000
        for stage, (total, calls) in totals.items()
        if stage != "clock"
    }


def in_the_loop(snapshot: Path, addresses: Sequence[str], rounds: int = 5) -> dict[str, float]:
    """The same stages, timed in a tight loop in this process (wall time, one thread)."""
    from pdp import bounds, servicer, wire
    from pdp._proto import admission_pb2 as pb
    from pdp.batch import decide_place
    from pdp.decisions import DecisionPath
    from pdp.geo import GeoDatabase, demo_database_path
    from pdp.loadtest.run import build_requests
    from pdp.rules import parse_policy
    from pdp.state import PolicyHolder
    from pdp.wire import encode_check

    geo, policy, holder = GeoDatabase(demo_database_path()), parse_policy(snapshot.read_bytes()), PolicyHolder()
    active = holder.activate(policy, geo, "loop")
    path = DecisionPath(holder, None, None, None)
    handler = servicer.AdmissionServicer(path, 1000, 4).check_encoded
    messages = [request.SerializeToString() for request in build_requests(addresses, 0)]
    parts = [wire.check_parts(message) for message in messages]
    meeting_bytes = [part[1] for part in parts if part is not None]
    memo = wire.MeetingMemo()
    meeting = bounds.checked_meeting(pb.Meeting.FromString(meeting_bytes[0]), 1)
    locations = [geo.locate(address) for address in addresses]
    now = time.time()
    stages: dict[str, tuple[Callable[[Any], Any], Sequence[Any]]] = {
        "handler": (lambda message: handler(message, cast(Any, None)), messages),
        "decode": (wire.check_parts, messages),
        "meeting memo": (memo.meeting, meeting_bytes),
        "meeting bounds": (lambda _: bounds.checked_meeting(meeting, 1), addresses),
        "location": (geo.locate, addresses),
        "decision and answer": (lambda place: decide_place(active, place, meeting, 1, now, encode_check), locations),
        "control": (lambda _: control(), addresses),
    }
    measured = {}
    for stage, (function, items) in stages.items():
        for item in items:  # warm
            function(item)
        started = time.perf_counter()
        for _ in range(rounds):
            for item in items:
                function(item)
        measured[stage] = (time.perf_counter() - started) / (rounds * len(items)) * 1e6
    measured["decision path"] = sum(measured[stage] for stage in ("meeting bounds", "location", "decision and answer"))
    return measured


def start_clocked(folder: Path, snapshot: Path, out: Path) -> Server:
    """`pdp serve` on ``folder``/pdp.sock with the stage clock, writing its totals to ``out`` on exit."""
    bootstrap = (f"import sys; from benchmarks import in_situ; in_situ.install({str(out)!r}); "
                 "from pdp.cli import main; sys.exit(main())")  # fmt: skip
    return Server.start([sys.executable, "-c", bootstrap, "serve", "--listen", f"unix:{folder}/pdp.sock",
                         "--snapshot", str(snapshot), "--geoip-db", "demo", "--log-format", "text"])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--addresses", type=int, default=2000, help="distinct located addresses, all cached first")
    options = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="pdp-in-situ-"))
    addresses = inprocess.located_addresses(options.addresses)
    listed, snapshot, out = folder / "addresses.txt", folder / "rules-10000.json", folder / "stages.json"
    listed.write_text("\n".join(addresses))
    snapshot.write_bytes(inprocess.make_rules(10_000))
    server = start_clocked(folder, snapshot, out)
    load = [os.getloadavg()[0]]
    try:
        run_load("--target", server.address, "--addresses", str(listed), "--mode", "closed", "--warmup", "0",
                 "--seconds", "60", "--max-calls", str(len(addresses)))  # fmt: skip
        server.process.send_signal(signal.SIGUSR1)
        warm = _written(Path(f"{out}.warm"))
        for _ in range(options.repeats):
            run_load("--target", server.address, "--addresses", str(listed), "--mode", "closed", "--in-flight", "16",
                     "--warmup", "0", "--seconds", str(options.seconds))  # fmt: skip
    finally:
        server.stop()
    load.append(os.getloadavg()[0])
    served = _per_call(_minus(json.loads(out.read_text()), warm))
    looped = in_the_loop(snapshot, addresses)
    print(f"load average {load[0]:.2f} → {load[1]:.2f}; {options.repeats} × {options.seconds:g} s closed loop,"
          " 16 in flight, every address cached first")  # fmt: skip
    print(f"{'stage':19s} {'in a loop µs':>12s} {'in the server µs':>17s} {'ratio':>6s}")
    for stage in ("control", *STAGES):
        print(f"{stage:19s} {looped[stage]:12.2f} {served[stage]:17.2f} {served[stage] / looped[stage]:6.1f}×")
    return 0


def _written(path: Path, timeout: float = 30.0) -> dict[str, list[int]]:
    """The totals the server writes on SIGUSR1 (its main thread looks for signals every 0.25 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):  # not yet written, or half written
            time.sleep(0.05)
    raise RuntimeError(f"the server wrote no {path} within {timeout:g} s")


def _minus(totals: dict[str, list[int]], warm: dict[str, list[int]]) -> dict[str, list[int]]:
    return {stage: [total - warm.get(stage, [0, 0])[0], calls - warm.get(stage, [0, 0])[1]]
            for stage, (total, calls) in totals.items()}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
