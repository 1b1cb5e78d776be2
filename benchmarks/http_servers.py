"""Which HTTP server carries AuthZEN: the candidates side by side, same handler, same load.

    python -m benchmarks.http_servers [--seconds 3]   # needs wrk; aiohttp and granian optional

Each candidate serves ``POST /access/v1/evaluation`` on loopback TCP from a thread
with its own event loop (as the sidecar runs it next to the sync gRPC server),
in a process pinned to core 0. The handler is the same for all of them: read the
body, ``json.loads``, one :meth:`pdp.decisions.DecisionPath.check` on the real
demo GeoLite2-City with a CN rule, ``json.dumps`` the answer. ``wrk`` on core 1
drives it with one connection (the latency of one evaluation: p50) and with 16
(the most evaluations per second). wrk is closed loop, which is right for both
figures here (an idle server's latency, and a saturated server's rate); the
overhead figure next to gRPC Check is open loop (``benchmarks.authzen_load``).

Candidates: uvicorn with a bare ASGI callable (httptools and h11 parsers),
aiohttp's web server, granian's embedded server (RSGI and ASGI). A candidate
whose package is missing is reported as such. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import CLIENT_CORE, SERVER_CORE, pinned
from pdp.decisions import DecisionPath, Endpoint, Outcome
from pdp.geo import GeoDatabase, demo_database_path
from pdp.rules import parse_policy
from pdp.state import PolicyHolder

CANDIDATES = ("uvicorn-httptools", "uvicorn-h11", "aiohttp", "granian-rsgi", "granian-asgi")
RULES = b"""
version: 1
rules:
  - {id: cn, effect: deny, jurisdiction: [CN], legal_basis: Order 17/2020}
"""
BODY = json.dumps(
    {
        "subject": {"type": "participant", "id": "u1", "properties": {"ip": "1.0.16.1"}},
        "action": {"name": "join"},
        "resource": {"type": "meeting", "id": "m1", "properties": {"tags": ["memorial"]}},
    }
)
ENDPOINT = Endpoint("http", "authzen", "evaluation")
HEADERS = [(b"content-type", b"application/json")]


def _path() -> DecisionPath:
    holder = PolicyHolder()
    holder.activate(parse_policy(RULES, "bench.yaml"), GeoDatabase(demo_database_path()), "bench.yaml")
    return DecisionPath(holder)


class _Meeting:
    __slots__ = ("host_account_id", "meeting_id", "tags")

    def __init__(self, resource: dict[str, Any]) -> None:
        properties = resource.get("properties", {})
        self.meeting_id, self.host_account_id = resource["id"], properties.get("host_account_id", "")
        self.tags = properties.get("tags", [])


def handler(path: DecisionPath) -> Callable[[bytes], bytes]:
    """The work every candidate does per request."""

    def handle(body: bytes) -> bytes:
        request = json.loads(body)
        subject = request["subject"]
        outcome = path.check(
            subject["properties"]["ip"], subject["id"], "", _Meeting(request["resource"]), 1,
            endpoint=ENDPOINT, present=Outcome,
        )  # fmt: skip
        decision = outcome.decision
        return json.dumps(
            {"decision": decision.verdict == 1, "context": {"rule_id": decision.rule_id, "reason": decision.reason}}
        ).encode()

    return handle


# --------------------------------------------------------------------------- candidates, each in a thread


def _asgi(handle: Callable[[bytes], bytes]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        data = handle(body)
        headers = [*HEADERS, (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    return app


def _uvicorn(handle: Callable[[bytes], bytes], port: int, http: str) -> None:
    import uvicorn

    config = uvicorn.Config(
        _asgi(handle), host="127.0.0.1", port=port, http=http, loop="asyncio", lifespan="off",
        log_level="warning", access_log=False, server_header=False, date_header=False,
    )  # fmt: skip
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()


def _aiohttp(handle: Callable[[bytes], bytes], port: int) -> None:
    from aiohttp import web

    async def evaluation(request: web.Request) -> web.Response:
        return web.Response(body=handle(await request.read()), content_type="application/json")

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/access/v1/evaluation", evaluation)
    runner = web.AppRunner(app, access_log=None)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()


def _granian(handle: Callable[[bytes], bytes], port: int, interface: str) -> None:
    from granian.constants import Interfaces
    from granian.server.embed import Server

    if interface == "rsgi":

        async def rsgi(scope: Any, protocol: Any) -> None:
            protocol.response_bytes(200, [("content-type", "application/json")], handle(await protocol()))

        target: Any = rsgi
    else:
        target = _asgi(handle)
    loop = asyncio.new_event_loop()
    kind = Interfaces.RSGI if interface == "rsgi" else Interfaces.ASGINL
    server = Server(target, address="127.0.0.1", port=port, interface=kind, log_enabled=False, websockets=False)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve())

    threading.Thread(target=run, daemon=True).start()


def serve(candidate: str, port: int) -> None:
    """Child process: serve ``candidate`` until stdin closes."""
    handle = handler(_path())
    if candidate.startswith("uvicorn"):
        _uvicorn(handle, port, candidate.removeprefix("uvicorn-"))
    elif candidate == "aiohttp":
        _aiohttp(handle, port)
    else:
        _granian(handle, port, candidate.removeprefix("granian-"))
    for _ in range(200):  # until it accepts: the parent starts wrk only then
        try:
            import socket

            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    print("ready", flush=True)
    sys.stdin.read()


# --------------------------------------------------------------------------- measuring


_LATENCY = re.compile(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_SCALE = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def wrk(port: int, connections: int, seconds: float, script: Path) -> tuple[float, float]:
    """(p50 µs, requests/s) from one wrk run."""
    url = f"http://127.0.0.1:{port}/access/v1/evaluation"
    duration = f"-d{max(1, round(seconds))}s"
    argv = pinned(CLIENT_CORE, ["wrk", "-t1", f"-c{connections}", duration, "--latency", "-s", str(script), url])
    output = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    latency, rate = _LATENCY.search(output), _RATE.search(output)
    if latency is None or rate is None:
        raise RuntimeError(f"wrk output not understood: {output}")
    return float(latency[1]) * _SCALE[latency[2]], float(rate[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(candidate: str, seconds: float, script: Path) -> dict[str, Any]:
    from benchmarks.harness import ROOT
    from tests.servers import free_port

    port = free_port()
    argv = pinned(SERVER_CORE, [sys.executable, "-m", "benchmarks.http_servers", "--serve", candidate, str(port)])
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout is not None
    assert process.stdin is not None
    line = process.stdout.readline()
    try:
        if line.strip() != "ready":
            return {"error": "missing or failed to start (pip install it to compare)"}
        wrk(port, 4, 1, script)  # warm-up
        p50, _ = wrk(port, 1, seconds, script)
        cpu_before = _cpu_seconds(process.pid)
        _, rate = wrk(port, 16, seconds, script)
        cpu = _cpu_seconds(process.pid) - cpu_before
        return {
            "p50_us_one_connection": p50,
            "requests_per_s_16_connections": round(rate),
            # Robust to a shared machine: what one request costs the server, whoever else runs.
            "server_cpu_us_per_request": round(cpu / (rate * round(seconds)) * 1e6, 1),
        }
    finally:
        process.stdin.close()
        process.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--only", nargs="*", default=list(CANDIDATES), choices=CANDIDATES)
    parser.add_argument("--serve", nargs=2, metavar=("CANDIDATE", "PORT"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.serve:
        serve(options.serve[0], int(options.serve[1]))
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = {json.dumps(BODY)}\n'
        )
    results = {candidate: measure(candidate, options.seconds, Path(script.name)) for candidate in options.only}
    Path(script.name).unlink()
    print(json.dumps({"seconds": options.seconds, "cores": os.cpu_count(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
