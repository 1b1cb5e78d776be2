"""A batch answers every participant exactly as deciding them one by one would.

The batch path remembers decisions per kind of meeting and place (pdp/batch.py) and
takes cache hits through the LRU's own dict; these tests hold it to the one-by-one
answers: in process against ``Policy.decide`` at chosen moments (windows opening and
closing between calls, meetings of one kind sharing tables), and over a real gRPC
server against ``Check`` per participant, on MaxMind's City test database.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import maxminddb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdp import batch as batch_module
from pdp._proto import admission_pb2 as pb
from pdp.batch import Selectors, decide_place, decide_places
from pdp.client import Client, Participant
from pdp.config import ServeConfig
from pdp.decisions import DecisionPath, Outcome
from pdp.geo import GeoDatabase, InvalidAddressError
from pdp.model import Action, Location, Meeting
from pdp.server import start_server
from pdp.servicer import CHECK_BATCH
from pdp.state import PolicyHolder
from pdp.wire import batch_addresses, encode_check, encode_result, varint

from .conftest import CITY_DB, policy_from
from .test_rules_properties import (
    ACCOUNTS,
    LOCATIONS,
    MEETINGS,
    T0,
    TAGS,
    actions,
    compile_document,
    meetings,
    moments,
    snapshots,
)

CN_ONLY = "version: 1\nrules: [{id: cn, effect: deny, jurisdiction: [CN], legal_basis: b}]"
UNKNOWN = ["10.0.0.1", "127.0.0.1", "::1", "2.3.3.1", "192.0.2.77"]  # private, loopback, no country, unlisted
FORMS = ["::ffff:175.16.199.1", "64:ff9b::d8a0:5339", "2001:250::1"]  # mapped CN, NAT64 of a US-WA address, CN IPv6


def _database_addresses() -> list[str]:
    """One address in each network of the City test database that has a country."""
    reader = maxminddb.open_database(str(CITY_DB), maxminddb.MODE_MMAP_EXT)
    try:
        found = []
        for network, record in reader:
            if isinstance(record, dict) and "country" in record:
                found.append(str(network.network_address + (1 if network.num_addresses > 1 else 0)))
        return found
    finally:
        reader.close()


ADDRESSES = _database_addresses()[:200] + UNKNOWN + FORMS


# --------------------------------------------------------------------------- in process, chosen moments


calls = st.lists(
    st.tuples(meetings, actions, moments, st.lists(st.sampled_from(range(len(LOCATIONS))), min_size=1, max_size=30)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(snapshots(), calls)
def test_places_decided_from_the_memo_equal_deciding_each(
    city_db: GeoDatabase, document: dict[str, Any], sequence: list[tuple[Meeting, Action, float, list[int]]]
) -> None:
    """Calls in sequence share one state's memo: meetings of one kind, moments in
    one window and moments across rule boundaries, in any order."""
    policy = compile_document(document)
    active = PolicyHolder().activate(policy, city_db, "generated.json")
    for meeting, action, now, picks in sequence:
        places = [LOCATIONS[pick] for pick in picks]
        for present in (encode_result, Outcome):
            entries = decide_places(active, places, meeting, int(action), now, present)
            for place, (decision, answer, location) in zip(places, entries, strict=True):
                expected = policy.decide(place, action, meeting, now)
                assert (decision, location) == (expected, place)
                assert answer == present(expected, place, active)
        for place in places:  # a Check: the same tables, one place at a time (and gRPC Check's presenter)
            for present in (encode_check, Outcome):
                expected = policy.decide(place, action, meeting, now)
                assert decide_place(active, place, meeting, int(action), now, present) == (
                    expected, present(expected, place, active), place,
                )  # fmt: skip


def test_a_presenter_made_for_one_call_is_never_remembered(city_db: GeoDatabase) -> None:
    """Envoy's answer for a client that sent pdp's own headers is made for that call
    (it removes them): remembered, it would fill a table per call."""
    active = PolicyHolder().activate(policy_from(CN_ONLY), city_db, "test.yaml")
    cn, meeting = Location("CN"), Meeting("m-1")
    for _ in range(3):
        fresh = functools.partial(encode_check)  # a new presenter each call, as Envoy's
        assert decide_place(active, cn, meeting, 1, T0, fresh, remember=False)[0].rule_id == "cn"
    assert active.batch_memo._tables == {}
    decide_place(active, cn, meeting, 1, T0, encode_check)
    assert len(active.batch_memo._tables) == 1


def test_past_the_table_bound_every_table_is_forgotten(city_db: GeoDatabase, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_module, "MAX_TABLES", 2)
    active = PolicyHolder().activate(policy_from(CN_ONLY), city_db, "test.yaml")
    for _ in range(3):  # three presenters: three tables, then the bound
        assert decide_place(active, Location("CN"), Meeting("m-1"), 1, T0, functools.partial(encode_check))[0].rule_id
    assert len(active.batch_memo._tables) == 3
    decide_place(active, Location("CN"), Meeting("m-1"), 1, T0, encode_check)
    assert len(active.batch_memo._tables) == 1


def test_a_window_opening_changes_the_answer_at_once(city_db: GeoDatabase) -> None:
    opens = dt.datetime.fromtimestamp(T0, dt.UTC).isoformat()
    policy = policy_from(f"""
        version: 1
        rules:
          - id: cn-from-t0
            effect: deny
            jurisdiction: [CN]
            valid_from: {opens}
            legal_basis: basis
    """)
    active = PolicyHolder().activate(policy, city_db, "test.yaml")
    cn, meeting = [Location("CN")], Meeting("m-1")
    verdicts = [decide_places(active, cn, meeting, 1, now, Outcome)[0][0].rule_id for now in (T0 - 1, T0, T0 - 0.5)]
    assert verdicts == ["", "cn-from-t0", ""]
    assert Selectors.of(policy).window(T0 - 1) == (-float("inf"), T0)
    assert Selectors.of(policy).window(T0) == (T0, float("inf"))


def test_meetings_no_rule_tells_apart_share_a_table(city_db: GeoDatabase) -> None:
    policy = policy_from("""
        version: 1
        rules:
          - {id: cn-memorial, effect: deny, jurisdiction: [CN], meetings: {tags: [memorial]}, legal_basis: b}
          - {id: cn-acme, effect: deny, jurisdiction: [CN], meetings: {host_accounts: [acme]}, legal_basis: b}
    """)
    memo = PolicyHolder().activate(policy, city_db, "test.yaml").batch_memo
    table = memo.table(policy, Meeting("m-1", "globex", frozenset({"vigil"})), 1, T0, Outcome)
    assert memo.table(policy, Meeting("m-2", "initech", frozenset()), 1, T0, Outcome) is table
    assert memo.table(policy, Meeting("m-2", "acme", frozenset()), 1, T0, Outcome) is not table
    assert memo.table(policy, Meeting("m-2", "globex", frozenset({"memorial"})), 1, T0, Outcome) is not table
    assert memo.table(policy, Meeting("m-1", "globex", frozenset({"vigil"})), 2, T0, Outcome) is not table


def test_past_the_limit_the_memo_starts_again_and_answers_the_same(
    city_db: GeoDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_module, "MEMO_LIMIT", 3)
    policy = policy_from("""
        version: 1
        rules:
          - {id: us-wa, effect: deny, jurisdiction: [US-WA], legal_basis: b}
    """)
    active = PolicyHolder().activate(policy, city_db, "test.yaml")
    meeting = Meeting("m-1")
    for _ in range(3):
        assert len(active.batch_memo.table(policy, meeting, 1, T0, encode_result)) == 0  # forgotten: starts again
        entries = decide_places(active, LOCATIONS, meeting, 1, T0, encode_result)
        assert [entry[0] for entry in entries] == [policy.decide(place, 1, meeting, T0) for place in LOCATIONS]


# --------------------------------------------------------------------------- the location cache


def test_batch_hits_refresh_the_cache_as_single_lookups_do() -> None:
    """The batch path looks each address up through the same LRU cache, from C;
    eviction must follow the same recency as single lookups."""
    one, many = GeoDatabase(CITY_DB, cache_size=3), GeoDatabase(CITY_DB, cache_size=3)
    first, second, third, fourth = "175.16.199.1", "81.2.69.143", "216.160.83.57", "89.160.20.113"
    for geo in (one, many):
        geo.locate_many([first, second, third])
    one.locate(first)
    many.locate_many([first, first])
    assert (many.hits, many.misses) == (2, 3)
    for geo in (one, many):
        geo.locate(fourth)  # evicts the least recently used: second, not first
        misses = geo.misses
        geo.locate(first)
        assert geo.misses == misses  # still cached
        geo.locate(second)
        assert geo.misses == misses + 1  # evicted, looked up again
    assert many.locate_many([second, fourth]) == [Location("GB", ("GB-ENG",)), Location("SE", ("SE-E",))]
    assert (many.cache_entries, many.misses) == (3, 5)


def test_a_bad_address_in_a_batch_is_named_by_position_and_never_cached() -> None:
    geo = GeoDatabase(CITY_DB, cache_size=10)
    with pytest.raises(InvalidAddressError) as raised:
        geo.locate_many(["175.16.199.1", "81.2.69.143", "1.2.3", "not an address"])
    assert raised.value.position == 2
    assert (geo.cache_entries, geo.misses) == (2, 2)  # refused addresses are not lookups


# --------------------------------------------------------------------------- over gRPC, against Check


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PolicyHolder, Client]]:
    folder: Path = tmp_path_factory.mktemp("batch")
    holder = PolicyHolder()
    running = start_server(ServeConfig(listen=f"unix:{folder}/s.sock"), holder)
    client = Client(running.address, timeout=10)
    yield holder, client
    client.close()
    running.stop(grace=0)


def _now_relative(document: dict[str, Any]) -> dict[str, Any]:
    """The snapshot with each rule's window moved around the real clock: one that
    held at T0 holds now (for an hour either way), one that ended before T0 ended an
    hour ago, one that began after T0 begins in an hour; no boundary falls in the test."""
    now = time.time()

    def stamp(seconds: float) -> str:
        return dt.datetime.fromtimestamp(round(seconds), dt.UTC).isoformat()

    rules = []
    for rule in document["rules"]:
        if "valid_from" in rule:
            opens = dt.datetime.fromisoformat(rule["valid_from"]).timestamp()
            closes = dt.datetime.fromisoformat(rule["valid_until"]).timestamp()
            if closes <= T0:
                rule = dict(rule, valid_from=stamp(now - 7200), valid_until=stamp(now - 3600))
            elif opens > T0:
                rule = dict(rule, valid_from=stamp(now + 3600), valid_until=stamp(now + 7200))
            else:
                rule = dict(rule, valid_from=stamp(now - 3600), valid_until=stamp(now + 3600))
        rules.append(rule)
    return dict(document, rules=rules)


@settings(max_examples=25, deadline=None)
@given(
    snapshots(),
    st.lists(
        st.tuples(
            st.sampled_from(MEETINGS),
            st.sampled_from(ACCOUNTS),
            st.lists(st.sampled_from(TAGS), max_size=2, unique=True),
            actions,
            st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=40),
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_check_batch_answers_as_check_does_for_each(
    served: tuple[PolicyHolder, Client],
    document: dict[str, Any],
    batches: list[tuple[str, str, list[str], Action, list[str]]],
) -> None:
    holder, client = served
    holder.activate(compile_document(_now_relative(document)), GeoDatabase(CITY_DB, cache_size=64), "generated.json")
    for meeting_id, host, tags, action, addresses in batches:
        people = [Participant(address, user_id=f"u{n}", account_id="a") for n, address in enumerate(addresses)]
        answers = client.check_batch(meeting_id, people, tags=tags, host_account_id=host, action=action)
        one_by_one = [
            client.check(address, meeting_id, tags=tags, host_account_id=host, action=action, user_id=f"u{n}")
            for n, address in enumerate(addresses)
        ]
        assert answers == one_by_one


def test_adapters_batches_share_nothing_across_presenters(city_db: GeoDatabase) -> None:
    """Two presenters of one state get their own answers (the memo keys on the presenter)."""
    holder = PolicyHolder()
    holder.activate(policy_from(CN_ONLY), city_db, "test.yaml")
    path = DecisionPath(holder)
    people = [Participant("175.16.199.1"), Participant("81.2.69.143"), Participant("175.16.199.1")]
    meeting = Meeting("m-1")
    as_bytes = path.check_batch(people, meeting, 1, limit=10, endpoint=CHECK_BATCH, present=encode_result)
    as_values = path.check_batch(people, meeting, 1, limit=10, endpoint=CHECK_BATCH, present=Outcome)
    assert [type(result) for result in as_bytes.results] == [bytes] * 3
    assert [result.decision.rule_id for result in as_values.results] == ["cn", "", "cn"]
    assert as_values.results[0] is as_values.results[2]  # once per place
    assert as_bytes.decisions == as_values.decisions


# --------------------------------------------------------------------------- addresses read in C


def _field(number: int, text: str) -> bytes:
    data = text.encode()
    return varint(number << 3 | 2) + varint(len(data)) + data


def _request(people: list[list[tuple[int, str]]]) -> bytes:
    """A CheckBatchRequest written field by field: each participant's fields in the
    order and number given (the same field twice, ip last or missing: all legal protobuf)."""
    body = b"\x0a\x03\x0a\x01m"  # meeting {meeting_id: "m"}
    for person in people:
        data = b"".join(_field(number, text) for number, text in person)
        body += b"\x12" + varint(len(data)) + data
    return body + b"\x18\x01"  # action JOIN


texts = st.one_of(st.sampled_from(["175.16.199.1", "::1", "", "2001:250::1"]), st.text(max_size=12))
person_fields = st.lists(st.tuples(st.sampled_from([1, 1, 2, 3]), texts), max_size=4)


@settings(max_examples=500, deadline=None)
@given(st.lists(person_fields, min_size=1, max_size=12), st.sampled_from([4, 8, 256]))
def test_addresses_read_in_c_are_the_messages_or_none(people: list[list[tuple[int, str]]], longest: int) -> None:
    data = _request(people)
    message = pb.CheckBatchRequest.FromString(data)
    read = batch_addresses(data, len(message.participants), longest)
    if read is not None:
        assert read == [participant.ip for participant in message.participants]
        assert all(len(p.user_id) <= longest and len(p.account_id) <= longest for p in message.participants)


def test_canonical_requests_are_read_in_c_and_the_rest_from_the_message() -> None:
    canonical = pb.CheckBatchRequest(
        participants=[pb.Participant(ip="175.16.199.1", user_id="u"), pb.Participant(ip="::1")]
    )
    assert batch_addresses(canonical.SerializeToString(), 2, 256) == ["175.16.199.1", "::1"]
    twice_and_none = _request([[(1, "175.16.199.1"), (1, "81.2.69.143")], [(2, "u")]])
    ip_last = _request([[(2, "u"), (1, "175.16.199.1")]])
    long_id = _request([[(1, "175.16.199.1"), (2, "u" * 300)]])
    for data in (twice_and_none, ip_last, long_id):
        assert batch_addresses(data, len(pb.CheckBatchRequest.FromString(data).participants), 256) is None


def test_a_batch_written_unusually_is_answered_as_its_message_says(served: tuple[PolicyHolder, Client]) -> None:
    """Over gRPC: requests the C reading declines are read from the message, same answers and errors."""
    holder, client = served
    holder.activate(policy_from(CN_ONLY), GeoDatabase(CITY_DB), "test.yaml")
    channel = grpc.insecure_channel(client.target)
    call: grpc.UnaryUnaryMultiCallable[bytes, pb.CheckBatchResponse] = channel.unary_unary(
        "/pdp.v1.AdmissionService/CheckBatch", response_deserializer=pb.CheckBatchResponse.FromString
    )
    # participant 0: ip given twice (the last counts: GB); participant 1: ip after its user id (CN)
    data = _request([[(1, "175.16.199.1"), (1, "81.2.69.143")], [(2, "u"), (1, "175.16.199.1")]])
    answer = call(data, timeout=10)
    assert [(r.rule_id, r.location.country) for r in answer.results] == [("", "GB"), ("cn", "CN")]
    with pytest.raises(grpc.RpcError) as refused:
        call(_request([[(1, "175.16.199.1")], [(1, "81.2.69.143"), (3, "a" * 300)]]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "participants[1].account_id" in (refused.value.details() or "")
    channel.close()
