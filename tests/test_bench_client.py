"""The benchmarks' lean HTTP/2 client against a real pdp server: what it counts
as OK is what grpcio's client would, and errors keep their gRPC status."""

from __future__ import annotations

import time

import pytest

from benchmarks.h2client import Connection, grpc_message
from benchmarks.load import Recorder, build_requests, closed_loop, open_loop
from pdp._proto import admission_pb2 as pb

ADDRESSES = ["175.16.199.1", "81.2.69.142", "2001:220::1", "10.0.0.1"]


def test_open_loop_calls_are_all_answered(module_server: tuple[str, object]) -> None:
    address, _ = module_server
    recorder = Recorder()
    messages = [grpc_message(request) for request in build_requests(ADDRESSES, "check", 1)]
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
