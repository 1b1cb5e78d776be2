"""AuthZEN evaluation next to gRPC Check, on one sidecar, in one run.

    python -m benchmarks.authzen_load [--rate 1000] [--seconds 5] [--repeat 3]

Starts one ``pdp serve`` (gRPC on a Unix socket, ``--http-listen`` on loopback
TCP) pinned to core 0, then alternates, on core 1: ``pdp loadtest`` (Check over
its lean HTTP/2 client) and this module's HTTP/1.1 client sending
``POST /access/v1/evaluation`` for the same participants, meeting and tags,
both open loop at the same rate. Prints one JSON object with each run's
percentiles and the median p50 of each side with their ratio.

Why this client and not wrk or h2load: ``wrk`` is closed loop (a slow answer
delays the next request, so a stalling server looks fast), ``h2load --rps``
paces requests but times each from when it was actually sent, and both would
also need a script for the body; wrk2 is not packaged. Here requests fall due
at fixed intervals, go out at once on an idle keep-alive connection or wait
with their clock running, and each latency runs from when the request fell due
to the last byte of its answer, into an HdrHistogram, as ``pdp loadtest`` does
for gRPC: the two sides are timed the same way.
"""

from __future__ import annotations

import argparse
import json
import re
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from benchmarks.harness import CLIENT_CORE, ROOT, Server, pinned

PERCENTILES = (50, 90, 99)
MAX_LATENCY_US = 60_000_000
# pdp loadtest's default participants, meeting and tags (pdp/loadtest/run.py).
ADDRESSES = ("175.16.199.1", "81.2.69.142")
RULES = "version: 1\nrules:\n  - {id: cn-memorial, effect: deny, jurisdiction: [CN], meetings: {tags: [memorial]},"
RULES += " legal_basis: Order 17/2020}\n"
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


def requests_for(addresses: tuple[str, ...], host: str) -> list[bytes]:
    """One HTTP/1.1 request per address, encoded once."""
    encoded = []
    for ip in addresses:
        body = json.dumps({
            "subject": {"type": "participant", "id": "u", "properties": {"ip": ip}},
            "action": {"name": "join"},
            "resource": {"type": "meeting", "id": "m-loadtest",
                         "properties": {"tags": ["memorial"], "host_account_id": "account-1"}},
        }).encode()  # fmt: skip
        head = (f"POST /access/v1/evaluation HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n")  # fmt: skip
        encoded.append(head.encode() + body)
    return encoded


class _Connection:
    __slots__ = ("buffer", "intended", "sock")

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buffer = b""
        self.intended = 0.0  # when the request in flight fell due; 0 when idle


class OpenLoop:
    """Open-loop HTTP/1.1 load over ``connections`` keep-alive connections; one thread, ``select``."""

    def __init__(self, host: str, port: int, requests: list[bytes], connections: int = 8) -> None:
        self.requests = requests
        self.selector = selectors.DefaultSelector()
        self.idle: deque[_Connection] = deque()
        for _ in range(connections):
            connection = _Connection(host, port)
            self.selector.register(connection.sock, selectors.EVENT_READ, connection)
            self.idle.append(connection)
        self.waiting: deque[tuple[float, bytes]] = deque()
        self.histogram = HdrHistogram(1, MAX_LATENCY_US, 3)
        self.statuses: Counter[str] = Counter()
        self.record = False

    def close(self) -> None:
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()

    def _send(self, connection: _Connection, intended: float, request: bytes) -> None:
        connection.intended = intended
        connection.sock.sendall(request)  # a few hundred bytes: always fits the socket buffer

    def _read(self, connection: _Connection) -> None:
        data = connection.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed a keep-alive connection")
        connection.buffer += data
        head_end = connection.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        length = _LENGTH.search(connection.buffer, 0, head_end + 2)
        total = head_end + 4 + (int(length[1]) if length else 0)
        if len(connection.buffer) < total:
            return
        status = connection.buffer[9:12].decode()
        connection.buffer = connection.buffer[total:]
        if self.record:
            self.histogram.record_value(max(1, round((time.perf_counter() - connection.intended) * 1e6)))
            self.statuses[status] += 1
        if self.waiting:
            intended, request = self.waiting.popleft()
            self._send(connection, intended, request)
        else:
            connection.intended = 0.0
            self.idle.append(connection)

    def run(self, rate: float, seconds: float) -> float:
        """Send at ``rate`` for ``seconds``, then wait for the answers; returns the elapsed time."""
        interval, count = 1.0 / rate, round(rate * seconds)
        start = time.perf_counter()
        sent = 0
        while sent < count or self.waiting or len(self.idle) < len(self.selector.get_map()):
            now = time.perf_counter()
            while sent < count and start + sent * interval <= now:
                request = self.requests[sent % len(self.requests)]
                intended = start + sent * interval
                if self.idle:
                    self._send(self.idle.popleft(), intended, request)
                else:
                    self.waiting.append((intended, request))
                sent += 1
            timeout = max(0.0, start + sent * interval - time.perf_counter()) if sent < count else 1.0
            for key, _ in self.selector.select(timeout):
                self._read(key.data)
        return time.perf_counter() - start


def http_run(url: str, rate: float, seconds: float, warmup: float = 1.0) -> dict[str, Any]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    load = OpenLoop(host, int(port), requests_for(ADDRESSES, f"{host}:{port}"))
    try:
        load.run(rate, warmup)
        load.record = True
        elapsed = load.run(rate, seconds)
    finally:
        load.close()
    latency = {f"p{p:g}": load.histogram.get_value_at_percentile(p) for p in PERCENTILES}
    return {"rpc": "AuthZEN evaluation", "calls": load.histogram.get_total_count(), "statuses": dict(load.statuses),
            "achieved_rate": load.histogram.get_total_count() / elapsed, "latency_us": latency}  # fmt: skip


def grpc_run(target: str, rate: float, seconds: float) -> dict[str, Any]:
    argv = pinned(CLIENT_CORE, [sys.executable, "-m", "pdp", "loadtest", "--target", target, "--rate", str(rate),
                                "--duration", str(seconds), "--json"])  # fmt: skip
    completed = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT, timeout=seconds + 60)
    figures: dict[str, Any] = json.loads(completed.stdout)
    return figures


def _http_process(url: str, rate: float, seconds: float) -> dict[str, Any]:
    """:func:`http_run` in a process of its own on the client core, as pdp loadtest runs."""
    argv = [sys.executable, "-m", "benchmarks.authzen_load", "--http-only", url, "--rate", str(rate),
            "--seconds", str(seconds)]  # fmt: skip
    done = subprocess.run(pinned(CLIENT_CORE, argv), capture_output=True, text=True, check=True, cwd=ROOT, timeout=600)
    figures: dict[str, Any] = json.loads(done.stdout)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="calls per second, both sides (default 1000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per side, alternating (default 3)")
    parser.add_argument("--http-only", metavar="URL", help=argparse.SUPPRESS)  # the client, on core 1
    options = parser.parse_args(argv)
    if options.http_only:
        print(json.dumps(http_run(options.http_only, options.rate, options.seconds)))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        rules = Path(folder) / "rules.yaml"
        rules.write_text(RULES)
        server = Server.start([sys.executable, "-m", "pdp", "serve", "--listen", f"unix:{folder}/pdp.sock",
                               "--http-listen", "127.0.0.1:0", "--snapshot", str(rules), "--geoip-db", "demo",
                               "--log-format", "text"])  # fmt: skip
        try:
            assert server.process.stdout is not None
            lines = [server.process.stdout.readline() for _ in range(2)]
            url = next(line.split("AuthZEN listening on ", 1)[1].strip() for line in lines if "AuthZEN" in line)
            runs: dict[str, list[dict[str, Any]]] = {"grpc": [], "authzen": []}
            for _ in range(options.repeat):
                runs["grpc"].append(grpc_run(server.address, options.rate, options.seconds))
                runs["authzen"].append(_http_process(url, options.rate, options.seconds))
        finally:
            server.stop()
    p50 = {side: statistics.median(run["latency_us"]["p50"] for run in results) for side, results in runs.items()}
    summary = {"rate": options.rate, "seconds": options.seconds, "p50_us": p50,
               "authzen_over_grpc": round(p50["authzen"] / p50["grpc"], 2), "runs": runs}  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
