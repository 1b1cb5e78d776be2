"""Real servers the tests start and stop: redis-server and an HTTP object store."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO

import pytest


def require_binary(name: str, package: str) -> str:
    """Path of ``name``; a skip saying what to install, or a failure under CI=true."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found: apt-get install -y {package}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class RedisServer:
    process: subprocess.Popen[str]
    port: int
    folder: Path

    def url(self, key: str, **query: str) -> str:
        extra = "".join(f"&{name}={value}" for name, value in query.items())
        return f"redis://127.0.0.1:{self.port}/0?key={key}{extra}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=30)


def start_redis(folder: Path, port: int | None = None, *extra: str) -> RedisServer:
    """redis-server on a free port, returned once it accepts connections; ``extra``: more arguments."""
    binary = require_binary("redis-server", "redis-server")
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder), "--loglevel", "notice", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:  # blocks until redis says it is ready (or exits)
        if "Ready to accept connections" in line:
            break
    else:
        raise RuntimeError(f"redis-server on port {port} did not start")
    # Keep draining its output so that it never blocks on a full pipe; close it at EOF.
    threading.Thread(target=_drain, args=(process.stdout,), daemon=True).start()
    return RedisServer(process, port, folder)


def _drain(stream: IO[str]) -> None:
    with stream:
        stream.read()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()


@dataclass
class Store:
    """What the HTTP store serves, and what it saw."""

    files: dict[str, bytes] = field(default_factory=dict)
    content_encoding: dict[str, str] = field(default_factory=dict)  # path -> Content-Encoding header
    status_override: int = 0  # answer every request with this status when set
    requests: Counter[str] = field(default_factory=Counter)  # "200", "304", "500"...
    if_none_match: list[str] = field(default_factory=list)
    authorization: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def etag(data: bytes) -> str:
        return '"' + hashlib.sha256(data).hexdigest()[:16] + '"'


class _Handler(BaseHTTPRequestHandler):
    server: _StoreServer

    def do_GET(self) -> None:
        store = self.server.store
        with store.lock:
            store.if_none_match.append(self.headers.get("If-None-Match", ""))
            store.authorization.append(self.headers.get("Authorization", ""))
            if store.status_override:
                status, body, etag = store.status_override, b"store error", ""
            elif self.path not in store.files:
                status, body, etag = 404, b"no such object", ""
            else:
                body = store.files[self.path]
                etag = store.etag(body)
                status = 304 if self.headers.get("If-None-Match") == etag else 200
            store.requests[str(status)] += 1
        self.send_response(status)
        if etag:
            self.send_header("ETag", etag)
        if status == 304:
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(body)))
        if self.path in store.content_encoding:
            self.send_header("Content-Encoding", store.content_encoding[self.path])
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # the stdlib's name
        """Quiet: the tests read the counters instead."""


class _StoreServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: Store) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.store = store


@dataclass
class HttpStore:
    store: Store
    server: _StoreServer
    thread: threading.Thread

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def start_http_store(store: Store | None = None) -> HttpStore:
    server = _StoreServer(store or Store())
    thread = threading.Thread(target=server.serve_forever, name="test-http-store", daemon=True)
    thread.start()
    return HttpStore(server.store, server, thread)


@pytest.fixture
def http_store() -> Iterator[HttpStore]:
    running = start_http_store()
    yield running
    running.stop()
