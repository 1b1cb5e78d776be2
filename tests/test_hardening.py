"""Hostile requests, malformed snapshots and databases, broken stores, TLS and sockets."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import shutil
import socket
import stat
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pdp._proto import admission_pb2 as pb
from pdp.bounds import MAX_TAGS
from pdp.client import Client
from pdp.config import ServeConfig
from pdp.geo import GeoDatabase, GeoIPError, read_pinned_sha256
from pdp.geo_watch import GeoWatcher
from pdp.model import Verdict
from pdp.reload import Reloader
from pdp.server import start_server
from pdp.sources import SourceOptions, open_source
from pdp.state import PolicyHolder
from pdp.wire import varint

from .conftest import CITY_DB, CN_MEMORIAL, COUNTRY_DB, policy_from, replace_file
from .servers import HttpStore

CN, HK = "175.16.199.1", "2001:2e0::1"
OK_MEETING = pb.Meeting(meeting_id="m", tags=["memorial"])


def check(ip: str = CN, **meeting: Any) -> bytes:
    fields = {"meeting_id": "m", **meeting}
    return pb.CheckRequest(
        participant=pb.Participant(ip=ip), meeting=pb.Meeting(**fields), action=pb.ACTION_JOIN
    ).SerializeToString()


def batch(ips: list[str], **meeting: Any) -> bytes:
    return pb.CheckBatchRequest(
        meeting=pb.Meeting(**{"meeting_id": "m", **meeting}),
        participants=[pb.Participant(ip=ip) for ip in ips],
        action=pb.ACTION_JOIN,
    ).SerializeToString()


def field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One raw protobuf field: tag, then the payload as given."""
    return bytes([(number << 3) | wire_type]) + payload


def length_delimited(number: int, data: bytes) -> bytes:
    return field(number, 2, varint(len(data)) + data)


def participant_ip(raw: bytes) -> bytes:
    """A CheckRequest whose participant.ip holds ``raw`` bytes, valid UTF-8 or not."""
    return (
        length_delimited(1, length_delimited(1, raw))
        + length_delimited(2, length_delimited(1, b"m"))
        + field(3, 0, b"\x01")
    )


INVALID = grpc.StatusCode.INVALID_ARGUMENT
# (name, method, request bytes, expected status, text the details must contain)
CORPUS: list[tuple[str, str, bytes, grpc.StatusCode, str]] = [
    ("garbage ff", "Check", b"\xff\xff\xff\xff", INVALID, "not a valid CheckRequest"),
    ("garbage text", "Check", b"GET / HTTP/1.1\r\n\r\n", INVALID, "not a valid CheckRequest"),
    ("truncated length", "Check", b"\x0a\x7f\x0a", INVALID, "not a valid CheckRequest"),
    ("truncated varint", "Check", b"\x18\xff", INVALID, "not a valid CheckRequest"),
    ("end-group tag", "Check", b"\x0c", INVALID, "not a valid CheckRequest"),
    ("field number zero", "Check", b"\x00\x01", INVALID, "not a valid CheckRequest"),
    ("participant as varint", "Check", field(1, 0, b"\x05") + check()[2:], INVALID, ""),
    ("non-UTF-8 ip", "Check", participant_ip(b"\xc3\x28"), INVALID, "not a valid CheckRequest"),
    ("overlong UTF-8 ip", "Check", participant_ip(b"\xc0\xaf"), INVALID, "not a valid CheckRequest"),
    ("empty request", "Check", b"", INVALID, "meeting.meeting_id: required"),
    ("NUL in ip", "Check", check("1.2.3.4\x00"), INVALID, "participant.ip"),
    ("NUL-only ip", "Check", check("\x00"), INVALID, "participant.ip"),
    ("space ip", "Check", check(" "), INVALID, "participant.ip"),
    ("tab ip", "Check", check("\t1.2.3.4"), INVALID, "participant.ip"),
    ("fullwidth digits", "Check", check("\uff11.\uff12.\uff13.\uff14"), INVALID, "participant.ip"),
    ("cidr", "Check", check("1.2.3.0/24"), INVALID, "participant.ip"),
    ("five octets", "Check", check("1.2.3.4.5"), INVALID, "participant.ip"),
    ("octet 999", "Check", check("999.1.1.1"), INVALID, "participant.ip"),
    ("hex octet", "Check", check("0x7f.0.0.1"), INVALID, "participant.ip"),
    ("octal octet", "Check", check("010.0.0.1"), INVALID, "participant.ip"),
    ("short v4", "Check", check("1.2.3"), INVALID, "participant.ip"),
    ("double colon twice", "Check", check("2001:db8::1::1"), INVALID, "participant.ip"),
    ("bad mapped", "Check", check("::ffff:1.2.3"), INVALID, "participant.ip"),
    ("zone", "Check", check("fe80::1%eth0"), INVALID, "zone indexes"),
    ("port", "Check", check("1.2.3.4:443"), INVALID, "without a port"),
    ("bracketed", "Check", check("[2001:db8::1]"), INVALID, "brackets"),
    ("url", "Check", check("http://1.2.3.4/"), INVALID, "participant.ip"),
    ("host name", "Check", check("localhost"), INVALID, "participant.ip"),
    ("huge ip", "Check", check("1" * 100_000), INVALID, "participant.ip"),
    ("no meeting id", "Check", check(meeting_id=""), INVALID, "meeting.meeting_id: required"),
    ("huge meeting id", "Check", check(meeting_id="m" * 10_000), INVALID, "meeting.meeting_id: longer than"),
    ("huge host account", "Check", check(host_account_id="h" * 1000), INVALID, "meeting.host_account_id"),
    ("10,000 tags", "Check", check(tags=[f"t{n}" for n in range(10_000)]), INVALID, f"at most {MAX_TAGS}"),
    ("huge tag", "Check", check(tags=["x" * 1000]), INVALID, "a tag longer than"),
    # The bound counts tags as sent, not the distinct ones the decision uses.
    ("one tag too often", "Check", check(tags=["t"] * (MAX_TAGS + 1)), INVALID, f"{MAX_TAGS + 1} given, at most"),
    ("huge tag twice", "Check", check(tags=["ok", "x" * 1000, "x" * 1000]), INVALID, "a tag longer than"),
    (
        "huge user id",
        "Check",
        pb.CheckRequest(
            participant=pb.Participant(ip=CN, user_id="u" * 5000), meeting=OK_MEETING, action=pb.ACTION_JOIN
        ).SerializeToString(),
        INVALID,
        "participant.user_id",
    ),
    (
        "action zero",
        "Check",
        pb.CheckRequest(participant=pb.Participant(ip=CN), meeting=OK_MEETING).SerializeToString(),
        INVALID,
        "action: 0",
    ),
    ("action three", "Check", check()[:-1] + b"\x03", INVALID, "action: 3"),
    ("action negative", "Check", check()[:-2] + field(3, 0, b"\xff" * 9 + b"\x01"), INVALID, "action: -1"),
    (
        "over max message size",
        "Check",
        check(meeting_id="m" * (5 * 1024 * 1024)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "",
    ),
    ("batch garbage", "CheckBatch", b"\x12\xff\xff", INVALID, "not a valid CheckBatchRequest"),
    ("batch empty", "CheckBatch", batch([]), INVALID, "participants: 0 given"),
    ("batch over limit", "CheckBatch", batch([CN] * 1001), INVALID, "participants: 1001 given"),
    ("batch bad ip", "CheckBatch", batch([CN, HK, "1.2.3"]), INVALID, "participants[2].ip"),
    ("batch no meeting", "CheckBatch", batch([CN], meeting_id=""), INVALID, "meeting.meeting_id: required"),
    (
        "batch huge user",
        "CheckBatch",
        pb.CheckBatchRequest(
            meeting=OK_MEETING,
            participants=[pb.Participant(ip=CN), pb.Participant(ip=CN, account_id="a" * 999)],
            action=pb.ACTION_JOIN,
        ).SerializeToString(),
        INVALID,
        "participants[1].account_id",
    ),
    ("batch 10,000 tags", "CheckBatch", batch([CN], tags=[str(n) for n in range(10_000)]), INVALID, "meeting.tags"),
    ("status garbage", "GetStatus", b"\xff", INVALID, "not a valid GetStatusRequest"),
    ("unknown method", "Nope", b"", grpc.StatusCode.UNIMPLEMENTED, ""),
    ("unknown service", "/x.Y/Z", b"", grpc.StatusCode.UNIMPLEMENTED, ""),
    ("garbage path", "/\x01\x02", b"", grpc.StatusCode.UNIMPLEMENTED, ""),
]


def test_corpus_has_at_least_fifty_requests() -> None:
    assert len(CORPUS) + 3 >= 50  # plus the deadline, cancellation and watch cases below


def raw_call(target: str, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    path = method if method.startswith("/") else f"/pdp.v1.AdmissionService/{method}"
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
        try:
            call(data, timeout=10)
        except grpc.RpcError as error:
            if isinstance(error, grpc.Call):
                return error.code(), error.details() or ""
            raise
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(("name", "method", "data", "code", "text"), CORPUS, ids=[row[0] for row in CORPUS])
def test_hostile_request_gets_a_specific_status(
    module_server: tuple[str, Client], name: str, method: str, data: bytes, code: grpc.StatusCode, text: str
) -> None:
    target, client = module_server
    got, details = raw_call(target, method, data)
    assert got == code, details
    assert text in details
    # Afterwards: still healthy, still deciding the same way.
    result = client.check(CN, "m", tags=["memorial"])
    assert (result.verdict, result.rule_id) == (Verdict.DENY, "cn-memorial")


def test_expired_deadline_cancelled_call_and_garbage_watch(module_server: tuple[str, Client]) -> None:
    target, client = module_server
    with grpc.insecure_channel(target) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/pdp.v1.AdmissionService/Check")
        with pytest.raises(grpc.RpcError) as expired:
            call(check(), timeout=-1)
        assert isinstance(expired.value, grpc.Call)
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        future = call.future(check(tags=["memorial"]), timeout=10)
        future.cancel()
        assert future.cancelled() or future.code() in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED)
        watch = channel.unary_stream("/pdp.v1.AdmissionService/WatchPolicy")
        with pytest.raises(grpc.RpcError) as garbage:
            next(iter(watch(b"\xff", timeout=10)))
        assert isinstance(garbage.value, grpc.Call)
        assert garbage.value.code() == INVALID
    assert client.check(CN, "m", tags=["memorial"]).verdict == Verdict.DENY


# --------------------------------------------------------------------------- snapshots

GOOD = b"version: 5\nrules:\n  - {id: cn, effect: deny, jurisdiction: [CN], legal_basis: Order 17}\n"
BIG_LIST = "[" + ",".join(["1"] * 10) + "]"
SNAPSHOTS: list[tuple[str, bytes, str]] = [
    ("empty", b"", "not null"),
    ("only a comment", b"# nothing here\n", "not null"),
    ("truncated at 10", GOOD[:10], "rules: required"),
    ("truncated at 30", GOOD[:30], "invalid YAML"),
    ("truncated mid rule", GOOD[:-20], "invalid YAML"),
    # JSON bodies in a file named .yaml are read as YAML, which JSON is a subset of.
    ("truncated JSON", b'{"version": 5, "rules": [{"id": "cn"', "invalid YAML"),
    ("JSON trailing garbage", b'{"version": 5, "rules": []} trailing', "invalid YAML"),
    ("UTF-16 BOM", "version: 5\nrules: []\n".encode("utf-16"), "not UTF-8"),
    (
        "latin-1 bytes",
        "version: 5\nrules:\n  - {id: café, effect: allow, jurisdiction: [CN]}\n".encode("latin-1"),
        "not UTF-8",
    ),
    ("NUL byte", b"version: 5\x00\nrules: []\n", "invalid YAML"),
    ("deep YAML nesting", b"version: 5\nrules: " + b"[" * 50_000 + b"]" * 50_000 + b"\n", "invalid YAML"),
    ("deep JSON nesting", b'{"version": 5, "rules": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid YAML"),
    (
        "alias bomb",
        (
            b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
            b"e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
            b"version: 5\nrules: *f\n"
        ),
        "aliases expand",
    ),
    ("python object tag", b"version: !!python/object:os.system [id]\nrules: []\n", "invalid YAML"),
    ("duplicate top key", b"version: 5\nversion: 6\nrules: []\n", "duplicate key 'version'"),
    ("duplicate rule key", b"version: 5\nrules:\n  - {id: a, id: b}\n", "duplicate key 'id'"),
    ("duplicate JSON key", b'{"version": 5, "rules": [], "rules": []}', "duplicate key 'rules'"),
    (
        "duplicate rule ids",
        GOOD + b"  - {id: cn, effect: deny, jurisdiction: [HK], legal_basis: x}\n",
        "duplicate rule id",
    ),
    ("version overflow", b"version: 18446744073709551616\nrules: []\n", "is outside"),
    ("version float", b"version: 5.5\nrules: []\n", "must be an integer"),
    ("version inf", b"version: .inf\nrules: []\n", "must be an integer"),
    ("version nan", b"version: .nan\nrules: []\n", "must be an integer"),
    ("version bool", b"version: true\nrules: []\n", "not a boolean"),
    ("version string", b"version: '6'\nrules: []\n", "must be an integer"),
    ("version negative", b"version: -6\nrules: []\n", "is outside"),
    ("lower version", GOOD.replace(b"version: 5", b"version: 4"), "lower than the active 5 (replay)"),
    ("same version other rules", GOOD.replace(b"[CN]", b"[HK]"), "already active with other content (conflict)"),
    ("priority overflow", GOOD.replace(b"Order 17}", b"Order 17, priority: 99999999999999}"), "is outside"),
    ("priority float", GOOD.replace(b"Order 17}", b"Order 17, priority: 1.0e+30}"), "must be an integer"),
    ("rule without jurisdiction", b"version: 6\nrules:\n  - {id: x, effect: allow}\n", "jurisdiction: required"),
    ("global jurisdiction", b"version: 6\nrules:\n  - {id: x, effect: allow, jurisdiction: ['*']}\n", "'*'"),
    ("jurisdiction EU", b"version: 6\nrules:\n  - {id: x, effect: allow, jurisdiction: [EU]}\n", "'EU' is not"),
    ("rules mapping", b"version: 6\nrules: {a: 1}\n", "must be a list"),
    ("rules of strings", b"version: 6\nrules: [a, b]\n", "must be a mapping"),
    ("top-level list", b"[1, 2, 3]\n", "not a list"),
    ("top-level scalar", b"hello\n", "not a string"),
    ("huge id", b"version: 6\nrules:\n  - {id: " + b"x" * 500 + b", effect: allow, jurisdiction: [CN]}\n", "use 1-128"),
    (
        "bad window",
        GOOD.replace(b"Order 17}", b"Order 17, valid_from: 2030-01-01T00:00:00Z, valid_until: 2020-01-01T00:00:00Z}"),
        "later than valid_from",
    ),
    ("naive time", GOOD.replace(b"Order 17}", b"Order 17, valid_from: '2030-01-01T00:00:00'}"), "needs a UTC offset"),
    ("deny without basis", b"version: 6\nrules:\n  - {id: x, effect: deny, jurisdiction: [CN]}\n", "legal_basis"),
    ("list of many errors", b"version: 6\nrules: " + BIG_LIST.encode() + b"\n", "must be a mapping"),
]


def test_snapshot_corpus_has_at_least_forty_entries() -> None:
    assert len(SNAPSHOTS) >= 40


@pytest.mark.parametrize(("name", "data", "reason"), SNAPSHOTS, ids=[row[0] for row in SNAPSHOTS])
def test_malformed_snapshot_is_rejected_and_last_good_stays(
    tmp_path: Path, name: str, data: bytes, reason: str
) -> None:
    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    path = tmp_path / "rules.yaml"
    path.write_bytes(GOOD)
    reloader = Reloader(holder, open_source(path.as_uri()))
    assert reloader.run_once() == "activated version 5"
    replace_file(path, data)
    tracemalloc.start()
    try:
        result = reloader.run_once()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.startswith("rejected: "), result
    assert reason in result
    assert holder.policy is not None
    assert holder.policy.version == 5
    assert peak < 256 * 1024 * 1024  # bounded memory, whatever the input


def test_snapshot_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    from pdp.rules import MAX_SNAPSHOT_BYTES

    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    path = tmp_path / "rules.yaml"
    path.write_bytes(GOOD)
    reloader = Reloader(holder, open_source(path.as_uri()))
    reloader.run_once()
    staged = tmp_path / "staged.yaml"
    with staged.open("wb") as handle:  # sparse: no disk or memory spent on the test itself
        handle.truncate(MAX_SNAPSHOT_BYTES + 1)
    staged.replace(path)
    result = reloader.run_once()
    assert result.startswith("error: ")
    assert "larger than" in result
    assert holder.policy is not None
    assert holder.policy.version == 5


# --------------------------------------------------------------------------- GeoIP files


def corrupted_copies(folder: Path) -> Iterator[tuple[str, Path]]:
    good = CITY_DB.read_bytes()
    for size in (0, 1, 16, 1000, len(good) // 2, len(good) - 100, len(good) - 1):
        path = folder / f"truncated-{size}.mmdb"
        path.write_bytes(good[:size])
        yield f"truncated to {size} bytes", path
    marker = good.rfind(b"\xab\xcd\xefMaxMind.com")
    for offset in (0, 7, 64, marker, marker + 5, marker + 20, len(good) - 30, len(good) - 3):
        flipped = bytearray(good)
        flipped[offset] ^= 0xFF
        path = folder / f"flipped-{offset}.mmdb"
        path.write_bytes(bytes(flipped))
        yield f"byte {offset} flipped", path


def test_corrupt_databases_are_refused_or_harmless_and_never_replace_a_good_one(tmp_path: Path) -> None:
    holder = PolicyHolder()
    live = tmp_path / "live.mmdb"
    shutil.copy(CITY_DB, live)
    holder.activate(policy_from(CN_MEMORIAL), GeoDatabase(live), "s")
    watcher = GeoWatcher(holder, str(live), cache_size=10)
    refused = 0
    for name, path in corrupted_copies(tmp_path):
        try:
            database = GeoDatabase(path)
        except GeoIPError:
            refused += 1
            shutil.copy(path, tmp_path / "staged.mmdb")
            (tmp_path / "staged.mmdb").replace(live)
            assert watcher.run_once().startswith("rejected: "), name
            assert holder.active is not None
            assert holder.active.geo.locate(CN).country == "CN", name  # the good one serves on
            shutil.copy(CITY_DB, tmp_path / "staged.mmdb")
            (tmp_path / "staged.mmdb").replace(live)
            watcher.run_once()
            continue
        # A flip that leaves the structure valid cannot be told from a real change;
        # then lookups must still answer, never raise.
        for address in (CN, HK, "81.2.69.142", "216.160.83.57", "10.0.0.1", "2001:480:10::1"):
            database.locate(address)
    assert refused >= 9  # every truncation and the flips that break structure


def test_with_a_pinned_sha256_every_corrupted_copy_is_refused_at_start_and_on_reload(tmp_path: Path) -> None:
    pin = tmp_path / "live.mmdb.sha256"
    pin.write_text(f"{hashlib.sha256(CITY_DB.read_bytes()).hexdigest()}  live.mmdb\n")
    live = tmp_path / "live.mmdb"
    shutil.copy(CITY_DB, live)
    holder = PolicyHolder()
    holder.activate(policy_from(CN_MEMORIAL), GeoDatabase(live, sha256=read_pinned_sha256(pin)), "s")
    serving = holder.active
    watcher = GeoWatcher(holder, str(live), cache_size=10, sha256_file=str(pin))
    copies = list(corrupted_copies(tmp_path))
    for name, path in copies:
        with pytest.raises(GeoIPError, match="is not the pinned"):
            GeoDatabase(path, sha256=read_pinned_sha256(pin))
        staged = tmp_path / "staged.mmdb"
        shutil.copy(path, staged)
        staged.replace(live)
        result = watcher.run_once()
        assert result.startswith("rejected: "), name
        assert "is not the pinned" in result, name
        assert holder.active is serving, name  # the good database serves on
    assert len(copies) == 15  # seven truncations, eight flips: none slipped through
    shutil.copy(CITY_DB, tmp_path / "staged.mmdb")
    (tmp_path / "staged.mmdb").replace(live)
    assert watcher.run_once().startswith("reloaded")
    assert holder.active is not serving


def test_a_new_database_is_accepted_once_its_new_sha256_is_pinned(tmp_path: Path) -> None:
    country = COUNTRY_DB
    pin = tmp_path / "live.mmdb.sha256"
    pin.write_text(hashlib.sha256(CITY_DB.read_bytes()).hexdigest() + "\n")
    live = tmp_path / "live.mmdb"
    shutil.copy(CITY_DB, live)
    holder = PolicyHolder()
    holder.activate(policy_from(CN_MEMORIAL), GeoDatabase(live, sha256=read_pinned_sha256(pin)), "s")
    watcher = GeoWatcher(holder, str(live), cache_size=10, sha256_file=str(pin))
    shutil.copy(country, tmp_path / "staged.mmdb")
    (tmp_path / "staged.mmdb").replace(live)  # the database first: refused, its digest is not pinned yet
    assert watcher.run_once().startswith("rejected: ")
    pin.write_text(hashlib.sha256(country.read_bytes()).hexdigest() + "\n")  # then the digest
    assert watcher.run_once().startswith("reloaded")
    assert holder.active is not None
    assert "Country" in holder.active.geo.database_type


# --------------------------------------------------------------------------- broken stores


class _Misbehaving:
    """A TCP server that accepts and then hangs or resets, never speaking HTTP."""

    def __init__(self, behaviour: str) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.behaviour = behaviour
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            if self.behaviour == "reset":
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                connection.close()
            else:
                self.connections.append(connection)  # hang: read nothing, answer nothing

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


@pytest.mark.parametrize("behaviour", ["hang", "reset"])
def test_hanging_or_resetting_store_keeps_last_good_and_recovers(
    tmp_path: Path, http_store: HttpStore, behaviour: str
) -> None:
    http_store.store.files["/rules"] = GOOD
    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    good = Reloader(holder, open_source(http_store.url("/rules")))
    assert good.run_once() == "activated version 5"
    bad_server = _Misbehaving(behaviour)
    try:
        broken = Reloader(holder, open_source(f"http://127.0.0.1:{bad_server.port}/rules", SourceOptions(timeout=0.5)))
        result = broken.run_once()
    finally:
        bad_server.close()
    assert result.startswith("error: ")
    assert holder.status.stale
    assert holder.policy is not None
    assert holder.policy.version == 5
    http_store.store.files["/rules"] = GOOD.replace(b"version: 5", b"version: 6")
    assert good.run_once() == "activated version 6"
    assert not holder.status.stale


def test_store_errors_then_garbage_then_lying_etag(http_store: HttpStore) -> None:
    store = http_store.store
    store.files["/rules"] = GOOD
    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    reloader = Reloader(holder, open_source(http_store.url("/rules")))
    reloader.run_once()
    store.status_override = 500
    assert "HTTP 500" in reloader.run_once()
    store.status_override = 0
    store.files["/rules"] = os.urandom(4096)
    assert reloader.run_once().startswith("rejected: ")
    # A store that answers 304 for a changed object (a lying ETag): nothing to see, the
    # last good policy serves on without error; once the ETag is honest again, it is followed.
    store.files["/rules"] = GOOD.replace(b"version: 5", b"version: 7")
    honest_etag = store.etag
    store.etag = staticmethod(lambda data: honest_etag(GOOD))  # type: ignore[method-assign]
    assert reloader.run_once() == "unchanged"
    assert holder.policy is not None
    assert holder.policy.version == 5
    store.etag = honest_etag  # type: ignore[method-assign]
    assert reloader.run_once() == "activated version 7"
    assert not holder.status.stale


def test_bearer_token_never_appears_in_status_or_errors(tmp_path: Path, http_store: HttpStore) -> None:
    token = tmp_path / "token"
    token.write_text("TOKEN-s3cr3t-value")
    http_store.store.status_override = 403
    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    source = open_source(http_store.url("/rules"), SourceOptions(bearer_token_file=str(token)))
    Reloader(holder, source).run_once()
    assert http_store.store.authorization[-1] == "Bearer TOKEN-s3cr3t-value"
    assert "s3cr3t" not in repr(holder.status)


def test_deleted_database_file_keeps_serving_then_reloads(tmp_path: Path) -> None:
    live = tmp_path / "GeoIP2-City.mmdb"
    shutil.copy(CITY_DB, live)
    holder = PolicyHolder()
    holder.activate(policy_from(CN_MEMORIAL), GeoDatabase(live), "s")
    watcher = GeoWatcher(holder, str(live), cache_size=10)
    live.unlink()
    assert watcher.run_once().startswith("missing")
    assert holder.active is not None
    assert holder.active.geo.locate(CN).country == "CN"
    shutil.copy(CITY_DB, live)
    assert watcher.run_once().startswith("reloaded")


# --------------------------------------------------------------------------- soak (short)


def test_short_soak_reloads_under_load_without_failures_or_leaks(tmp_path: Path) -> None:
    import json as json_module

    rules = tmp_path / "rules.json"
    document = {"version": 1, "rules": [{"id": "cn", "effect": "deny", "jurisdiction": ["CN"], "legal_basis": "x"}]}
    rules.write_text(json_module.dumps(document))
    live = tmp_path / "GeoIP2-City.mmdb"
    shutil.copy(CITY_DB, live)
    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(live))
    reloader = Reloader(holder, open_source(rules.as_uri()))
    reloader.initial()
    watcher = GeoWatcher(holder, str(live), cache_size=100)
    running = start_server(ServeConfig(listen=f"unix:{tmp_path}/s.sock"), holder)
    client = Client(running.address, timeout=10)
    failures: list[BaseException] = []
    calls = [0]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set() or calls[0] < 50:
            try:
                client.check_batch("m", [CN, HK, "81.2.69.142"])
                calls[0] += 1
            except BaseException as error:  # every failure is the finding
                failures.append(error)

    def descriptors() -> int:
        return sum(1 for _ in Path("/proc/self/fd").iterdir())

    def outside_pool() -> int:
        """Threads other than the RPC pool's, which grows on demand up to --workers."""
        return sum(1 for thread in threading.enumerate() if not thread.name.startswith("pdp-rpc"))

    workers = [threading.Thread(target=load) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        fds, threads = 0, 0
        for version in range(2, 52):
            if version == 12:  # warmed up: channels are open; the RPC pool may still add workers
                fds, threads = descriptors(), outside_pool()
            document["version"] = version
            replace_file(rules, json_module.dumps(document).encode())
            assert reloader.run_once() == f"activated version {version}"
            if version % 10 == 0:
                staged = tmp_path / "staged.mmdb"
                shutil.copy(CITY_DB, staged)
                staged.replace(live)
                assert watcher.run_once().startswith("reloaded")
        grown = (descriptors() - fds, outside_pool() - threads)
        pool = sum(1 for thread in threading.enumerate() if thread.name.startswith("pdp-rpc"))
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
        client.close()
        running.stop(grace=5)
    assert failures == []
    assert grown[0] <= 2  # replaced databases are released, not leaked
    assert grown[1] == 0
    assert pool <= ServeConfig().workers
    assert holder.status.geoip_reloads == 5


# --------------------------------------------------------------------------- transport security


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, signer: Any, ca: bool, sans: list[Any]
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("pdp test CA", ca_key, None, ca_key, True, [])
    paths: dict[str, Path] = {}
    for role, sans in (
        ("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ("client", [x509.DNSName("meeting-node")]),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = certificate(role, key, ca.subject, ca_key, False, sans)
        paths[f"{role}.crt"] = folder / f"{role}.crt"
        paths[f"{role}.key"] = folder / f"{role}.key"
        paths[f"{role}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{role}.key"].write_bytes(key_pem(key))
    paths["ca.crt"] = folder / "ca.crt"
    paths["ca.crt"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return paths


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, Path]:
    return make_certificates(tmp_path)


def test_tls_serves_and_mutual_tls_requires_a_client_certificate(certificates: dict[str, Path]) -> None:
    files = {name: str(path) for name, path in certificates.items()}
    holder = PolicyHolder()
    holder.activate(policy_from(CN_MEMORIAL), GeoDatabase(CITY_DB), "s")
    config = ServeConfig(
        listen="127.0.0.1:0", tls_cert=files["server.crt"], tls_key=files["server.key"], tls_client_ca=files["ca.crt"]
    )
    server = start_server(config, holder)
    try:
        with Client(
            server.address, timeout=5, tls_ca=files["ca.crt"], tls_cert=files["client.crt"], tls_key=files["client.key"]
        ) as client:
            assert client.check(CN, "m", tags=["memorial"]).verdict == Verdict.DENY
        with Client(server.address, timeout=2, tls_ca=files["ca.crt"]) as anonymous, pytest.raises(grpc.RpcError):
            anonymous.check(CN, "m")
        with Client(server.address, timeout=2) as plaintext, pytest.raises(grpc.RpcError):
            plaintext.check(CN, "m")
    finally:
        server.stop(grace=0)


def test_non_loopback_needs_tls_unless_overridden(certificates: dict[str, Path]) -> None:
    holder = PolicyHolder()
    with pytest.raises(OSError, match=r"refusing to serve 0\.0\.0\.0:0 without TLS"):
        start_server(ServeConfig(listen="0.0.0.0:0"), holder)  # the refusal is the test
    allowed = start_server(ServeConfig(listen="0.0.0.0:0", allow_insecure_remote=True), holder)
    allowed.stop(grace=0)
    secured = start_server(
        ServeConfig(
            listen="0.0.0.0:0", tls_cert=str(certificates["server.crt"]), tls_key=str(certificates["server.key"])
        ),
        holder,
    )
    secured.stop(grace=0)
    with pytest.raises(OSError, match="needs both --tls-cert and --tls-key"):
        start_server(ServeConfig(listen="127.0.0.1:0", tls_cert=str(certificates["server.crt"])), holder)


def test_unix_socket_is_group_only_inside_a_private_directory(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "pdp"
    running = start_server(ServeConfig(listen=f"unix:{directory}/pdp.sock"), PolicyHolder())
    try:
        assert stat.S_IMODE((directory / "pdp.sock").stat().st_mode) == 0o660
        assert stat.S_IMODE(directory.stat().st_mode) == 0o750
        assert stat.S_ISSOCK((directory / "pdp.sock").stat().st_mode)
    finally:
        running.stop(grace=0)
