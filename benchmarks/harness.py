"""Processes under measurement: start pinned, wait for readiness, read CPU and RSS from /proc."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SERVER_CORE, CLIENT_CORE = 0, 1
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of process ``pid`` (all threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def stolen() -> tuple[int, int]:
    """(steal, all) CPU ticks of the machine so far, from /proc/stat: the time a
    hypervisor gave this VM's CPUs to someone else, which no process here sees as its own."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return values[7], sum(values)


def stolen_share(since: tuple[int, int]) -> float:
    """The share of CPU time stolen since ``since`` (a :func:`stolen` reading)."""
    now = stolen()
    return (now[0] - since[0]) / max(now[1] - since[1], 1)


def pinned(core: int, argv: Sequence[str]) -> list[str]:
    """argv run on one core (when the machine has more than one)."""
    return ["taskset", "-c", str(core), *argv] if (os.cpu_count() or 1) > 1 else list(argv)


@dataclass
class Server:
    """A server process started by a benchmark."""

    process: subprocess.Popen[str]
    address: str
    log: Path

    @classmethod
    def start(
        cls, argv: Sequence[str], *, env: dict[str, str] | None = None, ready: str = "listening on", cwd: Path = ROOT
    ) -> Server:
        log = Path(tempfile.mkstemp(prefix="pdp-bench-", suffix=".log")[1])
        with log.open("w") as errors:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(
                pinned(SERVER_CORE, argv),
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                env={**os.environ, **(env or {})},
                cwd=cwd,
            )
        assert process.stdout is not None
        line = process.stdout.readline()
        if ready not in line:
            process.kill()
            raise RuntimeError(f"{argv[:4]} did not start: {line!r} {log.read_text()[-2000:]}")
        address = line.split(ready, 1)[1].split()[0].rstrip(":")
        return cls(process, address, log)

    def cpu_seconds(self) -> float:
        """User plus system CPU of the process (all threads) so far."""
        return cpu_seconds(self.process.pid)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def threads(self) -> int:
        return sum(1 for _ in Path(f"/proc/{self.process.pid}/task").iterdir())

    def fds(self) -> int:
        return sum(1 for _ in Path(f"/proc/{self.process.pid}/fd").iterdir())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def pdp_serve(
    listen: str,
    snapshot: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    geoip: str = "demo",
    cwd: Path = ROOT,
) -> Server:
    argv = [sys.executable, "-m", "pdp", "serve", "--listen", listen, "--snapshot", str(snapshot),
            "--geoip-db", geoip, "--log-format", "text", *extra]  # fmt: skip
    return Server.start(argv, env=env, cwd=cwd)


def floor_serve(listen: str) -> Server:
    return Server.start([sys.executable, "-m", "benchmarks.floor_server", "--mode", "sync", "--listen", listen])


def run_load(*args: str) -> dict[str, Any]:
    """One load generator process pinned to the client core; its JSON result."""
    argv = pinned(CLIENT_CORE, [sys.executable, "-m", "benchmarks.load", *args])
    completed = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False, timeout=900)
    if completed.returncode != 0:
        raise RuntimeError(f"load generator failed: {completed.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


def machine_facts() -> dict[str, Any]:
    import grpc
    import maxminddb
    from google.protobuf.internal import api_implementation

    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "protobuf": api_implementation.Type(),
        "maxminddb": maxminddb.__version__,
        "database": "GeoLite2-City 2018-07-03 (maxminddb-geolite2), 3.6 M nodes",
        "pinning": f"server on core {SERVER_CORE}, load generator on core {CLIENT_CORE}",
    }


def write_results(folder: Path, kind: str, results: dict[str, Any], text: str) -> None:
    """``results`` as ``folder/<date>-<HHMM>-<kind>.json`` and ``text`` beside it as ``.md``,
    then ``text`` printed. Named to the minute (UTC): a second run the same day keeps the first."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{dt.datetime.now(dt.UTC):%Y-%m-%d-%H%M}-{kind}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)


def run_header(module: str, options: Any) -> dict[str, Any]:
    """What every result file opens with: when, the command that made it, the machine,
    and the options the figures depend on (``repeats``, ``seconds``, ``baseline``)."""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": f"python -m benchmarks.{module} " + " ".join(sys.argv[1:]),
        "facts": machine_facts(),
        "repeats": options.repeats,
        "seconds": options.seconds,
        "baseline": str(options.baseline) if options.baseline else None,
    }
