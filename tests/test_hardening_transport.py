"""The transport under attack (issue 12, items 4 and 12): calls that never send their
request, and a Unix socket in a directory others could write.

Half-open calls are made with a raw HTTP/2 client on plain sockets (HEADERS without
END_STREAM, then nothing), as a buggy or hostile meeting node would; every answer
checked comes from a real server through grpcio's client.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from pdp.client import Client
from pdp.config import ServeConfig
from pdp.geo import GeoDatabase
from pdp.loadtest.h2 import END_HEADERS, END_STREAM, FRAME_HEAD, HEADERS, PREFACE, RST_STREAM, SETTINGS
from pdp.loadtest.h2 import _frame as frame
from pdp.loadtest.h2 import _literal_block as literal_headers
from pdp.model import Verdict
from pdp.server import RunningServer, start_server
from pdp.state import PolicyHolder

from .conftest import CITY_DB, policy_from

PDP = [sys.executable, "-m", "pdp"]
CN = "175.16.199.1"
NOBODY = 65534
METHODS = [
    "/pdp.v1.AdmissionService/Check",
    "/pdp.v1.AdmissionService/CheckBatch",
    "/pdp.v1.AdmissionService/GetStatus",
    "/pdp.v1.AdmissionService/WatchPolicy",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
]
RULES = "version: 7\nrules:\n  - {id: cn, effect: deny, jurisdiction: [CN], legal_basis: Order 17}\n"


class HalfOpen:
    """One HTTP/2 connection whose calls send their headers and never a message."""

    def __init__(self, target: str) -> None:
        if target.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(target.removeprefix("unix:"))
        else:
            host, _, port = target.rpartition(":")
            self.sock = socket.create_connection((host, int(port)))
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        self.streams: list[int] = []
        self.ended: set[int] = set()
        self.inbox = bytearray()

    def open(self, path: str, count: int) -> None:
        headers = literal_headers(
            [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "pdp"),
             ("content-type", "application/grpc"), ("te", "trailers")]
        )  # fmt: skip
        out = bytearray()
        for _ in range(count):
            stream = 2 * len(self.streams) + 1
            self.streams.append(stream)
            out += frame(HEADERS, END_HEADERS, stream, headers)  # no END_STREAM, and no DATA ever
        self.sock.sendall(out)

    def wait_until_all_ended(self, timeout: float = 60) -> None:
        """Read until the server has ended every stream (RST_STREAM, or trailers).

        :raises TimeoutError: nothing arrived for ``timeout`` seconds (a safety net).
        """
        self.sock.settimeout(timeout)
        while not self.ended.issuperset(self.streams):
            if not self.read():
                self.ended.update(self.streams)  # the server closed the connection: all ended
                return

    def read(self) -> bool:
        """Read what the server sent, noting the streams it ended; False once it closed
        the connection."""
        data = self.sock.recv(65536)
        self.inbox += data
        while len(self.inbox) >= 9:
            high, low, kind, flags, stream = FRAME_HEAD.unpack_from(self.inbox)
            size = (high << 8) | low
            if len(self.inbox) < 9 + size:
                break
            del self.inbox[: 9 + size]
            if kind == RST_STREAM or (kind == HEADERS and flags & END_STREAM):
                self.ended.add(stream)
        return bool(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def half_open() -> Iterator[list[HalfOpen]]:
    connections: list[HalfOpen] = []
    yield connections
    for connection in connections:
        connection.close()


def serve(tmp_path: Path, **settings: object) -> tuple[RunningServer, PolicyHolder]:
    holder = PolicyHolder()
    config = ServeConfig(listen=f"unix:{tmp_path}/pdp.sock", health_listen="127.0.0.1:0", **settings)  # type: ignore[arg-type]
    running = start_server(config, holder)
    holder.activate(policy_from(RULES), GeoDatabase(CITY_DB), "test.yaml")
    return running, holder


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        return int(check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


# --------------------------------------------------------------------------- 4: half-open calls


@pytest.mark.parametrize("workers", [2, 8])
def test_half_open_calls_never_take_the_threads_check_and_health_need(
    tmp_path: Path, half_open: list[HalfOpen], workers: int
) -> None:
    running, _ = serve(tmp_path, workers=workers)
    try:
        for target in (running.address, running.address, running.health_address, running.health_address):
            connection = HalfOpen(target)
            half_open.append(connection)
            for path in METHODS:
                connection.open(path, 2 * workers)  # 4 x 7 x 2 x workers: far more than the 2 x workers threads
        # Each of these needs a server thread; with the calls above holding them all, it would wait.
        with Client(running.address, timeout=10) as client:
            for _ in range(3 * workers):
                assert client.check(CN, "m").verdict == Verdict.DENY
            assert len(client.check_batch("m", [CN] * 10)) == 10
            assert client.status().serving
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health(running.address, "pdp.v1.AdmissionService") == serving
        assert health(running.health_address) == serving
        assert health(running.health_address, "pdp.v1.AdmissionService") == serving
    finally:
        running.stop(grace=0)


def test_open_streams_never_take_the_threads_unary_calls_need(tmp_path: Path) -> None:
    """A WatchPolicy stream holds its thread while it is open: on the threads of unary
    calls, watchers and silent calls together could leave Check none. Streams run on
    threads of their own: the watcher holds one of those, and Check is answered."""
    running, _ = serve(tmp_path, workers=2)
    threads = running.threads[0]
    try:
        with Client(running.address, timeout=10) as client:
            watching = client.watch_policy(timeout=30)
            assert next(watching).policy_version == 7
            # This server's own pools (private to ThreadPoolExecutor, but the thing under test).
            assert len(threads.streams._threads) == 1
            for _ in range(6):
                assert client.check(CN, "m").verdict == Verdict.DENY
            assert client.status().serving
            assert len(threads.streams._threads) == 1  # unary calls never ran there
            watching.close()
    finally:
        running.stop(grace=0)


def test_a_call_whose_request_never_comes_is_ended_after_the_receive_timeout(
    tmp_path: Path, half_open: list[HalfOpen]
) -> None:
    """Few enough not to crowd each other out: each is ended by the timeout alone."""
    running, _ = serve(tmp_path, workers=8, receive_timeout=0.5)
    try:
        for target in (running.address, running.health_address):
            connection = HalfOpen(target)
            half_open.append(connection)
            connection.open("/pdp.v1.AdmissionService/Check" if target == running.address else METHODS[4], 3)
        for connection in half_open:
            connection.wait_until_all_ended()
        with Client(running.address, timeout=10) as client:
            assert client.check(CN, "m").verdict == Verdict.DENY
    finally:
        running.stop(grace=0)


def test_a_crowd_of_complete_calls_is_never_cancelled_for_waiting_its_turn(tmp_path: Path) -> None:
    """200 calls in flight on 2 deciding threads: each waits for a thread, and for its
    message to be handed over, but none is taken for a silent one."""
    running, _ = serve(tmp_path, workers=2)
    try:
        result = subprocess.run(
            [*PDP, "loadtest", "--target", running.address, "--closed", "--in-flight", "200", "--duration", "3",
             "--json"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        report = json.loads(result.stdout)
        assert report["errors"] == {}, report["errors"]
        assert result.returncode == 0
        assert report["ok"] > 1000
        assert running.guards[0].crowded_out == running.guards[0].timed_out == 0
    finally:
        running.stop(grace=0)


def test_complete_calls_are_never_cancelled_when_the_whole_process_is_paused(tmp_path: Path) -> None:
    """A pod at its CPU limit, or a loaded node, stops the sidecar for a while; the
    threads it paused then take their messages in any order. Before, the guard read
    that time off the wall clock and took complete calls for silent ones: with a real
    `pdp serve` paused for 0.3 s every 0.2 s under 200 calls in flight, 36 of 3,000
    were cancelled. Its patience and its ordering are counted in watchdog ticks now,
    and a late tick (the pause) does not count."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    target = f"unix:{tmp_path}/run/pdp.sock"
    serve_args = ["serve", "--listen", target, "--snapshot", str(rules), "--geoip-db", str(CITY_DB), "--workers", "2"]
    server = subprocess.Popen([*PDP, *serve_args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stop = threading.Event()

    def pause_now_and_then() -> None:
        # The pauses are the load under test, not a synchronisation: their pace is the point.
        while not stop.wait(0.2):
            os.kill(server.pid, signal.SIGSTOP)
            try:
                stop.wait(0.3)
            finally:
                os.kill(server.pid, signal.SIGCONT)

    pauser = threading.Thread(target=pause_now_and_then, daemon=True)
    try:
        assert server.stdout is not None
        assert "listening on" in server.stdout.readline()
        pauser.start()
        result = subprocess.run(
            [*PDP, "loadtest", "--target", target, "--closed", "--in-flight", "200", "--duration", "4", "--json"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        stop.set()
        pauser.join()
        report = json.loads(result.stdout)
        assert report["errors"] == {}, report["errors"]
        assert report["ok"] > 500
    finally:
        stop.set()
        if pauser.is_alive():
            pauser.join()
        server.terminate()
        server.wait(timeout=60)
        if server.stdout is not None:
            server.stdout.close()


def test_a_slow_request_within_the_timeout_is_answered(tmp_path: Path) -> None:
    """The guard ends calls that send nothing, not calls that are merely large: a
    CheckBatch of 1,000 participants (about 20 KB) is answered as before."""
    running, _ = serve(tmp_path, workers=2, receive_timeout=0.5)
    try:
        with Client(running.address, timeout=10) as client:
            assert len(client.check_batch("m", [CN] * 1000)) == 1000
    finally:
        running.stop(grace=0)


# --------------------------------------------------------------------------- 12: the socket's directory


def start_pdp(tmp_path: Path, socket_path: Path) -> subprocess.Popen[str]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    return subprocess.Popen(
        [*PDP, "serve", "--listen", f"unix:{socket_path}", "--snapshot", str(rules), "--geoip-db", str(CITY_DB)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("case", "mode", "owner", "why"),
    [
        ("world-writable", 0o777, None, "writable by group or others (mode 0777)"),
        ("world-writable and sticky, like /tmp", 0o1777, None, "writable by group or others (mode 1777)"),
        ("group-writable", 0o770, None, "writable by group or others (mode 0770)"),
        ("another user's", 0o755, NOBODY, f"owned by uid {NOBODY}"),
    ],
)
def test_serve_refuses_a_socket_directory_others_could_write(
    tmp_path: Path, case: str, mode: int, owner: int | None, why: str
) -> None:
    directory = tmp_path / "run"
    directory.mkdir()
    directory.chmod(mode)
    if owner is not None:
        os.chown(directory, owner, owner)
    process = start_pdp(tmp_path, directory / "pdp.sock")
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()  # blocks until it listens, or has exited
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert banner == "", banner  # it never listened
    assert process.returncode == 2, stderr
    assert f"{directory}: {why}" in stderr, stderr
    assert "another user could move the socket aside" in stderr
    assert f"use a directory of pdp's own, such as unix:{directory}/pdp/pdp.sock" in stderr, stderr
    assert not (directory / "pdp.sock").exists()


@pytest.mark.parametrize("mode", [0o750, 0o700, 0o755])
def test_serve_accepts_its_own_socket_directory(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / "run"
    directory.mkdir()
    directory.chmod(mode)
    process = start_pdp(tmp_path, directory / "pdp.sock")
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert "listening on unix:" in banner, banner + (process.stderr.read() if process.stderr else "")
        assert stat.S_IMODE(directory.stat().st_mode) == mode
        with Client(f"unix:{directory}/pdp.sock", timeout=10) as client:
            assert client.check(CN, "m").verdict == Verdict.DENY
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_a_missing_socket_directory_is_created_for_pdp_and_its_group(tmp_path: Path) -> None:
    """What the Helm chart relies on: the emptyDir is world-writable, pdp's subdirectory is 0750."""
    shared = tmp_path / "emptydir"
    shared.mkdir()
    shared.chmod(0o777)
    process = start_pdp(tmp_path, shared / "pdp" / "pdp.sock")
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert "listening on unix:" in banner, banner + (process.stderr.read() if process.stderr else "")
        assert stat.S_IMODE((shared / "pdp").stat().st_mode) == 0o750
        assert stat.S_IMODE((shared / "pdp" / "pdp.sock").stat().st_mode) == 0o660
    finally:
        process.terminate()
        process.communicate(timeout=30)
