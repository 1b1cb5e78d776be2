"""The real gRPC server on a Unix socket, driven by the real client."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from pdp._proto import admission_pb2 as pb
from pdp._proto import admission_pb2_grpc as pb_grpc
from pdp.client import Participant
from pdp.geo import GeoDatabase
from pdp.model import Action, Location, Verdict
from pdp.server import SERVICE_NAME

from .conftest import CITY_DB, ServerFactory, policy_from

ACCEPTANCE_RULES = """
version: 11
rules:
  - {id: cn, effect: deny, jurisdiction: [CN], legal_basis: Order 17/2020, reason: not in CN}
  - {id: us-wa, effect: deny, jurisdiction: [US-WA], legal_basis: WA statute}
  - {id: gb-shadow, effect: deny, jurisdiction: [GB], mode: shadow, legal_basis: draft}
"""


@pytest.mark.parametrize(
    ("address", "verdict", "rule_id", "country"),
    [
        ("175.16.199.1", Verdict.DENY, "cn", "CN"),
        ("2001:250::1", Verdict.DENY, "cn", "CN"),
        ("2001:2e0::1", Verdict.ALLOW, "", "HK"),
        ("81.2.69.143", Verdict.ALLOW, "", "GB"),
        ("216.160.83.57", Verdict.DENY, "us-wa", "US"),
        ("2001:480:10::1", Verdict.ALLOW, "", "US"),
        ("::ffff:81.2.69.142", Verdict.ALLOW, "", "GB"),
        ("10.1.2.3", Verdict.ALLOW, "", ""),
    ],
)
def test_check_acceptance_cases(
    start: ServerFactory, address: str, verdict: Verdict, rule_id: str, country: str
) -> None:
    _, _, client = start(ACCEPTANCE_RULES)
    result = client.check(address, "m-1")
    assert (result.verdict, result.rule_id, result.location.country) == (verdict, rule_id, country)
    assert result.policy_version == 11
    assert result.geoip_build == GeoDatabase(CITY_DB).build_epoch


def test_deny_response_is_fully_explained(start: ServerFactory) -> None:
    _, _, client = start(ACCEPTANCE_RULES)
    result = client.check("175.16.199.1", "m-1", user_id="u", account_id="a")
    assert result.verdict == Verdict.DENY
    assert (result.rule_id, result.reason, result.legal_basis) == ("cn", "not in CN", "Order 17/2020")
    assert result.location == Location("CN", ("CN-22",))
    gb = client.check("81.2.69.143", "m-1")
    assert (gb.verdict, gb.shadow_rule_ids) == (Verdict.ALLOW, ("gb-shadow",))


@pytest.mark.parametrize("default", ["allow", "deny"])
def test_unknown_location_default_over_grpc(start: ServerFactory, default: str) -> None:
    _, _, client = start(f"version: 1\ndefaults: {{unknown_location: {default}}}\nrules: []\n")
    assert client.check("192.168.1.1", "m").verdict == Verdict[default.upper()]
    # 1.1.1.1 is in no network of the test database: no record at all.
    assert client.check("1.1.1.1", "m").verdict == Verdict[default.upper()]


def test_meeting_tags_and_host_action_reach_the_rules(start: ServerFactory) -> None:
    _, _, client = start("""
version: 1
rules:
  - {id: memorial, effect: deny, jurisdiction: [CN], legal_basis: x, meetings: {tags: [memorial]}, actions: [join]}
  - {id: hosting, effect: deny, jurisdiction: [GB], legal_basis: y, actions: [host]}
  - {id: acme, effect: allow, jurisdiction: [CN], priority: 5, meetings: {host_accounts: [acme]}}
""")
    assert client.check("175.16.199.1", "m", tags=["memorial"]).rule_id == "memorial"
    assert client.check("175.16.199.1", "m", tags=["other"]).verdict == Verdict.ALLOW
    assert client.check("175.16.199.1", "m", tags=["memorial"], host_account_id="acme").rule_id == "acme"
    assert client.check("81.2.69.143", "m", action=Action.HOST).rule_id == "hosting"
    assert client.check("81.2.69.143", "m", action=Action.JOIN).verdict == Verdict.ALLOW


def test_check_batch_keeps_order_and_one_policy(start: ServerFactory) -> None:
    _, _, client = start(ACCEPTANCE_RULES)
    addresses = ["175.16.199.1", "2001:2e0::1", "216.160.83.57", "81.2.69.143"]
    results = client.check_batch("m-1", [*addresses[:2], Participant(addresses[2], "u"), addresses[3]])
    assert [r.verdict for r in results] == [Verdict.DENY, Verdict.ALLOW, Verdict.DENY, Verdict.ALLOW]
    assert [r.location.country for r in results] == ["CN", "HK", "US", "GB"]
    assert {r.policy_version for r in results} == {11}


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert isinstance(error, grpc.Call)
    return error.code(), error.details() or ""


@pytest.mark.parametrize(
    ("address", "detail"),
    [
        ("", "participant.ip: required"),
        ("1.2.3", "participant.ip: '1.2.3' is not an IPv4 or IPv6 address"),
        ("::g", "participant.ip: '::g' is not"),
        ("1.2.3.4:80", "participant.ip: '1.2.3.4:80': send the address alone, without a port"),
        ("fe80::1%eth0", "participant.ip: 'fe80::1%eth0': zone indexes are not accepted"),
    ],
)
def test_bad_addresses_are_invalid_argument(start: ServerFactory, address: str, detail: str) -> None:
    _, _, client = start()
    code, details = code_of(lambda: client.check(address, "m"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(detail)


def test_bad_requests_name_their_field(start: ServerFactory) -> None:
    running, _, client = start(batch_limit=3)
    stub = pb_grpc.AdmissionServiceStub(grpc.insecure_channel(running.address))
    participant = pb.Participant(ip="81.2.69.142")
    cases = {
        "meeting.meeting_id: required": lambda: client.check("81.2.69.142", ""),
        "action: 7 is not ACTION_JOIN (1) or ACTION_HOST (2)": lambda: stub.Check(
            pb.CheckRequest(participant=participant, meeting=pb.Meeting(meeting_id="m"), action=7)  # type: ignore[arg-type]
        ),
        "action: 0 is not ACTION_JOIN": lambda: stub.Check(
            pb.CheckRequest(participant=participant, meeting=pb.Meeting(meeting_id="m"))
        ),
        "participants: 0 given, between 1 and 3 accepted": lambda: client.check_batch("m", []),
        "participants: 4 given, between 1 and 3 accepted": lambda: client.check_batch("m", ["81.2.69.142"] * 4),
        "participants[1].ip: '1.2.3' is not": lambda: client.check_batch("m", ["81.2.69.142", "1.2.3"]),
        "meeting.meeting_id: required ": lambda: client.check_batch("", ["81.2.69.142"]),
    }
    for expected, call in cases.items():
        code, details = code_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, expected
        assert details.startswith(expected.strip()), (expected, details)


def test_oversize_request_is_resource_exhausted(start: ServerFactory) -> None:
    _, _, client = start(max_message_bytes=2048)
    code, _ = code_of(lambda: client.check("81.2.69.142", "m", tags=["x" * 4096]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.check("81.2.69.142", "m", tags=["x" * 100]).verdict == Verdict.ALLOW


def health_of(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        response: health_pb2.HealthCheckResponse = check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(response.status)


def test_health_is_not_serving_until_loaded(start: ServerFactory) -> None:
    running, holder, client = start(loaded=False)
    assert health_of(running.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health_of(running.address, SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
    code, details = code_of(lambda: client.check("81.2.69.142", "m"))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "no policy" in details
    assert not client.status().serving

    holder.activate(policy_from("version: 3\nrules: []\n"), GeoDatabase(CITY_DB), "late.yaml")
    assert health_of(running.address) == health_pb2.HealthCheckResponse.SERVING
    assert health_of(running.address, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    assert client.check("81.2.69.142", "m").policy_version == 3


def test_graceful_stop_reports_not_serving(start: ServerFactory) -> None:
    running, _, client = start()
    assert health_of(running.address) == health_pb2.HealthCheckResponse.SERVING
    running.health.enter_graceful_shutdown()
    assert health_of(running.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    running.server.stop(grace=1).wait()
    code, _ = code_of(lambda: client.check("81.2.69.142", "m", timeout=1))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_reflection_lists_the_services(start: ServerFactory) -> None:
    running, _, _ = start()
    with grpc.insecure_channel(running.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"pdp.v1.AdmissionService", "grpc.health.v1.Health"} <= services


def test_status_reports_policy_database_and_cache(start: ServerFactory) -> None:
    _, _, client = start(ACCEPTANCE_RULES, cache_size=50)
    client.check("81.2.69.142", "m")
    client.check("81.2.69.142", "m")
    status = client.status()
    assert status.serving
    assert (status.policy_version, status.rule_count, status.policy_source) == (11, 3, "test.yaml")
    assert len(status.policy_sha256) == 64
    assert (status.geoip_type, status.geoip_path) == ("GeoIP2-City", str(CITY_DB))
    assert (status.cache_size, status.cache_capacity, status.cache_hits, status.cache_misses) == (1, 50, 1, 1)
    assert status.policy_activated_at.seconds > 0


def test_watch_policy_streams_each_activation(start: ServerFactory) -> None:
    running, holder, _ = start("version: 1\nrules: []\n")
    channel = grpc.insecure_channel(running.address)
    stream = pb_grpc.AdmissionServiceStub(channel).WatchPolicy(pb.WatchPolicyRequest(), timeout=10)
    first = next(stream)
    assert first.policy_version == 1
    assert first.geoip_build == GeoDatabase(CITY_DB).build_epoch
    active = holder.active
    assert active is not None
    holder.activate_policy(policy_from("version: 2\nrules: []\n"), "v2.yaml")
    assert next(stream).policy_version == 2
    stream.cancel()
    channel.close()


def test_watchers_are_capped_so_checks_keep_threads(start: ServerFactory) -> None:
    running, _, client = start(workers=2)
    channel = grpc.insecure_channel(running.address)
    stub = pb_grpc.AdmissionServiceStub(channel)
    first = stub.WatchPolicy(pb.WatchPolicyRequest(), timeout=10)
    next(first)
    second = stub.WatchPolicy(pb.WatchPolicyRequest(), timeout=10)
    code, details = code_of(lambda: next(second))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "WatchPolicy streams open" in details
    assert client.check("81.2.69.142", "m").verdict == Verdict.ALLOW
    first.cancel()
    channel.close()


def test_policy_swap_under_concurrent_checks_is_never_torn(start: ServerFactory) -> None:
    flip = "version: {v}\nrules:\n  - {{id: r{v}, effect: {e}, jurisdiction: [CN], legal_basis: x, priority: 1}}\n"
    _, holder, client = start(flip.format(v=0, e="allow"))
    failures: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        calls = 0
        while not stop.is_set() or calls < 20:
            calls += 1
            result = client.check("175.16.199.1", "m")
            expected = Verdict.DENY if result.policy_version % 2 else Verdict.ALLOW
            if result.verdict != expected or result.rule_id != f"r{result.policy_version}":
                failures.append(f"{result}")

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in threads:
        thread.start()
    for version in range(1, 41):
        holder.activate_policy(policy_from(flip.format(v=version, e="deny" if version % 2 else "allow")), "flip")
    stop.set()
    for thread in threads:
        thread.join()
    assert failures == []


def test_health_listen_serves_only_health(start: ServerFactory) -> None:
    running, _, _ = start(health_listen="127.0.0.1:0")
    assert running.health_address.startswith("127.0.0.1:")
    assert health_of(running.health_address) == health_pb2.HealthCheckResponse.SERVING
    stub = pb_grpc.AdmissionServiceStub(grpc.insecure_channel(running.health_address))
    request = pb.CheckRequest(participant=pb.Participant(ip="81.2.69.142"), meeting=pb.Meeting(meeting_id="m"))
    code, _ = code_of(lambda: stub.Check(request, timeout=5))
    assert code == grpc.StatusCode.UNIMPLEMENTED
