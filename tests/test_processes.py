"""`pdp serve --processes N`: real supervisors and workers, real sockets, real signals."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from pdp._proto import admission_pb2 as pb
from pdp._proto import admission_pb2_grpc as pb_grpc
from pdp.client import Client
from pdp.config import ServeConfig
from pdp.geo import GeoDatabase
from pdp.server import start_server
from pdp.state import PolicyHolder
from pdp.workers import Board, Worker

from .conftest import CITY_DB, CN_MEMORIAL, ServerFactory, policy_from, replace_file
from .servers import free_port

PDP = [sys.executable, "-m", "pdp"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DEADLINE_S = 30.0


def rules(version: int) -> str:
    return CN_MEMORIAL.replace("version: 7", f"version: {version}")


class Served:
    """`pdp serve --processes N ...`, returned once it has printed its banner."""

    def __init__(self, tmp_path: Path, *args: str, processes: int = 2, listen: str = "127.0.0.1:0") -> None:
        self.rules = tmp_path / "rules.yaml"
        if not self.rules.exists():
            self.rules.write_text(rules(7))
        argv = [*PDP, "serve", "--listen", listen, "--snapshot", str(self.rules), "--processes", str(processes)]
        if "--geoip-db" not in args:
            argv += ["--geoip-db", str(CITY_DB)]
        self.process = subprocess.Popen([*argv, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.lines = [self.process.stdout.readline() for _ in range(3)]
        self.stderr = ""
        if " listening on " not in self.lines[0]:
            self.finish()
            pytest.fail(f"pdp serve did not start: {self.lines} {self.stderr}")
        self.target = self.lines[0].split(" listening on ", 1)[1].split(": ", 1)[0]
        pids = re.search(r"\(pids ([0-9, ]+)\)", self.lines[2])
        assert pids is not None, self.lines
        self.pids = [int(pid) for pid in pids.group(1).split(", ")]

    def finish(self, timeout: float = 60, signum: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        _, self.stderr = self.process.communicate(timeout=timeout)
        return self.process.returncode


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def factory(*args: str, **options: Any) -> Served:
        served = Served(tmp_path, *args, **options)
        started.append(served)
        return served

    yield factory
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.communicate(timeout=30)


def channel(target: str) -> grpc.Channel:
    """A channel of its own connection (never a subchannel shared with another channel)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def status(on: grpc.Channel) -> Any:
    return pb_grpc.AdmissionServiceStub(on).GetStatus(pb.GetStatusRequest(), timeout=10)


def health(on: grpc.Channel) -> int:
    check = on.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    return int(check(health_pb2.HealthCheckRequest(), timeout=10).status)


def watch(on: grpc.Channel) -> Any:
    stream = on.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    return stream(health_pb2.HealthCheckRequest(), timeout=60)


def by_worker(target: str, count: int = 2) -> dict[int, grpc.Channel]:
    """One connection per worker: new connections until the kernel has given one to each."""
    found: dict[int, grpc.Channel] = {}
    deadline = time.monotonic() + DEADLINE_S
    while len(found) < count:
        assert time.monotonic() < deadline, f"only workers {sorted(found)} answered"
        candidate = channel(target)
        index = status(candidate).worker_index
        if index in found:
            candidate.close()
        else:
            found[index] = candidate
    return found


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    """Until ``condition`` holds; a call refused meanwhile counts as not yet (a connection the
    kernel had queued on a worker that was just killed is reset, and the caller dials again)."""
    deadline = time.monotonic() + timeout
    while not _holds(condition):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # a polling interval, not a synchronisation: the condition decides


def _holds(condition: Callable[[], bool]) -> bool:
    try:
        return condition()
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return False


def test_two_workers_share_one_tcp_port_and_say_who_answered(serve: Callable[..., Served]) -> None:
    served = serve()
    assert "2 worker processes on one SO_REUSEPORT port" in served.lines[2]
    assert served.lines[1].startswith("try: ")
    workers = by_worker(served.target)
    for index, on in workers.items():
        answer = status(on)
        assert (answer.worker_index, answer.worker_count, answer.worker_pid) == (index, 2, served.pids[index])
        assert answer.policy_version == 7
        assert health(on) == SERVING
        request = pb.CheckRequest(
            participant=pb.Participant(ip="175.16.199.1"),
            meeting=pb.Meeting(meeting_id="m", tags=["memorial"]),
            action=pb.ACTION_JOIN,
        )
        assert pb_grpc.AdmissionServiceStub(on).Check(request, timeout=10).verdict == pb.VERDICT_DENY
    assert served.finish() == 0, served.stderr
    for pid in served.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_connections_spread_over_the_workers(serve: Callable[..., Served]) -> None:
    # SO_REUSEPORT hashes each new connection to a worker: 64 of them all on one has odds 2**-63.
    served = serve()
    answered = set()
    for _ in range(64):
        with channel(served.target) as on:
            answered.add(status(on).worker_index)
    assert answered == {0, 1}
    assert served.finish(signum=signal.SIGINT) == 0, served.stderr  # Ctrl-C drains as SIGTERM does
    assert "SIGINT: stopping 2 workers" in served.stderr


def test_clients_open_at_once_each_have_a_connection_of_their_own(serve: Callable[..., Served]) -> None:
    # gRPC Python shares one connection among channels to one target unless told not to: 64
    # pdp.client.Client objects open together reached one worker before, so a pool spread nothing.
    served = serve()
    clients = [Client(served.target, timeout=30) for _ in range(64)]
    try:
        assert {client.status().worker_index for client in clients} == {0, 1}
    finally:
        for client in clients:
            client.close()
    assert served.finish() == 0, served.stderr


def test_a_unix_socket_per_worker_and_the_configured_path_for_worker_0(
    serve: Callable[..., Served], tmp_path: Path
) -> None:
    path = tmp_path / "run" / "pdp.sock"
    served = serve(listen=f"unix:{path}")
    assert served.target == f"unix:{path}"
    assert f"2 worker processes on {path}.K" in served.lines[2]
    for name, index in ((path, 0), (Path(f"{path}.0"), 0), (Path(f"{path}.1"), 1)):
        with channel(f"unix:{name}") as on:
            assert (status(on).worker_index, health(on)) == (index, SERVING), name
    shown = subprocess.run([*PDP, "status", "--target", f"unix:{path}.1", "--json"], capture_output=True, text=True)
    document = json.loads(shown.stdout)
    assert (document["worker_index"], document["worker_count"], document["worker_pid"]) == (1, 2, str(served.pids[1]))
    assert served.finish() == 0, served.stderr
    assert not path.exists()
    assert not Path(f"{path}.1").exists()


def test_health_is_serving_only_while_every_worker_is(serve: Callable[..., Served]) -> None:
    # Worker 1 told to stop on its own drains while a WatchPolicy stream is open on it: all
    # that time worker 0 says NOT_SERVING; once it has gone the supervisor starts it again.
    served = serve("--grace-seconds", "60")
    workers = by_worker(served.target)
    assert health(workers[0]) == SERVING
    stream = pb_grpc.AdmissionServiceStub(workers[1]).WatchPolicy(pb.WatchPolicyRequest(), timeout=120)
    assert next(stream).policy_version == 7
    os.kill(served.pids[1], signal.SIGTERM)
    wait_for(lambda: health(workers[0]) == NOT_SERVING, "worker 0 to see worker 1 draining")
    assert health(workers[0]) == NOT_SERVING  # still draining: the stream holds it
    stream.cancel()
    wait_for(lambda: health(workers[0]) == SERVING, "worker 1 started again")
    restarted = by_worker(served.target)
    assert status(restarted[1]).worker_pid not in served.pids
    assert served.finish() == 0, served.stderr
    assert "worker 1 (pid" in served.stderr
    assert "starting it again" in served.stderr


def test_a_killed_worker_is_started_again(serve: Callable[..., Served]) -> None:
    served = serve()
    os.kill(served.pids[0], signal.SIGKILL)

    def replaced() -> bool:
        with channel(served.target) as on:
            answer = status(on)
        return answer.worker_index == 0 and answer.worker_pid not in served.pids

    wait_for(replaced, "a new worker 0")
    assert served.finish() == 0, served.stderr
    assert "exited with signal SIGKILL; starting it again" in served.stderr


def test_zero_failed_calls_through_20_activations_and_2_database_swaps(
    serve: Callable[..., Served], tmp_path: Path
) -> None:
    database = tmp_path / "city.mmdb"
    shutil.copyfile(CITY_DB, database)
    served = serve("--geoip-db", str(database), "--poll-seconds", "0.05", "--geoip-poll-seconds", "0.05")
    workers = by_worker(served.target)
    counts = {"ok": 0, "failed": 0}
    failures: list[str] = []
    stop = threading.Event()

    def call() -> None:
        channels = [channel(served.target) for _ in range(8)]  # several connections: both workers answer
        request = pb.CheckRequest(
            participant=pb.Participant(ip="175.16.199.1"),
            meeting=pb.Meeting(meeting_id="m", tags=["memorial"]),
            action=pb.ACTION_JOIN,
        )
        number = 0
        while not stop.is_set():
            number += 1
            try:
                answer = pb_grpc.AdmissionServiceStub(channels[number % 8]).Check(request, timeout=10)
                ok = answer.verdict == pb.VERDICT_DENY and answer.rule_id == "cn-memorial"
            except grpc.RpcError as error:
                ok = False
                failures.append(f"{error.code()}: {error.details()}")
            counts["ok" if ok else "failed"] += 1
        for each in channels:
            each.close()

    caller = threading.Thread(target=call)
    caller.start()
    try:
        for version in range(8, 28):
            replace_file(served.rules, rules(version).encode())

            def current(v: int = version) -> bool:
                return all(status(on).policy_version == v for on in workers.values())

            wait_for(current, f"v{version}")
            if version in (14, 21):
                reloads = {index: status(on).geoip_reloads for index, on in workers.items()}
                staged = tmp_path / "city.staged"
                shutil.copyfile(CITY_DB, staged)
                staged.replace(database)
                wait_for(
                    lambda: all(status(on).geoip_reloads > reloads[i] for i, on in workers.items()),  # noqa: B023
                    "the database swap",
                )
    finally:
        stop.set()
        caller.join()
    assert failures == []
    assert counts["failed"] == 0
    assert counts["ok"] > 100
    assert all(status(on).activations == 21 for on in workers.values())  # the first one and 20 more
    assert served.finish() == 0, served.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--geoip-db", "/nonexistent/city.mmdb"], "/nonexistent/city.mmdb"),
        (["--audit-log", "stdout"], "--audit-log stdout needs --processes 1"),
        (["OTEL_METRICS_EXPORTER=prometheus"], "OTEL_METRICS_EXPORTER=prometheus needs --processes 1"),
    ],
)
def test_a_worker_that_cannot_start_stops_the_whole_and_says_why(tmp_path: Path, args: list[str], message: str) -> None:
    env = {**os.environ, **dict(arg.split("=", 1) for arg in args if arg.startswith("OTEL_"))}
    args = [arg for arg in args if not arg.startswith("OTEL_")]
    (tmp_path / "rules.yaml").write_text(rules(7))
    argv = [*PDP, "serve", "--listen", "127.0.0.1:0", "--snapshot", str(tmp_path / "rules.yaml"), "--processes", "2"]
    if "--geoip-db" not in args:
        argv += ["--geoip-db", str(CITY_DB)]
    result = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert message in result.stderr.splitlines()[-1]


def test_a_port_in_use_is_refused_with_several_processes(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "rules.yaml").write_text(rules(7))
        result = subprocess.run(
            [*PDP, "serve", "--listen", f"127.0.0.1:{port}", "--snapshot", str(tmp_path / "rules.yaml"),
             "--geoip-db", str(CITY_DB), "--processes", "2"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 2
    assert f"pdp: cannot listen on 127.0.0.1:{port}: address already in use" in result.stderr


def test_shared_health_follows_the_board(tmp_path: Path) -> None:
    # In process, one worker of two: its own policy loaded, the other's byte decides.
    board = Board(2)
    holder = PolicyHolder()
    running = start_server(ServeConfig(listen=f"unix:{tmp_path}/w.sock"), holder, worker=Worker(0, 2, board))
    try:
        with channel(running.address) as on:
            stream = watch(on)
            assert next(stream).status == NOT_SERVING
            holder.activate(policy_from(CN_MEMORIAL), GeoDatabase(CITY_DB, 1000), "test.yaml")
            assert health(on) == NOT_SERVING  # worker 1 is not serving yet
            board.mark(1, True)
            assert health(on) == SERVING
            assert next(stream).status == SERVING  # Watch learns of the other worker too
            board.mark(1, False)
            assert health(on) == NOT_SERVING
            stream.cancel()
    finally:
        running.stop(grace=0)
    assert board.all_serving() is False


def test_one_process_says_it_is_worker_0_of_1(start: ServerFactory) -> None:
    running, _, _ = start()
    with channel(running.address) as on:
        answer = status(on)
    assert (answer.worker_index, answer.worker_count, answer.worker_pid) == (0, 1, os.getpid())


def test_a_tcp_health_port_is_shared_by_every_worker(serve: Callable[..., Served], tmp_path: Path) -> None:
    # Each worker binds it (the start fails otherwise): a probe reaches one while another restarts.
    port = free_port()
    served = serve("--health-listen", f"127.0.0.1:{port}", listen=f"unix:{tmp_path}/run/pdp.sock")
    for _ in range(8):
        with channel(f"127.0.0.1:{port}") as on:
            assert health(on) == SERVING
    os.kill(served.pids[0], signal.SIGKILL)

    def replaced() -> bool:
        with channel(f"unix:{tmp_path}/run/pdp.sock.0") as on:
            return bool(status(on).worker_pid not in served.pids)

    wait_for(replaced, "a new worker 0")
    with channel(f"127.0.0.1:{port}") as on:
        wait_for(lambda: health(on) == SERVING, "the health port to say SERVING again")
    assert served.finish() == 0, served.stderr


def test_a_crash_loop_stops_everything_with_status_1(serve: Callable[..., Served], tmp_path: Path) -> None:
    # Five deaths within a minute are restarted; the sixth hands over to the pod's restart policy.
    served = serve(listen=f"unix:{tmp_path}/run/pdp.sock")
    pid = served.pids[1]
    for death in range(1, 7):
        os.kill(pid, signal.SIGKILL)
        if death == 6:
            break
        previous = pid

        def replaced(previous: int = previous) -> bool:
            with channel(f"unix:{tmp_path}/run/pdp.sock.1") as on:
                return bool(status(on).worker_pid != previous)

        wait_for(replaced, f"worker 1 started again after death {death}")
        with channel(f"unix:{tmp_path}/run/pdp.sock.1") as on:
            pid = status(on).worker_pid
    assert served.process.wait(timeout=DEADLINE_S) == 1
    _, stderr = served.process.communicate(timeout=DEADLINE_S)
    assert "over 5 deaths in 60 s; stopping every worker" in stderr
