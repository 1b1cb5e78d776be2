"""Open-loop HTTP/1.1 load with wrk2-style latency: each request timed from its *intended* send time.

    python -m benchmarks.http_load --port 8080 --rate 5000 --seconds 3 --addresses FILE

Why not the load tools on the machine: Debian's ``wrk`` is closed loop (a slow
answer delays the next request, so a stalled server looks fast: coordinated
omission), and ``h2load --rps`` paces each client but times each request from
when it was actually sent, and speaks HTTP/2 to Envoy where meeting clients mostly
speak HTTP/1.1. wrk2 is not packaged. This client is small and does one thing:
requests fall due at fixed intervals; one goes out at once on an idle keep-alive
connection, or waits in a queue with its clock already running; its latency is
the time from when it fell due to the last byte of its answer, into an HdrHistogram.

One thread, non-blocking sockets and ``select``; prints one JSON object.
The participant's address is sent in ``x-forwarded-for``, one per request,
cycling through ``--addresses``. Raises OSError when the port does not answer.
"""

from __future__ import annotations

import argparse
import json
import re
import selectors
import socket
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

PERCENTILES = (50, 90, 99, 99.9)
MAX_LATENCY_US = 60_000_000
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


def requests_for(addresses: list[str], path: str) -> list[bytes]:
    return [
        f"GET {path} HTTP/1.1\r\nhost: bench\r\nx-forwarded-for: {address}\r\n\r\n".encode() for address in addresses
    ]


class _Connection:
    __slots__ = ("buffer", "intended", "sock")

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buffer = b""
        self.intended = 0.0  # when the request in flight fell due; 0 when idle


class Load:
    """``connections`` keep-alive connections to 127.0.0.1:``port``."""

    def __init__(self, port: int, requests: list[bytes], connections: int) -> None:
        self.requests = requests
        self.selector = selectors.DefaultSelector()
        self.idle: deque[_Connection] = deque()
        for _ in range(connections):
            connection = _Connection(port)
            self.selector.register(connection.sock, selectors.EVENT_READ, connection)
            self.idle.append(connection)
        self.waiting: deque[tuple[float, bytes]] = deque()
        self.histogram = HdrHistogram(1, MAX_LATENCY_US, 3)
        self.statuses: Counter[str] = Counter()
        self.in_flight = 0
        self.record = True

    def close(self) -> None:
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()

    def _send(self, connection: _Connection, intended: float, request: bytes) -> None:
        connection.intended = intended
        connection.sock.sendall(request)  # a few dozen bytes: always fits the socket buffer
        self.in_flight += 1

    def submit(self, intended: float, request: bytes) -> None:
        if self.idle:
            self._send(self.idle.popleft(), intended, request)
        else:
            self.waiting.append((intended, request))

    def poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(max(timeout, 0.0)):
            self._read(key.data)

    def _read(self, connection: _Connection) -> None:
        data = connection.sock.recv(65536)
        if not data:
            raise OSError("the server closed a connection")
        connection.buffer += data
        while True:
            end = connection.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            match = _LENGTH.search(connection.buffer, 0, end + 2)
            total = end + 4 + (int(match[1]) if match else 0)
            if len(connection.buffer) < total:
                return
            status = connection.buffer[9:12].decode()
            connection.buffer = connection.buffer[total:]
            self._done(connection, status)

    def _done(self, connection: _Connection, status: str) -> None:
        now = time.perf_counter()
        self.in_flight -= 1
        if self.record:
            self.statuses[status] += 1
            latency = int((now - connection.intended) * 1e6)
            self.histogram.record_value(max(1, min(latency, MAX_LATENCY_US)))
        if self.waiting:
            intended, request = self.waiting.popleft()
            self._send(connection, intended, request)
        else:
            connection.intended = 0.0
            self.idle.append(connection)

    def run(self, rate: float, seconds: float) -> float:
        """Send ``rate`` requests a second for ``seconds``, then wait for the answers; the elapsed time."""
        interval, total = 1.0 / rate, int(rate * seconds)
        start = time.perf_counter() + 0.005
        sent = 0
        requests, count = self.requests, len(self.requests)
        while sent < total:
            now = time.perf_counter()
            while sent < total and (intended := start + sent * interval) <= now:
                self.submit(intended, requests[sent % count])
                sent += 1
            self.poll(start + sent * interval - time.perf_counter() if sent < total else 0.0)
        deadline = time.perf_counter() + 10
        while (self.in_flight or self.waiting) and time.perf_counter() < deadline:
            self.poll(0.1)
        return time.perf_counter() - start


def measure(port: int, addresses: list[str], path: str, rate: float, seconds: float, connections: int = 32,
            warmup: float = 0.5) -> dict[str, Any]:  # fmt: skip
    """One open-loop run (after ``warmup`` seconds at the same rate, not recorded)."""
    load = Load(port, requests_for(addresses, path), connections)
    try:
        if warmup > 0:
            load.record = False
            load.run(rate, warmup)
            load.record = True
        cpu_before = time.process_time()
        elapsed = load.run(rate, seconds)
        cpu = time.process_time() - cpu_before
    finally:
        load.close()
    histogram = load.histogram
    answered = histogram.get_total_count()
    return {
        "rate": rate,
        "seconds": round(elapsed, 3),
        "requests": answered,
        "unanswered": int(rate * seconds) - answered,
        "achieved_rate": round(answered / elapsed, 1) if elapsed else 0.0,
        "statuses": dict(load.statuses),
        "latency_us": {f"p{p:g}": histogram.get_value_at_percentile(p) for p in PERCENTILES}
        | {"max": histogram.get_max_value()},
        "client_cpu_share": round(cpu / elapsed, 3) if elapsed else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--path", default="/memorial/join")
    parser.add_argument("--addresses", type=Path, required=True, help="one IP address per line")
    options = parser.parse_args()
    addresses = options.addresses.read_text().split()
    result = measure(options.port, addresses, options.path, options.rate, options.seconds, options.connections,
                     options.warmup)  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
