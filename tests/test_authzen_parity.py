"""One decision path: the same participant gets the same answer through gRPC
``Check``, AuthZEN and Envoy's ext_authz (a real Envoy in front of the same
sidecar), and AuthZEN's calls are observed and audited as Check's are."""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pdp.audit import pseudonym
from pdp.client import Client
from pdp.geo import demo_database_path
from pdp.model import Action

from .authzen import SidecarFactory, action, client_of, resource, running_sidecars, subject
from .conftest import CITY_DB
from .envoyproxy import body_json, render_config, start_envoy, start_upstream

RULES = """
version: 11
defaults:
  unknown_location: deny
rules:
  - {id: cn-memorial, effect: deny, jurisdiction: [CN], meetings: {tags: [memorial]}, legal_basis: Order 17/2020}
  - {id: cn-host, effect: deny, jurisdiction: [CN], actions: [host], legal_basis: Notice 4/2025}
  - {id: mo-vigil, effect: deny, jurisdiction: [MO], meetings: {tags: [vigil]}, legal_basis: Law 2/2009}
  - {id: tw-host, effect: deny, jurisdiction: [TW], actions: [host], legal_basis: Act 12 (draft), mode: shadow}
  - {id: us-wa, effect: deny, jurisdiction: [US-WA], legal_basis: WA statute}
  - {id: hk-exception, effect: allow, jurisdiction: [HK], meetings: {tags: [memorial]}, priority: 200}
"""

# MaxMind's City test database holds no Macau (MO) network: that place is taken
# from the demo GeoLite2-City (the dev extra's maxminddb-geolite2), with the others again.
PLACES = {
    "test": {
        "CN": ["175.16.199.1", "2001:250::1"],
        "HK": ["2001:2e0::1"],
        "TW": ["2001:238::1"],
        "US": ["216.160.83.56", "149.101.100.1"],
        "unknown": ["10.0.0.1", "203.0.113.9", "::1"],
    },
    "demo": {
        "CN": ["175.16.199.1"],
        "HK": ["1.36.0.1"],
        "TW": ["1.160.0.1"],
        "MO": ["202.175.3.3", "60.246.0.1"],
        "US": ["8.8.8.8"],
        "unknown": ["10.0.0.1"],
    },
}
MEETINGS = [("m-plain", []), ("m-memorial", ["memorial"]), ("m-vigil", ["vigil", "memorial"])]
SAME = ("verdict", "rule_id", "reason", "legal_basis", "location", "policy_version", "geoip_build", "shadow_rule_ids")


@pytest.fixture
def sidecars(tmp_path: Path) -> Iterator[SidecarFactory]:
    yield from running_sidecars(tmp_path)


def _grpc_fields(client: Client, ip: str, meeting: str, tags: list[str], name: str, host: str = "") -> dict[str, Any]:
    result = client.check(ip, meeting, tags=tags, user_id="u-1", host_account_id=host, action=Action[name.upper()])
    return {
        "verdict": result.verdict.name, "rule_id": result.rule_id, "reason": result.reason,
        "legal_basis": result.legal_basis,
        "location": {"found": result.location.found, "country": result.location.country,
                     "subdivisions": list(result.location.subdivisions)},
        "policy_version": result.policy_version, "geoip_build": result.geoip_build,
        "shadow_rule_ids": list(result.shadow_rule_ids),
    }  # fmt: skip


@pytest.mark.parametrize("database", ["test", "demo"])
def test_the_same_participant_gets_the_same_answer_through_grpc_and_authzen(
    sidecars: SidecarFactory, database: str
) -> None:
    """Every place (mainland China, Hong Kong, Taiwan, Macau, the US, an unknown
    address), every meeting and both actions: verdict, rule, reason, legal
    basis, location and versions are identical through Check and through AuthZEN
    evaluation, evaluations item by item, and evaluations through CheckBatch."""
    geoip = str(CITY_DB) if database == "test" else str(demo_database_path())
    sidecar = sidecars(RULES, geoip_db=geoip)
    pdp = client_of(sidecar)
    addresses = [ip for ips in PLACES[database].values() for ip in ips]
    compared = set()
    with Client(sidecar.address, timeout=10) as grpc_client:
        for meeting, tags in MEETINGS:
            for name in ("join", "host"):
                expected = [_grpc_fields(grpc_client, ip, meeting, tags, name) for ip in addresses]
                one_by_one = [
                    pdp.evaluate({"subject": subject(ip), "action": action(name), "resource": resource(meeting, tags)})
                    for ip in addresses
                ]
                shared = pdp.evaluate_all({  # one meeting and action: the CheckBatch path
                    "action": action(name), "resource": resource(meeting, tags),
                    "evaluations": [{"subject": subject(ip)} for ip in addresses],
                })  # fmt: skip
                mixed = pdp.evaluate_all({  # another meeting in each item: item by item
                    "action": action(name),
                    "evaluations": [{"subject": subject(ip), "resource": resource(f"{meeting}-{n}", tags)}
                                    for n, ip in enumerate(addresses)],
                })  # fmt: skip
                for answers in (one_by_one, shared, mixed):
                    assert [{key: answer["context"][key] for key in SAME} for answer in answers] == expected
                    assert [answer["decision"] for answer in answers] == [e["verdict"] == "ALLOW" for e in expected]
                compared |= {(e["verdict"], e["rule_id"]) for e in expected}
    # Compared: denials by several rules, an allow exception, the unknown-location default, plain allows.
    assert {
        ("DENY", "cn-memorial"),
        ("DENY", "cn-host"),
        ("ALLOW", "hk-exception"),
        ("DENY", ""),
        ("ALLOW", ""),
    } <= compared
    assert ("DENY", "us-wa" if database == "test" else "mo-vigil") in compared


# The example Envoy's routes (examples/envoy/envoy.template.yaml) and the meeting each one names.
ENVOY_ROUTES = {
    "/memorial/join": ("memorial-2026", ["memorial", "public"], "acct-memorial", "join"),
    "/host/memorial/start": ("memorial-2026", ["memorial"], "", "host"),
}


@pytest.mark.parametrize("database", ["test", "demo"])
def test_envoy_gives_the_same_answer_as_grpc_and_authzen(
    sidecars: SidecarFactory, tmp_path: Path, database: str
) -> None:
    """The same places through a real Envoy whose ext_authz filter calls the
    sidecar (the participant in x-forwarded-for, one trusted hop; the meeting
    from the route): a deny is 403 with every CheckResponse field equal to
    Check's and AuthZEN's context; an allow reaches the upstream with the
    verdict, policy version and country pdp put there."""
    geoip = str(CITY_DB) if database == "test" else str(demo_database_path())
    sidecar = sidecars(RULES, geoip_db=geoip, ext_authz_xff_trusted_hops=1)
    key = Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    jwks = json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": "k",
                                 "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode()}]})  # fmt: skip
    upstream = start_upstream()
    config = render_config(
        admin_port="0", listen_address="127.0.0.1", listen_port="0", upstream_port=str(upstream.port),
        pdp_socket=sidecar.address.removeprefix("unix:"), authz_timeout="5s", jwt_issuer="https://meet.test",
        jwt_audience="meet", jwks=jwks,
    )  # fmt: skip
    envoy = start_envoy(tmp_path / "envoy", config)
    pdp = client_of(sidecar)
    denied = allowed = 0
    try:
        with Client(sidecar.address, timeout=10) as grpc_client:
            for path, (meeting, tags, host, name) in ENVOY_ROUTES.items():
                for ip in [ip for ips in PLACES[database].values() for ip in ips]:
                    expected = _grpc_fields(grpc_client, ip, meeting, tags, name, host)
                    authzen = pdp.evaluate({"subject": subject(ip), "action": action(name),
                                            "resource": resource(meeting, tags, host)})["context"]  # fmt: skip
                    assert {key: authzen[key] for key in SAME} == expected, (path, ip)
                    status, _, body = envoy.request(path, {"x-forwarded-for": ip})
                    if expected["verdict"] == "DENY":
                        assert status == 403, (path, ip)
                        assert {key: body_json(body)[key] for key in SAME} == expected, (path, ip)
                        denied += 1
                    else:
                        seen = body_json(body)["headers"]
                        assert status == 200, (path, ip)
                        assert seen["x-pdp-verdict"] == "ALLOW"
                        assert seen["x-pdp-policy-version"] == str(expected["policy_version"])
                        assert seen.get("x-pdp-country", "") == expected["location"]["country"], (path, ip)
                        assert seen.get("x-pdp-shadow-rules", "") == ",".join(expected["shadow_rule_ids"])
                        allowed += 1
    finally:
        envoy.stop()
        upstream.stop()
    assert denied >= 3
    assert allowed >= 3


def test_authzen_is_observed_and_audited_as_check_is(sidecars: SidecarFactory, tmp_path: Path) -> None:
    """No second copy of telemetry or audit: AuthZEN's calls are timed under
    their own ``rpc`` label, counted in the same decision metrics and written to
    the same audit log, with the same fields as Check's."""
    key = tmp_path / "hmac.key"
    key.write_bytes(b"0123456789abcdef0123456789abcdef")
    log = tmp_path / "audit.jsonl"
    environ = {"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": "0"}
    sidecar = sidecars(RULES, environ=environ, audit_log=str(log), audit_hmac_key_file=str(key))
    pdp = client_of(sidecar)
    cn = "175.16.199.1"
    with Client(sidecar.address, timeout=10) as grpc_client:
        grpc_client.check(cn, "m-1", tags=["memorial"], user_id="alice", account_id="acct-1")
    document = {"subject": subject(cn, "alice", account_id="acct-1"), "action": action(),
                "resource": resource("m-1", ["memorial"])}  # fmt: skip
    assert pdp.evaluate(document)["decision"] is False
    shared = {"action": action(), "resource": resource("m-2"),
              "evaluations": [{"subject": subject(ip)} for ip in (cn, "2001:2e0::1", "10.0.0.1")]}  # fmt: skip
    assert [a["decision"] for a in pdp.evaluate_all(shared)] == [True, True, False]
    by_item = {"action": action(), "evaluations": [{"subject": subject("10.0.0.1"), "resource": resource(f"m-{n}")}
                                                   for n in range(3, 5)]}  # fmt: skip
    assert [a["decision"] for a in pdp.evaluate_all(by_item)] == [False, False]
    # One meeting, one item refused: the batch is decided item by item, each observed once,
    # the refused item as an error; the batch it could not be is not counted besides.
    one_bad = {**shared, "evaluations": [{"subject": subject(cn)}, {"subject": subject("not an address")}]}
    assert [a["decision"] for a in pdp.evaluate_all(one_bad)] == [True, False]
    # Refused before the decision path (no subject): still timed, as an error.
    assert pdp.post("/access/v1/evaluation", {"action": action(), "resource": resource()}).status == 400
    assert pdp.post("/access/v1/evaluations", {"evaluations": "not a list"}).status == 400

    (described,) = sidecar.exporters
    with urllib.request.urlopen(described.removeprefix("metrics: "), timeout=10) as response:  # noqa: S310  # ours
        metrics = response.read().decode()
    counts = {
        line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("pdp_check_duration_seconds_count{")
    }
    assert counts == {
        'rpc="Check",verdict="DENY"': 1.0,
        'rpc="authzen/evaluation",verdict="DENY"': 1.0,
        'rpc="authzen/evaluations",verdict="MIXED"': 1.0,  # one CheckBatch for the shared meeting
        'rpc="authzen/evaluations",verdict="DENY"': 2.0,  # two items decided one by one
        'rpc="authzen/evaluations",verdict="ALLOW"': 1.0,  # the first item of one_bad
        'rpc="authzen/evaluation",verdict="ERROR"': 1.0,
        'rpc="authzen/evaluations",verdict="ERROR"': 2.0,  # the body refused, and one_bad's second item
    }
    assert 'pdp_decisions_total{jurisdiction="CN",mode="enforce",rule_id="cn-memorial",verdict="DENY"} 2.0' in metrics

    sidecar.stop(grace=0)  # flushes the audit log
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 5  # the two CN denials and the three unknown-location denials
    via_grpc, via_authzen = records[0], records[1]
    assert via_grpc.keys() == via_authzen.keys()
    different = {name for name in via_grpc if via_grpc[name] != via_authzen[name]}
    assert different == {"decision_id", "time"}
    assert via_authzen["user"] == pseudonym(key.read_bytes(), "alice")
    assert via_authzen["participant"] == pseudonym(key.read_bytes(), "acct-1")
    assert [record["meeting_id"] for record in records[2:]] == ["m-2", "m-3", "m-4"]
