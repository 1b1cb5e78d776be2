"""Metrics, traces, the audit log and lifecycle logs (the transparency report: tests/test_report.py)."""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import maxminddb
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from pdp.audit import AuditConfig, AuditLog, pseudonym
from pdp.client import Client, Participant
from pdp.config import ServeConfig, describe
from pdp.decisions import DecisionPath, Endpoint, RequestError
from pdp.decisions import Participant as DecisionParticipant
from pdp.geo import GeoDatabase, format_build
from pdp.logs import JsonFormatter, redact_url
from pdp.model import Decision, Location, Meeting, Verdict
from pdp.server import RunningServer, start_server
from pdp.state import Active, PolicyHolder
from pdp.telemetry import DURATION_BUCKETS, Telemetry, TelemetryError, _load, configure_from_environment
from pdp.wire import encode_result

from .conftest import CITY_DB, policy_from

RULES = """
version: 12
rules:
  - {id: cn, effect: deny, jurisdiction: [CN], legal_basis: Order 17/2020}
  - {id: gb-draft, effect: deny, jurisdiction: [GB], mode: shadow, legal_basis: Draft 3}
"""
CN, HK, GB = "175.16.199.1", "2001:2e0::1", "81.2.69.142"


def loaded_holder(rules: str = RULES) -> PolicyHolder:
    holder = PolicyHolder()
    holder.activate(policy_from(rules), GeoDatabase(CITY_DB), "file:///rules.yaml")
    return holder


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    running: list[tuple[RunningServer, Client]] = []

    def start(holder: PolicyHolder, **kwargs: Any) -> Client:
        server = start_server(ServeConfig(listen=f"unix:{tmp_path}/s{len(running)}.sock"), holder, **kwargs)
        client = Client(server.address, timeout=10)
        running.append((server, client))
        return client

    yield start
    for server, client in running:
        client.close()
        server.stop(grace=0)


# --------------------------------------------------------------------------- metrics


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    for resource_metrics in data.resource_metrics:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                points[metric.name] = [(dict(point.attributes or {}), point) for point in metric.data.data_points]
    return points


def test_metrics_after_known_checks(serve: Any) -> None:
    holder = loaded_holder()
    reader = InMemoryMetricReader()
    telemetry = Telemetry(holder, MeterProvider(metric_readers=[reader]))
    client = serve(holder, telemetry=telemetry)
    client.check(CN, "m")
    client.check(CN, "m")
    client.check(HK, "m")
    client.check(GB, "m")
    client.check_batch("m", [CN, HK])
    points = metric_points(reader)

    decisions = {
        (a["verdict"], a["rule_id"], a["mode"], a["jurisdiction"]): p.value for a, p in points["pdp.decisions"]
    }
    assert decisions == {
        ("DENY", "cn", "enforce", "CN"): 3,
        ("ALLOW", "", "enforce", "HK"): 2,
        ("ALLOW", "", "enforce", "GB"): 1,
        ("DENY", "gb-draft", "shadow", "GB"): 1,
    }
    durations = {(a["rpc"], a["verdict"]): p for a, p in points["pdp.check.duration"]}
    assert {key: point.count for key, point in durations.items()} == {
        ("Check", "DENY"): 2,
        ("Check", "ALLOW"): 2,
        ("CheckBatch", "MIXED"): 1,
    }
    assert tuple(durations[("Check", "DENY")].explicit_bounds) == DURATION_BUCKETS
    assert DURATION_BUCKETS[0] < 0.0001  # resolves tens of microseconds
    cache = {a["result"]: p.value for a, p in points["pdp.geoip.cache"]}
    assert cache == {"hit": 3, "miss": 3}
    assert points["pdp.policy.version"][0][1].value == 12
    assert points["pdp.geoip.build_epoch"][0][1].value == GeoDatabase(CITY_DB).build_epoch
    assert points["pdp.policy.age_seconds"][0][1].value >= 0
    reloads = {a["result"]: p.value for a, p in points["pdp.policy.reloads"]}
    assert reloads["activated"] == 0
    assert {a["source"] for a, _ in points["pdp.policy.reloads"]} == {"file"}


def test_failed_calls_are_timed_as_errors(serve: Any) -> None:
    holder = loaded_holder()
    reader = InMemoryMetricReader()
    client = serve(holder, telemetry=Telemetry(holder, MeterProvider(metric_readers=[reader])))
    with pytest.raises(grpc.RpcError, match=r"participant\.ip"):
        client.check("1.2.3", "m")
    durations = {(a["rpc"], a["verdict"]): p.count for a, p in metric_points(reader)["pdp.check.duration"]}
    assert durations == {("Check", "ERROR"): 1}


# Two addresses of MaxMind's test network 89.160.20.112/28 and its neighbour
# 89.160.20.128/25, which share one record (Linköping, SE) that no probe at open reads.
LINKOPING = ("89.160.20.113", "89.160.20.129")


def record_offset(database: bytes, metadata: maxminddb.reader.Metadata, address: str) -> int:
    """Where ``address``'s record starts in ``database``: its search-tree walk, as
    the MaxMind DB format specifies it (IPv4 under ``::/96`` in an IPv6 tree)."""
    node_bytes = metadata.record_size // 4
    ip = ipaddress.ip_address(address)
    packed = ip.packed if ip.version == 6 or metadata.ip_version == 4 else bytes(12) + ip.packed
    node = 0
    for bit in range(len(packed) * 8):
        if node >= metadata.node_count:
            break
        whole = int.from_bytes(database[node * node_bytes : (node + 1) * node_bytes], "big")
        half = metadata.record_size
        if (packed[bit // 8] >> (7 - bit % 8)) & 1:
            node = whole & ((1 << half) - 1)
        elif half == 28:  # the left record's top four bits sit in the middle byte's high nibble
            node = ((whole >> 32) & 0xFFFFFF) | (((whole >> 24) & 0xF0) << 20)
        else:
            node = whole >> half
    assert node > metadata.node_count, f"{address} has no record"
    # The data section follows the tree and 16 zero bytes; a record value counts from the tree's end.
    return metadata.node_count * node_bytes + (node - metadata.node_count)


def database_with_a_broken_record(folder: Path) -> Path:
    """MaxMind's City test database with the record of ``LINKOPING`` made
    undecodable (its map's control byte turned into an extended type 247, which
    the format does not have) and every other byte as MaxMind wrote it."""
    database = bytearray(CITY_DB.read_bytes())
    with maxminddb.open_database(str(CITY_DB), maxminddb.MODE_MMAP_EXT) as reader:
        metadata = reader.metadata()
        assert reader.get(LINKOPING[0]) == reader.get(LINKOPING[1])
        assert reader.get(LINKOPING[0])["country"]["iso_code"] == "SE"  # type: ignore[index, call-overload]
    offsets = {record_offset(bytes(database), metadata, address) for address in LINKOPING}
    assert len(offsets) == 1, offsets
    (offset,) = offsets
    assert database[offset] >> 5 == 7, "not the start of a map"
    database[offset : offset + 2] = b"\x00\xf0"
    path = folder / "GeoIP2-City-Test-broken-record.mmdb"
    path.write_bytes(database)
    return path


def test_a_broken_record_is_answered_as_unknown_counted_and_logged_once(
    serve: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = database_with_a_broken_record(tmp_path)
    geo = GeoDatabase(path)  # the checks at open pass: no probe reads that record
    holder = PolicyHolder()
    holder.activate(policy_from(RULES), geo, "file:///rules.yaml")
    reader = InMemoryMetricReader()
    client = serve(holder, telemetry=Telemetry(holder, MeterProvider(metric_readers=[reader])))
    caplog.set_level(logging.WARNING, logger="pdp.geo")

    answer = client.check(LINKOPING[0], "m")
    assert (answer.verdict, answer.rule_id, answer.location.found) == (Verdict.ALLOW, "", False)
    assert answer.reason == "participant location unknown; policy default is allow"
    assert client.status().geoip_lookup_errors == 1
    points = metric_points(reader)
    assert [point.value for _, point in points["pdp.geoip.lookup_errors"]] == [1]
    assert client.check(GB, "m").location.country == "GB"  # the rest of the database serves

    client.check(LINKOPING[0], "m")  # from the cache: the record is not read again
    client.check(LINKOPING[1], "m")  # another address of that record: read, and counted
    assert client.status().geoip_lookup_errors == 2
    points = metric_points(reader)
    assert [point.value for _, point in points["pdp.geoip.lookup_errors"]] == [2]
    # A failed lookup is a miss like any other: hits + misses stay every located address.
    assert {a["result"]: p.value for a, p in points["pdp.geoip.cache"]} == {"hit": 1, "miss": 3}

    (warning,) = [record for record in caplog.records if record.name == "pdp.geo"]
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert str(path) in message
    assert format_build(geo.build_epoch) in message
    assert "location unknown" in message
    assert not any(address in message for address in LINKOPING)


def test_traces_carry_the_decision_and_never_an_address(serve: Any) -> None:
    holder = loaded_holder()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(holder, MeterProvider(), tracer=provider.get_tracer("test"))
    client = serve(holder, telemetry=telemetry)
    client.check(CN, "m", user_id="alice", account_id="acct-1")
    client.check_batch("m", [Participant(HK, "bob")])
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == ["pdp.v1.AdmissionService/Check", "pdp.v1.AdmissionService/CheckBatch"]
    check = dict(spans[0].attributes or {})
    assert (check["pdp.verdict"], check["pdp.rule_id"], check["pdp.policy_version"]) == ("DENY", "cn", 12)
    text = json.dumps([dict(span.attributes or {}) for span in spans])
    for secret in (CN, HK, "alice", "bob", "acct-1"):
        assert secret not in text


def test_a_refused_call_s_span_names_the_error_never_the_address(serve: Any) -> None:
    holder = loaded_holder()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client = serve(holder, telemetry=Telemetry(holder, MeterProvider(), tracer=provider.get_tracer("test")))
    refused = ("203.0.113.9:443", "[2001:db8::7]", "198.51.100.7:80")
    for address in refused[:2]:
        with pytest.raises(grpc.RpcError, match="without a port"):
            client.check(address, "m", user_id="alice")
    with pytest.raises(grpc.RpcError, match=r"participants\[1\]\.ip"):
        client.check_batch("m", [Participant(CN, "bob"), Participant(refused[2], "carol")])
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == ["pdp.v1.AdmissionService/Check"] * 2 + [
        "pdp.v1.AdmissionService/CheckBatch"
    ]
    recorded = json.dumps(
        [
            [dict(span.attributes or {}), span.status.description, [dict(e.attributes or {}) for e in span.events]]
            for span in spans
        ]
    )
    for secret in (*refused, "2001:db8::7", "203.0.113.9", CN, "alice", "bob", "carol"):
        assert secret not in recorded
    for span in spans:
        assert span.status.status_code is StatusCode.ERROR
        assert dict(span.attributes or {})["error.type"] == "RequestError"


def test_a_batch_tried_before_deciding_item_by_item_leaves_no_trace_when_refused() -> None:
    """AuthZEN tries a shared-meeting evaluations request as one batch and, refused,
    decides its items one by one, each observed: the refused try is neither timed as
    an error nor given a span. Decided, its span covers the decision."""
    holder = loaded_holder()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(holder, MeterProvider(metric_readers=[reader]), tracer=provider.get_tracer("test"))
    path = DecisionPath(holder, telemetry)
    meeting, endpoint = Meeting("m"), Endpoint("authzen", "access/v1", "evaluations")
    refused = [DecisionParticipant(CN), DecisionParticipant("not an address")]
    for observe_refusal in (False, True):
        with pytest.raises(RequestError, match=r"participants\[1\]\.ip"):
            path.check_batch(refused, meeting, 1, limit=10, endpoint=endpoint, present=encode_result,
                             observe_refusal=observe_refusal)  # fmt: skip
        assert len(exporter.get_finished_spans()) == int(observe_refusal)
    exporter.clear()
    deciding: list[int] = []

    def stamped(decision: Decision, location: Location, active: Active) -> bytes:
        deciding.append(time.time_ns())  # a moment inside the decision
        return encode_result(decision, location, active)

    batch = path.check_batch([DecisionParticipant(CN)], meeting, 1, limit=10, endpoint=endpoint,
                             present=stamped, observe_refusal=False)  # fmt: skip
    assert [decision.verdict for decision in batch.decisions] == [Verdict.DENY]
    (span,) = exporter.get_finished_spans()
    assert span.name == endpoint.span_name
    assert span.start_time is not None
    assert span.end_time is not None
    assert span.start_time <= deciding[0] <= span.end_time  # dated back to before the decision
    assert dict(span.attributes or {})["pdp.verdict"] == "DENY"
    exporter.clear()

    def broken(decision: Decision, location: Location, active: Active) -> bytes:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):  # no refusal: a failure, observed as such
        path.check_batch([DecisionParticipant(GB)], meeting, 1, limit=10, endpoint=endpoint,
                         present=broken, observe_refusal=False)  # fmt: skip
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "RuntimeError"
    durations = {a["verdict"]: p.count for a, p in metric_points(reader)["pdp.check.duration"]}
    assert durations == {"ERROR": 2, "DENY": 1}  # the refusal when asked to observe it, and the failure


def test_prometheus_endpoint_is_scraped_over_http(serve: Any) -> None:
    holder = loaded_holder()
    environ = {"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": "0"}
    telemetry, described = configure_from_environment(holder, environ)
    assert telemetry is not None
    try:
        client = serve(holder, telemetry=telemetry)
        client.check(CN, "m")
        (where,) = described
        url = where.removeprefix("metrics: ")
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310  # our own endpoint
            body = response.read().decode()
        assert 'pdp_decisions_total{jurisdiction="CN",mode="enforce",rule_id="cn",verdict="DENY"} 1.0' in body
        assert "pdp_check_duration_seconds_bucket" in body
        assert "pdp_policy_version 12.0" in body
    finally:
        telemetry.shutdown()


def test_exporter_configuration_errors_say_what_to_install() -> None:
    with pytest.raises(TelemetryError, match=r"pip install 'pdp\[otlp\]'"):
        _load("pdp_no_such_module.exporter", "OTLPMetricExporter", "otlp")
    with pytest.raises(TelemetryError, match="OTEL_METRICS_EXPORTER='jaeger'"):
        configure_from_environment(loaded_holder(), {"OTEL_METRICS_EXPORTER": "jaeger"})
    assert configure_from_environment(loaded_holder(), {}) == (None, [])
    assert configure_from_environment(loaded_holder(), {"OTEL_SDK_DISABLED": "true"}) == (None, [])


# --------------------------------------------------------------------------- audit log


@pytest.fixture
def hmac_key(tmp_path: Path) -> Path:
    path = tmp_path / "audit.key"
    path.write_bytes(b"0123456789abcdef0123456789abcdef")
    return path


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_deny_line_has_every_field_and_no_raw_ip(serve: Any, tmp_path: Path, hmac_key: Path) -> None:
    log = tmp_path / "audit.jsonl"
    audit = AuditLog(AuditConfig(str(log), str(hmac_key)))
    client = serve(loaded_holder(), audit=audit)
    client.check(CN, "m-1", user_id="alice", account_id="acct-1")
    client.check(HK, "m-1", user_id="bob", account_id="acct-2")  # ALLOW: not logged at sample rate 0
    client.check(GB, "m-2", user_id="carol", account_id="acct-3")  # ALLOW with a shadow match
    audit.close()
    deny, shadow = audit_lines(log)
    assert set(deny) == {
        "decision_id", "mode", "verdict", "rule_id", "legal_basis", "jurisdiction", "time", "action",
        "location", "meeting_id", "participant", "user", "policy_version", "geoip_build",
        "tags", "host_account", "policy_sha256", "allow_sample_rate", "hmac_key_id",
    }  # fmt: skip
    assert (deny["verdict"], deny["rule_id"], deny["legal_basis"], deny["jurisdiction"]) == (
        "DENY", "cn", "Order 17/2020", ["CN"],
    )  # fmt: skip
    assert deny["location"] == {"country": "CN", "subdivisions": ["CN-22"]}
    assert (deny["meeting_id"], deny["action"], deny["policy_version"]) == ("m-1", "join", 12)
    assert deny["participant"] == pseudonym(hmac_key.read_bytes(), "acct-1")
    assert deny["user"] == pseudonym(hmac_key.read_bytes(), "alice")
    assert (shadow["mode"], shadow["verdict"], shadow["rule_id"]) == ("shadow", "DENY", "gb-draft")
    text = log.read_text()
    for raw in (CN, GB, "alice", "acct-1", "carol"):
        assert raw not in text


def test_raw_ip_only_when_opted_in_and_allows_sampled(serve: Any, tmp_path: Path, hmac_key: Path) -> None:
    log = tmp_path / "audit.jsonl"
    audit = AuditLog(AuditConfig(str(log), str(hmac_key), allow_sample_rate=1.0, include_ip=True))
    client = serve(loaded_holder(), audit=audit)
    client.check(CN, "m")
    client.check(HK, "m")
    audit.close()
    lines = audit_lines(log)
    assert [(line["verdict"], line["ip"]) for line in lines] == [("DENY", CN), ("ALLOW", HK)]


def test_pseudonyms_are_stable_per_key_and_differ_across_keys() -> None:
    key_a, key_b = b"a" * 32, b"b" * 32
    assert pseudonym(key_a, "acct-1") == pseudonym(key_a, "acct-1")
    assert pseudonym(key_a, "acct-1") != pseudonym(key_b, "acct-1")
    assert pseudonym(key_a, "acct-1") != pseudonym(key_a, "acct-2")
    assert pseudonym(key_a, "") == ""


def test_full_queue_drops_and_counts_but_never_fails_a_check(serve: Any, tmp_path: Path, hmac_key: Path) -> None:
    # A pipe nobody reads: the writer blocks once the kernel buffer is full, as on a stuck disk.
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    audit = AuditLog(AuditConfig(str(fifo), str(hmac_key), queue_size=2))
    client = serve(loaded_holder(), audit=audit)
    results = [client.check(CN, "m").verdict for _ in range(600)]
    assert results == [Verdict.DENY] * 600
    assert audit.dropped > 0
    assert audit.written + audit.dropped <= 600

    def drain() -> None:
        os.set_blocking(reader, True)
        while os.read(reader, 65536):  # until the writer end closes
            pass

    drainer = threading.Thread(target=drain)
    drainer.start()
    audit.close()
    drainer.join(timeout=30)
    os.close(reader)


def test_a_full_disk_drops_and_counts_records_and_the_writer_lives_on(
    serve: Any, tmp_path: Path, hmac_key: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """/dev/full fails every write with ENOSPC, as a full disk does. The writer must
    keep taking records (each one it cannot write counted dropped, in
    pdp.audit.records) and say so once; before, its first failed flush ended it, and
    every record after it stayed queued until the queue was full."""
    holder = loaded_holder()
    reader = InMemoryMetricReader()
    audit = AuditLog(AuditConfig("/dev/full", str(hmac_key), queue_size=100_000))
    audit.instrument(MeterProvider(metric_readers=[reader]).get_meter("pdp.audit"))
    client = serve(holder, audit=audit)
    for _ in range(300):
        client.check(CN, "m")
    deadline = time.monotonic() + 30
    while audit.written + audit.dropped < 300:  # the first round taken: the writer has met the full disk
        assert time.monotonic() < deadline, f"{audit.written + audit.dropped} of 300 records taken"
        time.sleep(0.01)  # the writer's own counts, which nothing signals
    for _ in range(300):
        client.check(CN, "m")
    audit.close()  # writes (or drops) what is queued, if the writer still runs
    assert audit.written + audit.dropped == 600
    assert audit.dropped > 0
    counts = {a["result"]: p.value for a, p in metric_points(reader)["pdp.audit.records"]}
    assert counts == {"written": audit.written, "dropped": audit.dropped}
    warnings = [r.getMessage() for r in caplog.records if r.name == "pdp.audit" and r.levelname == "WARNING"]
    # Said when it starts failing, not for every failed flush; and, at close, what the buffer still held.
    assert warnings[0].startswith("audit log /dev/full: No space left on device; records are dropped"), warnings
    assert all(first != second for first, second in itertools.pairwise(warnings)), warnings
    assert len(warnings) < 10, warnings


def test_size_rotation_keeps_old_files(serve: Any, tmp_path: Path, hmac_key: Path) -> None:
    log = tmp_path / "audit.jsonl"
    audit = AuditLog(AuditConfig(str(log), str(hmac_key), max_bytes=2000, backups=2))
    client = serve(loaded_holder(), audit=audit)
    for _ in range(30):
        client.check(CN, "m")
    audit.close()
    rotated = sorted(path.name for path in tmp_path.glob("audit.jsonl*"))
    assert rotated == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(path.stat().st_size <= 2000 for path in tmp_path.glob("audit.jsonl*"))


def test_audit_needs_a_real_key(tmp_path: Path) -> None:
    from pdp.audit import AuditError

    short = tmp_path / "short.key"
    short.write_bytes(b"tiny")
    with pytest.raises(AuditError, match="at least 16 bytes"):
        AuditLog(AuditConfig(str(tmp_path / "a.jsonl"), str(short)))
    with pytest.raises(AuditError, match=r"absent\.key"):
        AuditLog(AuditConfig(str(tmp_path / "a.jsonl"), str(tmp_path / "absent.key")))


# --------------------------------------------------------------------------- lifecycle logs


def test_lifecycle_logs_are_json_and_mask_secrets() -> None:
    import logging

    record = logging.LogRecord("pdp", logging.INFO, __file__, 1, "activated version %d", (3,), None)
    document = json.loads(JsonFormatter().format(record))
    assert (document["level"], document["logger"], document["message"]) == ("info", "pdp", "activated version 3")
    assert redact_url("redis://pdp:hunter2@redis:6379/0?key=k") == "redis://pdp:***@redis:6379/0?key=k"
    assert redact_url("https://store/rules") == "https://store/rules"
    described = describe(ServeConfig(snapshot="redis://:hunter2@redis:6379/0"))
    assert "hunter2" not in json.dumps(described)
