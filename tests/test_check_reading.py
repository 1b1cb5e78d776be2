"""Check read from its bytes, the meeting from the memo (pdp.wire.check_parts and
MeetingMemo): every request gets the answer, or the error, that parsing it whole gives.

The reference is the decision path given the message protobuf parsed whole, as every
Check was answered before the memo. Requests are written field by field, so that the
forms a serializer never writes are sent too: a meeting or a participant sent twice
(a parser merges the copies), none, fields out of order, unknown fields, a meeting
that is not valid UTF-8, bounds broken by duplicate tags, known fields with the wrong
wire type, overlong varints (in tags and values), groups and fixed-width unknown fields.
Answers are compared whole, byte for byte. The memo lives on across examples, so a
meeting is asked again with other actions, participants and copies.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pdp._proto import admission_pb2 as pb
from pdp.config import ServeConfig
from pdp.decisions import DecisionPath, Outcome, RequestError
from pdp.geo import GeoDatabase
from pdp.server import start_server
from pdp.servicer import CHECK
from pdp.state import PolicyHolder
from pdp.wire import MEETING_BYTES, MEETINGS, MeetingMemo, check_parts, check_response, varint

from .conftest import CITY_DB, policy_from

RULES = """
version: 3
rules:
  - {id: cn-memorial, effect: deny, jurisdiction: [CN], meetings: {tags: [memorial]}, legal_basis: L1}
  - {id: gb-m1, effect: deny, jurisdiction: [GB], meetings: {meeting_ids: [m1]}, legal_basis: L2}
  - {id: cn-h1-host, effect: deny, jurisdiction: [CN], actions: [host], meetings: {host_accounts: [h1]},
     legal_basis: L3}
  - {id: us-both, effect: deny, jurisdiction: [US], meetings: {meeting_ids: [m2], tags: [town-hall]}, legal_basis: L4}
"""
CN, GB, US = "175.16.199.1", "81.2.69.143", "216.160.83.56"
Answer = tuple[str, str]  # ("OK", the response's bytes in hex) or (status code name, details)


def field(number: int, payload: bytes | int) -> bytes:
    """One field record: a varint, or length-delimited bytes."""
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload & (2**64 - 1))
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def message(*records: bytes) -> bytes:
    return b"".join(records)


def overlong(value: int) -> bytes:
    """``value``'s varint with one redundant continuation byte: a valid varint no serializer writes."""
    encoded = bytearray(varint(value))
    encoded[-1] |= 0x80
    return bytes(encoded) + b"\x00"


# Records a serializer never writes; each is valid protobuf, or a known field of the wrong
# wire type (which parsing whole refuses, or keeps as an unknown field).
odd_records = st.sampled_from(
    [
        overlong(3 << 3) + varint(1),  # action's tag overlong
        varint(3 << 3) + overlong(2),  # action's value overlong
        varint(3 << 3 | 2) + varint(1) + b"\x01",  # action length-delimited: a packed one-element list
        field(2, 5),  # meeting as a varint
        field(1, 7),  # participant as a varint
        b"\x4b\x08\x01\x4c",  # field 9 as a group holding a varint
        b"\x4d\x01\x02\x03\x04",  # field 9 as fixed32
        b"\x49" + b"\x00" * 8,  # field 9 as fixed64
        b"\x13\x14",  # field 2 as an empty group: the meeting's number, the wrong wire type
        b"\x4b",  # a group never ended
    ]
)


texts = st.sampled_from(["", "u", "m1", "m2", "h1", "x" * 300])
tags = st.sampled_from(["memorial", "town-hall", "other", "t" * 200])
meeting_records = st.one_of(
    st.builds(lambda value: field(1, value.encode()), st.sampled_from(["", "m1", "m2", "m3", "m" * 300])),
    st.builds(lambda value: field(2, value.encode()), st.sampled_from(["", "h1", "h2"])),
    st.builds(lambda value: field(3, value.encode()), tags),
    st.just(field(3, b"memorial") * 65),  # 65 tags given, one distinct: over the bound all the same
    st.just(field(1, b"\xff\xfe")),  # not UTF-8
    st.just(field(9, 1)),  # unknown to Meeting
    st.just(b"\x4b\x4c"),  # an empty group, unknown to Meeting
    st.just(overlong(1 << 3 | 2) + varint(2) + b"m1"),  # meeting_id's tag overlong
    st.just(field(3, 1)),  # a tag as a varint: the wrong wire type
)
meetings = st.lists(meeting_records, max_size=5).map(lambda records: field(2, message(*records)))
participants = st.builds(
    lambda ip, user, account: field(1, message(field(1, ip.encode()), field(2, user.encode()), field(3, account))),
    st.sampled_from([CN, GB, US, "::ffff:" + CN, "10.0.0.1", "not an address", ""]),
    texts,
    st.sampled_from([b"", b"a", b"\xc3\x28"]),  # the last is not UTF-8
)
actions = st.builds(lambda action: field(3, action), st.sampled_from([0, 1, 2, 3, -1]))
requests = st.lists(st.one_of(meetings, participants, actions, odd_records, st.just(field(7, b"?"))), max_size=6).map(
    lambda records: message(*records)
)


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[grpc.UnaryUnaryMultiCallable[bytes, bytes], DecisionPath]]:
    """A real server and the reference: the decision path on the same holder."""
    folder = tmp_path_factory.mktemp("check-reading")
    holder = PolicyHolder()
    holder.activate(policy_from(RULES), GeoDatabase(CITY_DB), "test.yaml")
    running = start_server(ServeConfig(listen=f"unix:{folder}/s.sock"), holder)
    channel = grpc.insecure_channel(running.address)
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/pdp.v1.AdmissionService/Check")
    yield call, DecisionPath(holder)
    channel.close()
    running.stop(grace=0)


def served_answer(call: grpc.UnaryUnaryMultiCallable[bytes, bytes], data: bytes) -> Answer:
    try:
        answer = call(data, timeout=10)
    except grpc.RpcError as error:
        call_error: grpc.Call = error  # type: ignore[assignment]  # grpc raises RpcErrors that are Calls
        return call_error.code().name, call_error.details() or ""
    return "OK", answer.hex()


def reference_answer(path: DecisionPath, data: bytes) -> Answer:
    try:
        request = pb.CheckRequest.FromString(data)
    except DecodeError as error:
        return "INVALID_ARGUMENT", f"request: not a valid CheckRequest ({error})"
    person = request.participant
    try:
        # Encoded afresh from the decision, not from the cache the server's answers come from.
        outcome = path.check(person.ip, person.user_id, person.account_id, request.meeting, request.action,
                             endpoint=CHECK, present=Outcome, remember=False)  # fmt: skip
    except RequestError as error:
        return "INVALID_ARGUMENT", str(error)
    return "OK", check_response(outcome.decision, outcome.location, outcome.active).SerializeToString().hex()


MERGED = message(
    field(1, message(field(1, CN.encode()))),
    field(2, message(field(1, b"m3"), field(3, b"other"))),
    field(3, 2),
    field(2, message(field(2, b"h1"))),  # the same meeting, more of it: host h1 is merged in
)


# A meeting holding 100 nested unknown groups: within protobuf's nesting limit parsed alone,
# past it inside a request (the memo once parsed meetings alone, and answered this).
DEEP = message(
    field(1, message(field(1, GB.encode()))),
    field(2, field(1, b"m1") + b"\x4b" * 100 + b"\x4c" * 100),
    field(3, 1),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests)
@example(MERGED)
@example(DEEP)
@example(message(field(2, message(field(1, b"m1"))), field(1, message(field(1, GB.encode()))), field(3, 1)))
@example(message(field(1, message(field(1, CN.encode()))), field(2, field(3, b"memorial")), overlong(3 << 3), b"\x01"))
@example(message(field(1, message(field(1, CN.encode()))), field(2, field(2, b"h1")), field(2, 5), field(3, 2)))
@example(message(field(1, message(field(1, GB.encode()))), field(2, overlong(1 << 3 | 2) + b"\x02m1"), b"\x13\x14"))
def test_every_request_gets_the_answer_of_its_whole_message(
    served: tuple[grpc.UnaryUnaryMultiCallable[bytes, bytes], DecisionPath], data: bytes
) -> None:
    call, path = served
    assert served_answer(call, data) == reference_answer(path, data)


def test_a_meeting_sent_twice_is_merged_not_replaced(
    served: tuple[grpc.UnaryUnaryMultiCallable[bytes, bytes], DecisionPath],
) -> None:
    """The case a reading that keeps only the last copy gets wrong: h1 hosting in CN is denied."""
    call, _ = served
    assert check_parts(MERGED) is None  # read whole
    answer = pb.CheckResponse.FromString(bytes.fromhex(served_answer(call, MERGED)[1]))
    assert (answer.rule_id, answer.location.country, answer.verdict) == ("cn-h1-host", "CN", pb.VERDICT_DENY)


def test_a_remembered_meeting_is_still_checked_against_each_action(
    served: tuple[grpc.UnaryUnaryMultiCallable[bytes, bytes], DecisionPath],
) -> None:
    call, _ = served
    meeting, person = field(2, message(field(1, b"m1"))), field(1, message(field(1, GB.encode())))
    assert served_answer(call, message(person, meeting, field(3, 1)))[0] == "OK"
    refused = served_answer(call, message(person, meeting, field(3, 7)))
    assert refused == ("INVALID_ARGUMENT", "action: 7 is not ACTION_JOIN (1) or ACTION_HOST (2)")


def test_the_memo_keeps_meetings_within_bounds_only_and_a_bounded_number_of_them() -> None:
    memo = MeetingMemo()
    over = message(*[field(3, b"memorial")] * 65)
    assert isinstance(memo.meeting(over), pb.Meeting)  # left to the path, which refuses it
    assert memo.meeting(b"\xff") is None  # not a Meeting
    large = message(field(1, b"m"), *[field(3, f"tag-{n:03}".encode()) for n in range(60)])
    assert len(large) > MEETING_BYTES
    assert memo.meeting(large) is not None
    assert len(memo) == 0
    for number in range(MEETINGS + 10):
        memo.meeting(message(field(1, f"m{number}".encode())))
        assert len(memo) <= MEETINGS
    assert len(memo) > 0
