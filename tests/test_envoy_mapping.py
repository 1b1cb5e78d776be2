"""Envoy ext_authz without Envoy: the request mapping, its settings, the answers and the examples.

Requests are real ``envoy.service.auth.v3`` messages from xds-protos, built the
way Envoy fills them; tests/test_envoy.py runs the same paths behind a real Envoy.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2 as ext
from google.protobuf import struct_pb2

from pdp._proto import admission_pb2 as pb
from pdp.cli import build_parser
from pdp.config import ConfigError, resolve
from pdp.envoy.answer import AnswerCache, allow, bad_request, deny
from pdp.envoy.mapping import HttpAdmission, Mapper, MappingError, parse_source
from pdp.envoy.servicer import mapper_from
from pdp.geo import GeoDatabase
from pdp.model import Action, Decision, Location, Verdict
from pdp.state import PolicyHolder

from .conftest import ROOT, ServerFactory, policy_from
from .envoyproxy import envoy_binary, render_config

EXAMPLES = ROOT / "examples" / "envoy"
DEFAULT = {"meeting_id": "context:meeting_id", "tags": "context:tags", "host_account_id": "context:host_account_id",
           "action": "context:action"}  # fmt: skip


def request(
    *,
    peer: str = "81.2.69.142",
    headers: dict[str, str] | None = None,
    context: dict[str, str] | None = None,
    path: str = "/memorial/join",
    claims: dict[str, Any] | None = None,
    payload_key: str = "jwt_payload",
) -> Any:
    """An AttributeContext as Envoy sends it (header names in lower case)."""
    check = ext.CheckRequest()
    attributes = check.attributes
    attributes.source.address.socket_address.address = peer
    attributes.source.address.socket_address.port_value = 40000
    attributes.request.http.path = path
    attributes.request.http.headers.update(headers or {})
    attributes.context_extensions.update({"meeting_id": "m-1"} if context is None else context)
    if claims is not None:
        payload = struct_pb2.Struct()
        payload.update({payload_key: claims})
        attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(payload)
    return attributes


# --------------------------------------------------------------------------- sources


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("meeting_id", "is not context:KEY"),
        ("query:room", "is not context:KEY"),
        ("context:", "needs a name"),
        ("path:", "needs a regex"),
        ("claim:video..room", "empty segment"),
        ("header:x pdp", "not a request header name"),
        ("header:x-pdp-tags", "x-pdp-* are pdp's own"),
        ("header::authority", "not a request header name"),
        ("path:/rooms/([^/]+)", "exactly one named group"),
        ("path:/(?P<a>x)/(?P<b>y)", "exactly one named group"),
        ("path:/rooms/(?P<room>[", "not a regular expression"),
    ],
)
def test_a_bad_source_is_refused_naming_why(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_source(text)


def test_header_names_are_case_insensitive() -> None:
    assert parse_source("header:X-Meeting-Tags") == "header:x-meeting-tags"


# --------------------------------------------------------------------------- settings


def test_a_header_source_needs_the_header_declared_trusted() -> None:
    with pytest.raises(
        ConfigError, match="--ext-authz-tags: header:x-meeting-tags reads a header the client may write"
    ):
        resolve({"ext_authz_tags": "header:X-Meeting-Tags"}, {})
    config = resolve({"ext_authz_tags": "header:X-Meeting-Tags"}, {"PDP_EXT_AUTHZ_TRUSTED_HEADERS": "X-Meeting-Tags"})
    assert (config.ext_authz_tags, config.ext_authz_trusted_headers) == ("header:x-meeting-tags", "x-meeting-tags")


@pytest.mark.parametrize(
    ("flags", "environ", "words"),
    [
        ({"ext_authz_xff_trusted_hops": "-1"}, {}, "--ext-authz-xff-trusted-hops: -1 is outside 0..32"),
        ({}, {"PDP_EXT_AUTHZ_XFF_TRUSTED_HOPS": "two"}, "environment variable PDP_EXT_AUTHZ_XFF_TRUSTED_HOPS"),
        ({"ext_authz_required": "meeting_id,room"}, {}, "room: not one of meeting_id"),
        ({"ext_authz_required": "user_id"}, {}, "--ext-authz-required: user_id has no source"),
        ({"ext_authz_meeting_id": ""}, {}, "--ext-authz-meeting-id"),
        ({"ext_authz_jwt_payload_key": " "}, {}, "must not be empty"),
        ({"ext_authz_trusted_headers": "x-pdp-verdict"}, {}, "pdp's own"),
    ],
)
def test_bad_ext_authz_settings_are_refused(flags: dict[str, str], environ: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        resolve(flags, environ)


def test_the_config_file_carries_the_mapping(tmp_path: Path) -> None:
    path = tmp_path / "pdp.yaml"
    path.write_text("ext-authz-meeting-id: 'path:^/rtc/rooms/(?P<room>[^/]+)'\next_authz_xff_trusted_hops: 2\n")
    config = resolve({"config": str(path)}, {})
    assert config.ext_authz_meeting_id == "path:^/rtc/rooms/(?P<room>[^/]+)"
    assert config.ext_authz_xff_trusted_hops == 2
    path.write_text("ext_authz_meeting_id: 'path:(['\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}:1: ext_authz_meeting_id"):
        resolve({"config": str(path)}, {})


# --------------------------------------------------------------------------- the mapping


def test_defaults_read_the_route_context_and_the_peer() -> None:
    mapper = mapper_from(resolve({}, {}))
    context = {"meeting_id": "m-1", "tags": " memorial, public ,,", "host_account_id": "acct-9", "action": "host"}
    admission = mapper.map(request(context=context, headers={"x-forwarded-for": "175.16.199.1"}))
    assert admission == HttpAdmission("81.2.69.142", "m-1", "acct-9", ("memorial", "public"), Action.HOST)
    assert mapper.map(request()).action == Action.JOIN  # absent means join


@pytest.mark.parametrize(
    ("forwarded", "hops", "expected"),
    [("175.16.199.1", 1, "175.16.199.1"), ("9.9.9.9, 175.16.199.1", 1, "175.16.199.1"),
     ("9.9.9.9 ,175.16.199.1,  10.0.0.1", 2, "175.16.199.1"), ("2001:2e0::1, 10.0.0.1", 2, "2001:2e0::1")],
)  # fmt: skip
def test_the_nth_address_from_the_right_of_x_forwarded_for(forwarded: str, hops: int, expected: str) -> None:
    mapper = Mapper(DEFAULT, xff_trusted_hops=hops)
    assert mapper.map(request(headers={"x-forwarded-for": forwarded})).ip == expected


@pytest.mark.parametrize("forwarded", ["", "   ", "175.16.199.1"])
def test_fewer_addresses_than_trusted_hops_is_an_error_naming_the_address(forwarded: str) -> None:
    with pytest.raises(MappingError, match="x-forwarded-for holds") as raised:
        Mapper(DEFAULT, xff_trusted_hops=2).map(request(headers={"x-forwarded-for": forwarded}))
    assert raised.value.attribute == "participant.ip"


def test_a_peer_without_an_ip_address_is_an_error() -> None:
    attributes = request()
    attributes.source.address.pipe.path = "/run/envoy.sock"
    with pytest.raises(MappingError, match="has no IP address"):
        Mapper(DEFAULT).map(attributes)


def test_path_sources_match_the_path_without_query_and_decode_it() -> None:
    mapper = Mapper({"meeting_id": r"path:^/rtc/rooms/(?P<room>[^/]+)"})
    assert mapper.map(request(path="/rtc/rooms/r-17/join?room=other")).meeting_id == "r-17"
    # The meeting node decodes %6D as m: so does pdp, or a rule naming the room would be evaded.
    assert mapper.map(request(path="/rtc/rooms/%6Demorial-7")).meeting_id == "memorial-7"
    with pytest.raises(MappingError, match="meeting_id: required"):
        mapper.map(request(path="/rtc/lobby?x=/rtc/rooms/r-17"))
    with pytest.raises(MappingError, match="meeting_id: path:") as raised:
        mapper.map(request(path="/rtc/rooms/%ff%fe"))
    assert raised.value.attribute == "meeting_id"


def test_claims_are_read_from_the_verified_payload() -> None:
    claims = {"sub": "user-1", "video": {"room": "r-17", "roomAdmin": True}, "pdp": {"tags": ["memorial", "x"],
              "host_account": 4711, "weight": 1.5, "nested": {"a": 1}, "mixed": ["a", 1]}}  # fmt: skip
    sources = {"meeting_id": "claim:video.room", "tags": "claim:pdp.tags", "host_account_id": "claim:pdp.host_account",
               "user_id": "claim:sub"}  # fmt: skip
    admission = Mapper(sources).map(request(claims=claims))
    assert admission == HttpAdmission("81.2.69.142", "r-17", "4711", ("memorial", "x"), user_id="user-1")
    for path in ("pdp.weight", "pdp.nested", "pdp.mixed"):
        with pytest.raises(MappingError, match="claim is not a text"):
            Mapper({**sources, "account_id": f"claim:{path}"}).map(request(claims=claims))
    with pytest.raises(MappingError, match="a list where one value was expected"):
        Mapper({"meeting_id": "claim:pdp.tags"}).map(request(claims=claims))
    # Another provider's payload key, or no token at all: the room is missing.
    for attributes in (request(claims=claims, payload_key="other"), request()):
        with pytest.raises(MappingError, match=r"meeting_id: required, and claim:video\.room gave nothing"):
            Mapper(sources).map(attributes)


def test_a_bad_action_and_a_missing_required_attribute_are_errors() -> None:
    with pytest.raises(MappingError, match="'admin' is not join or host"):
        Mapper(DEFAULT).map(request(context={"meeting_id": "m", "action": "admin"}))
    with pytest.raises(MappingError, match="tags: required, and context:tags gave nothing"):
        Mapper(DEFAULT, required=["tags"]).map(request(context={"meeting_id": "m", "tags": " , "}))
    with pytest.raises(ValueError, match="required but given no source: user_id"):
        Mapper(DEFAULT, required=["user_id"])


def test_only_declared_sources_are_read() -> None:
    """A client writes every header: none is read unless a source names it."""
    headers = {"x-meeting-tags": "weekly", "tags": "weekly", "x-forwarded-for": "1.2.3.4", "meeting_id": "m-2"}
    admission = Mapper(DEFAULT).map(request(headers=headers, context={"meeting_id": "m-1", "tags": "memorial"}))
    assert (admission.ip, admission.meeting_id, admission.tags) == ("81.2.69.142", "m-1", ("memorial",))
    trusted = Mapper({**DEFAULT, "tags": "header:x-meeting-tags"})
    assert trusted.map(request(headers=headers)).tags == ("weekly",)


# --------------------------------------------------------------------------- answers


@pytest.fixture
def active(city_db: GeoDatabase) -> Any:
    holder = PolicyHolder()
    return holder.activate(policy_from("version: 3\nrules: []\n"), city_db, "test")


def test_allow_overwrites_its_own_headers_and_removes_other_client_sent_ones(active: Any) -> None:
    decision = Decision(Verdict.ALLOW, shadow_rule_ids=("watch",))
    sent = ["x-pdp-verdict", "x-pdp-country", "x-pdp-admin", "x-pdp-shadow-rules"]
    response = ext.CheckResponse.FromString(allow(decision, Location("HK"), active, sent))
    assert response.status.code == 0
    set_headers = {option.header.key: option.header.value for option in response.ok_response.headers}
    assert set_headers == {"x-pdp-verdict": "ALLOW", "x-pdp-policy-version": "3", "x-pdp-country": "HK",
                           "x-pdp-shadow-rules": "watch"}  # fmt: skip
    assert {option.append_action for option in response.ok_response.headers} == {2}  # OVERWRITE_IF_EXISTS_OR_ADD
    # Envoy removes after it sets: a header pdp sets must never be in this list.
    assert list(response.ok_response.headers_to_remove) == ["x-pdp-admin"]
    unknown = ext.CheckResponse.FromString(allow(Decision(Verdict.ALLOW), Location(), active, sent))
    assert "x-pdp-country" not in {option.header.key for option in unknown.ok_response.headers}
    assert sorted(unknown.ok_response.headers_to_remove) == ["x-pdp-admin", "x-pdp-country", "x-pdp-shadow-rules"]


def test_deny_is_403_with_the_fields_of_check_response(active: Any) -> None:
    decision = Decision(Verdict.DENY, "cn-memorial", "closed", "Order 17/2020")
    response = ext.CheckResponse.FromString(deny(decision, Location("CN", ("CN-JL",)), active))
    assert (response.status.code, response.denied_response.status.code) == (7, 403)
    headers = {option.header.key: option.header.value for option in response.denied_response.headers}
    assert headers == {"x-pdp-rule-id": "cn-memorial", "content-type": "application/json"}
    body = yaml.safe_load(response.denied_response.body)
    assert set(body) == set(pb.CheckResponse.DESCRIPTOR.fields_by_name)
    assert set(body["location"]) == set(pb.Location.DESCRIPTOR.fields_by_name)
    assert (body["rule_id"], body["legal_basis"], body["policy_version"]) == ("cn-memorial", "Order 17/2020", 3)


def test_bad_request_is_400_naming_the_field() -> None:
    response = ext.CheckResponse.FromString(bad_request("meeting_id", "required"))
    assert (response.status.code, response.denied_response.status.code) == (3, 400)
    assert yaml.safe_load(response.denied_response.body)["field"] == "meeting_id"


def test_cached_answers_follow_the_active_state(city_db: GeoDatabase) -> None:
    holder = PolicyHolder()
    first = holder.activate(policy_from("version: 1\nrules: []\n"), city_db, "a")
    cache, decision, location = AnswerCache(), Decision(Verdict.ALLOW), Location("HK")
    assert cache.answer(decision, location, first) is cache.answer(decision, location, first)
    second = holder.activate(policy_from("version: 2\nrules: []\n"), city_db, "b")
    headers = ext.CheckResponse.FromString(cache.answer(decision, location, second)).ok_response.headers
    assert {option.header.key: option.header.value for option in headers}["x-pdp-policy-version"] == "2"


# --------------------------------------------------------------------------- examples


def test_the_committed_envoy_example_is_the_rendered_template() -> None:
    assert (EXAMPLES / "envoy.yaml").read_text() == render_config(), "run: python examples/envoy/render.py > ..."


def test_envoy_accepts_the_example(tmp_path: Path) -> None:
    completed = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(EXAMPLES / "envoy.yaml"), "--disable-hot-restart",
         "-l", "warning"], capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr


def _pdp_args(text: str) -> list[str]:
    """The `pdp serve ...` command written in a YAML file's leading comment."""
    lines, started = [], False
    for line in text.splitlines():
        body = line.removeprefix("#").strip()
        if body.startswith("pdp serve"):
            started = True
        if started:
            lines.append(body.rstrip("\\").strip())
            if not body.endswith("\\"):
                break
    return shlex.split(" ".join(lines))[1:]


@pytest.mark.parametrize("name", ["envoy.yaml", "istio.yaml"])
def test_the_examples_pdp_command_is_valid(name: str) -> None:
    args = _pdp_args((EXAMPLES / name).read_text())
    options = build_parser().parse_args(args)
    config = resolve(vars(options), {})
    assert config.ext_authz_xff_trusted_hops >= 1


def test_the_istio_example_hangs_together() -> None:
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all((EXAMPLES / "istio.yaml").read_text()) if doc}
    (provider,) = documents["IstioOperator"]["spec"]["meshConfig"]["extensionProviders"]
    grpc_provider = provider["envoyExtAuthzGrpc"]
    assert grpc_provider["failOpen"] is False
    policy = documents["AuthorizationPolicy"]["spec"]
    assert (policy["action"], policy["provider"]["name"]) == ("CUSTOM", provider["name"])
    entry = documents["ServiceEntry"]["spec"]
    assert grpc_provider["service"] in entry["hosts"]
    assert [port["number"] for port in entry["ports"]] == [grpc_provider["port"]]
    assert entry["endpoints"] == [{"address": "127.0.0.1"}]
    args = _pdp_args((EXAMPLES / "istio.yaml").read_text())
    config = resolve(vars(build_parser().parse_args(args)), {})
    assert config.listen == f"127.0.0.1:{grpc_provider['port']}"
    (rule,) = documents["RequestAuthentication"]["spec"]["jwtRules"]
    assert config.ext_authz_jwt_payload_key == rule["issuer"]  # Istio's payload_in_metadata is the issuer
    topology = documents["IstioOperator"]["spec"]["meshConfig"]["defaultConfig"]["gatewayTopology"]
    assert config.ext_authz_xff_trusted_hops == topology["numTrustedProxies"] + 1


# --------------------------------------------------------------------------- the gRPC method, as Envoy calls it

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"


def _call(address: str, payload: bytes) -> Any:
    with grpc.insecure_channel(address) as channel:
        method: Any = channel.unary_unary(CHECK_METHOD, request_serializer=None, response_deserializer=None)
        return ext.CheckResponse.FromString(method(payload, timeout=5))


def test_served_next_to_admission_service_and_listed_by_reflection(start: ServerFactory) -> None:
    running, _, _ = start()
    context = {"meeting_id": "m", "tags": "memorial", "host_account_id": "a"}
    answer = _call(running.address, ext.CheckRequest(attributes=request(context=context)).SerializeToString())
    assert answer.status.code == 0  # 81.2.69.142 is in GB: no rule applies
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(running.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"pdp.v1.AdmissionService", "envoy.service.auth.v3.Authorization"} <= services


@pytest.mark.parametrize(
    ("attributes", "field"),
    [
        (request(context={}), "meeting_id"),
        (request(context={"meeting_id": "m", "tags": ",".join(f"t{n}" for n in range(65))}), "meeting.tags"),
        (request(context={"meeting_id": "m" * 257}), "meeting.meeting_id"),
        (request(peer="fe80::1%eth0", context={"meeting_id": "m"}), "participant.ip"),
    ],
)
def test_what_cannot_be_decided_is_a_400_never_an_allow(start: ServerFactory, attributes: Any, field: str) -> None:
    running, _, _ = start()
    answer = _call(running.address, ext.CheckRequest(attributes=attributes).SerializeToString())
    assert (answer.status.code, answer.denied_response.status.code) == (3, 400)
    assert json.loads(answer.denied_response.body)["field"] == field
    assert not answer.HasField("ok_response")


def test_garbage_is_invalid_argument_and_no_policy_is_unavailable(start: ServerFactory) -> None:
    running, _, _ = start()
    with pytest.raises(grpc.RpcError) as raised:
        _call(running.address, b"\xff\xff\xff")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    waiting, _, _ = start(loaded=False)
    with pytest.raises(grpc.RpcError) as raised:
        _call(waiting.address, ext.CheckRequest(attributes=request()).SerializeToString())
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # Envoy's status_on_error decides


def test_envoy_checks_are_counted_under_their_own_rpc_refused_ones_as_errors(tmp_path: Path) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from pdp.config import ServeConfig
    from pdp.server import start_server
    from pdp.telemetry import Telemetry

    from .conftest import CITY_DB

    holder = PolicyHolder()
    holder.activate(policy_from("version: 1\nrules: [{id: cn, effect: deny, jurisdiction: [CN], legal_basis: X}]\n"),
                    GeoDatabase(CITY_DB), "test")  # fmt: skip
    reader = InMemoryMetricReader()
    telemetry = Telemetry(holder, MeterProvider(metric_readers=[reader]))
    running = start_server(ServeConfig(listen=f"unix:{tmp_path}/s.sock"), holder, telemetry=telemetry)
    try:
        for peer in ("175.16.199.1", "81.2.69.142"):
            _call(running.address, ext.CheckRequest(attributes=request(peer=peer)).SerializeToString())
        # Refused in the mapping, before the decision path (no meeting id): still timed, as an error.
        refused = _call(running.address, ext.CheckRequest(attributes=request(context={})).SerializeToString())
        assert refused.denied_response.status.code == 400
        data = reader.get_metrics_data()
    finally:
        running.stop(grace=0)
        telemetry.shutdown()
    assert data is not None
    points: dict[str, list[tuple[dict[str, Any], Any]]] = {
        metric.name: [(dict(p.attributes or {}), p) for p in metric.data.data_points]
        for rm in data.resource_metrics for scope in rm.scope_metrics for metric in scope.metrics
    }  # fmt: skip
    durations = {(a["rpc"], a["verdict"]): p.count for a, p in points["pdp.check.duration"]}
    assert durations == {("ext_authz", "DENY"): 1, ("ext_authz", "ALLOW"): 1, ("ext_authz", "ERROR"): 1}
    decisions = {(a["verdict"], a["rule_id"]): p.value for a, p in points["pdp.decisions"]}
    assert decisions == {("DENY", "cn"): 1, ("ALLOW", ""): 1}
