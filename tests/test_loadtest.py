"""``pdp loadtest`` and its lean HTTP/2 client against a real pdp server: what it
counts as OK is what grpcio's client would, and errors keep their gRPC status."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdp._proto import admission_pb2 as pb
from pdp.loadtest.h2 import Connection, Pool, grpc_message
from pdp.loadtest.run import Recorder, build_requests, closed_loop, open_loop, read_participants

ADDRESSES = ["175.16.199.1", "81.2.69.142", "2001:220::1", "10.0.0.1"]


def test_open_loop_calls_are_all_answered(module_server: tuple[str, object]) -> None:
    address, _ = module_server
    recorder = Recorder()
    messages = [grpc_message(request) for request in build_requests(ADDRESSES, 0)]
    connection = Connection(address, "/pdp.v1.AdmissionService/Check", recorder.done)
    try:
        open_loop(connection, messages, rate=2000, seconds=0.5, drain=5)
    finally:
        connection.close()
    assert recorder.calls == 1000
    assert recorder.errors == {}
    assert recorder.histogram.get_total_count() == 1000


def test_large_batches_span_several_frames(module_server: tuple[str, object]) -> None:
    address, _ = module_server
    recorder = Recorder()
    people = [pb.Participant(ip=ADDRESSES[n % 4], user_id=f"user-{n:05}") for n in range(1000)]
    request = pb.CheckBatchRequest(meeting=pb.Meeting(meeting_id="m"), participants=people, action=pb.ACTION_JOIN)
    messages = [grpc_message(request)]  # about 30 kB: two DATA frames
    assert max(len(message) for message in messages) > 16_384
    connection = Connection(address, "/pdp.v1.AdmissionService/CheckBatch", recorder.done)
    try:
        closed_loop(connection, messages, in_flight=4, seconds=60, drain=5, max_calls=20)
    finally:
        connection.close()
    assert recorder.calls == 20
    assert recorder.errors == {}


@pytest.mark.parametrize(
    ("request_message", "status"),
    [
        (pb.CheckRequest(meeting=pb.Meeting(meeting_id="m"), action=pb.ACTION_JOIN), "INVALID_ARGUMENT"),
        (b"\x00\x00\x00\x00\x03\xff\xff\xff", "INVALID_ARGUMENT"),  # undecodable body
    ],
)
def test_errors_keep_their_grpc_status(
    module_server: tuple[str, object], request_message: pb.CheckRequest | bytes, status: str
) -> None:
    address, _ = module_server
    statuses: list[str] = []
    message = request_message if isinstance(request_message, bytes) else grpc_message(request_message)
    connection = Connection(address, "/pdp.v1.AdmissionService/Check", lambda _, name: statuses.append(name))
    try:
        connection.call(message, time.perf_counter())
        deadline = time.monotonic() + 10
        while not statuses and time.monotonic() < deadline:
            connection.poll(0.1)
    finally:
        connection.close()
    assert statuses == [status]


def pdp_loadtest(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pdp", "loadtest", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_pdp_loadtest_open_loop_json(module_server: tuple[str, object], tmp_path: Path) -> None:
    address, _ = module_server
    participants = tmp_path / "participants.txt"
    participants.write_text("# mainland China, then the UK\n175.16.199.1\n\n81.2.69.142  # London\n")
    result = pdp_loadtest(
        "--target", address, "--rate", "400", "--duration", "0.5", "--warmup", "0",
        "--participants", str(participants), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert (figures["mode"], figures["rpc"], figures["requested_rate"]) == ("open", "Check", 400)
    assert figures["calls"] == figures["ok"] == 200
    assert figures["errors"] == {}
    assert 0 < figures["latency_us"]["p50"] <= figures["latency_us"]["p99"] <= figures["latency_us"]["max"]


def test_pdp_loadtest_batches_repeats_and_text(module_server: tuple[str, object]) -> None:
    address, _ = module_server
    result = pdp_loadtest("--target", address, "--closed", "--in-flight", "2", "--duration", "0.3",
                          "--warmup", "0", "--batch", "50", "--repeat", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("CheckBatch of 50, closed loop, 2 in flight") == 2
    assert "errors     none" in result.stdout
    repeated = pdp_loadtest("--target", address, "--closed", "--duration", "0.2", "--warmup", "0",
                            "--repeat", "3", "--json")  # fmt: skip
    runs = json.loads(repeated.stdout)["runs"]
    assert len(runs) == 3
    assert all(run["decisions"] == run["ok"] > 0 for run in runs)


def test_pdp_loadtest_counts_failed_calls_by_status_and_exits_1(module_server: tuple[str, object]) -> None:
    address, _ = module_server
    result = pdp_loadtest("--target", address, "--rate", "100", "--duration", "0.2", "--warmup", "0",
                          "--batch", "5000", "--json")  # fmt: skip
    assert result.returncode == 1, result.stderr
    figures = json.loads(result.stdout)
    assert figures["errors"] == {"INVALID_ARGUMENT": 20}  # above the server's batch limit of 1,000
    assert figures["ok"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "localhost", "--rate", "10"], "is not HOST:PORT"),
        (["--target", "127.0.0.1:1", "--rate", "0"], "must be greater than 0"),
        (["--target", "127.0.0.1:1"], "one of the arguments --rate --closed is required"),
        (["--target", "unix:/nonexistent/pdp.sock", "--rate", "10"], "unix:/nonexistent/pdp.sock: "),
    ],
)
def test_pdp_loadtest_usage_errors_are_exit_2(args: list[str], message: str) -> None:
    result = pdp_loadtest(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_participants_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("1.2.3.4\nnot-an-address\n")
    with pytest.raises(ValueError, match=r"p.txt:2: 'not-an-address' is not an IPv4 or IPv6 address"):
        read_participants(path)
    path.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no addresses"):
        read_participants(path)
    result = pdp_loadtest("--target", "127.0.0.1:1", "--rate", "10", "--participants", str(path))
    assert (result.returncode, "--participants:" in result.stderr) == (2, True)


def test_a_pool_spreads_calls_over_its_connections(module_server: tuple[str, object]) -> None:
    # Several connections are what lets SO_REUSEPORT reach every worker of --processes N.
    address, _ = module_server
    recorder = Recorder()
    messages = [grpc_message(request) for request in build_requests(ADDRESSES, 0)]
    members = [Connection(address, "/pdp.v1.AdmissionService/Check", recorder.done) for _ in range(3)]
    pool = Pool(members)
    try:
        closed_loop(pool, messages, in_flight=6, seconds=60, drain=5, max_calls=300)
    finally:
        pool.close()
    assert recorder.calls == 300
    assert recorder.errors == {}
    assert all(member.next_stream > 2 * 50 for member in members)  # each carried a share of the calls


def test_loadtest_command_with_several_connections(module_server: tuple[str, object]) -> None:
    address, _ = module_server
    result = subprocess.run(
        [sys.executable, "-m", "pdp", "loadtest", "--target", address, "--closed", "--connections", "4",
         "--duration", "0.3", "--warmup", "0", "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["connections"] == 4
    assert figures["ok"] > 0
    assert figures["errors"] == {}
