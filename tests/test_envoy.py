"""A real Envoy 1.40 with ext_authz asking pdp over its Unix socket, in front of a real upstream.

One Envoy for the module (examples/envoy/envoy.template.yaml, the committed
example's template); pdp runs in the test process on the socket Envoy's
cluster points at, restarted per test with the settings the test names.
Addresses are geolocated with the demo GeoLite2-City (maxminddb-geolite2):
MaxMind's test databases have no Macao.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pdp.audit import AuditConfig, AuditLog
from pdp.client import Client
from pdp.config import resolve
from pdp.geo import GeoDatabase, demo_database_path
from pdp.model import Verdict
from pdp.server import RunningServer, start_server
from pdp.state import PolicyHolder

from .conftest import policy_from
from .envoyproxy import Envoy, Upstream, body_json, render_config, start_envoy, start_upstream

RULES = """
version: 7
rules:
  - id: cn-memorial
    effect: deny
    jurisdiction: [CN]
    meetings: {tags: [memorial]}
    reason: memorial meetings are closed to participants in mainland China
    legal_basis: Order 17/2020 of authority X
  - id: hk-memorial-watch
    effect: deny
    mode: shadow
    jurisdiction: [HK]
    meetings: {tags: [memorial]}
    legal_basis: proposed ordinance 3/2026
"""
CN, HK, TW, MO, US = "175.16.199.1", "1.36.0.1", "1.160.0.1", "202.175.3.3", "8.8.8.8"
ISSUER, AUDIENCE = "https://meet.test", "meet-signalling"
# pdp reading a meeting from verified join tokens (the /rtc/ route).
FROM_CLAIMS = {
    "ext_authz_meeting_id": "claim:video.room",
    "ext_authz_tags": "claim:pdp.tags",
    "ext_authz_host_account_id": "claim:pdp.host_account",
    "ext_authz_user_id": "claim:sub",
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Pdp:
    """pdp in this process, on the socket Envoy's pdp cluster dials."""

    socket: Path
    geo: GeoDatabase
    running: RunningServer | None = None
    holder: PolicyHolder | None = None

    def start(
        self, rules: str = RULES, *, loaded: bool = True, audit: AuditLog | None = None, **settings: str
    ) -> PolicyHolder:
        self.stop()
        config = resolve({"listen": f"unix:{self.socket}", **settings}, {})
        self.holder = PolicyHolder()
        self.running = start_server(config, self.holder, audit=audit)
        if loaded:
            self.holder.activate(policy_from(rules), self.geo, "test.yaml")
        return self.holder

    def stop(self) -> None:
        if self.running is not None:
            self.running.stop(grace=0)
            self.running = None


@dataclass
class Stack:
    envoy: Envoy
    upstream: Upstream
    pdp: Pdp
    key: Ed25519PrivateKey

    def token(self, claims: dict[str, Any], key: Ed25519PrivateKey | None = None) -> str:
        """A join token signed with the issuer's key (or ``key``)."""
        header = _b64(json.dumps({"alg": "EdDSA", "typ": "JWT", "kid": "test"}).encode())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600, **claims}
        signing_input = f"{header}.{_b64(json.dumps(payload).encode())}"
        signature = (key or self.key).sign(signing_input.encode())
        return f"{signing_input}.{_b64(signature)}"

    def authz_calls(self) -> int:
        """How often Envoy's ext_authz filter got an answer or an error from pdp."""
        stats = self.envoy.stats("http.signalling.ext_authz.")
        return sum(stats.get(f"http.signalling.ext_authz.{name}", 0) for name in ("ok", "denied", "error"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("envoy")
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    jwks = json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": "test", "x": _b64(public)}]})
    upstream = start_upstream()
    pdp = Pdp(folder / "pdp.sock", GeoDatabase(demo_database_path(), 1000))
    config = render_config(
        admin_port="0", listen_address="127.0.0.1", listen_port="0", upstream_port=str(upstream.port),
        pdp_socket=str(pdp.socket), authz_timeout="5s", jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwks=jwks,
    )  # fmt: skip
    envoy = start_envoy(folder, config)
    yield Stack(envoy, upstream, pdp, key)
    pdp.stop()
    envoy.stop()
    upstream.stop()
    pdp.geo.close()


@pytest.fixture
def serve(stack: Stack) -> Iterator[Callable[..., PolicyHolder]]:
    """Start pdp for one test: ``serve(rules=RULES, loaded=True, **settings)``; stopped after it."""
    yield stack.pdp.start
    stack.pdp.stop()


def _forged() -> dict[str, str]:
    """What a client would send to pass itself off as decided."""
    return {"x-pdp-verdict": "ALLOW", "x-pdp-country": "US", "x-pdp-policy-version": "999",
            "x-pdp-shadow-rules": "none", "x-pdp-rule-id": "", "x-pdp-admin": "yes", "X-PDP-Upper": "yes"}  # fmt: skip


# --------------------------------------------------------------------------- context_extensions


def test_mainland_china_via_one_trusted_hop_on_a_memorial_route_is_403_naming_rule_and_basis(
    stack: Stack, serve: Callable[..., PolicyHolder]
) -> None:
    serve(ext_authz_xff_trusted_hops="1")
    before = stack.upstream.seen.count()
    status, headers, body = stack.envoy.request("/memorial/join", {"x-forwarded-for": CN})
    assert status == 403
    assert headers["x-pdp-rule-id"] == "cn-memorial"
    assert headers["content-type"] == "application/json"
    answer = body_json(body)
    assert answer["verdict"] == "DENY"
    assert answer["rule_id"] == "cn-memorial"
    assert answer["legal_basis"] == "Order 17/2020 of authority X"
    assert answer["reason"] == "memorial meetings are closed to participants in mainland China"
    assert answer["location"] == {"found": True, "country": "CN", "subdivisions": ["CN-JL"]}
    assert answer["policy_version"] == 7
    assert stack.upstream.seen.count() == before, "a denied request never reaches the meeting node"


@pytest.mark.parametrize(("address", "country"), [(HK, "HK"), (TW, "TW"), (MO, "MO"), (US, "US")])
def test_the_same_request_from_elsewhere_is_200_with_headers_the_client_could_not_forge(
    stack: Stack, serve: Callable[..., PolicyHolder], address: str, country: str
) -> None:
    serve(ext_authz_xff_trusted_hops="1")
    status, _, body = stack.envoy.request("/memorial/join", {"x-forwarded-for": address, **_forged()})
    assert status == 200
    seen = body_json(body)["headers"]
    assert seen["x-pdp-verdict"] == "ALLOW"
    assert seen["x-pdp-policy-version"] == "7"
    assert seen["x-pdp-country"] == country
    if country == "HK":  # matched by the shadow rule: reported, not enforced
        assert seen["x-pdp-shadow-rules"] == "hk-memorial-watch"
    else:
        assert "x-pdp-shadow-rules" not in seen
    assert "x-pdp-admin" not in seen
    assert "x-pdp-upper" not in seen  # header names are case-insensitive; Envoy hands pdp lower case
    assert "x-pdp-rule-id" not in seen
    assert [name for name in seen if name.startswith("x-pdp-") and seen[name] in ("999", "none", "yes")] == []


def test_host_action_from_the_route_is_decided_as_host(stack: Stack, serve: Callable[..., PolicyHolder]) -> None:
    serve(RULES.replace("meetings: {tags: [memorial]}", "meetings: {tags: [memorial]}\n    actions: [host]", 1),
          ext_authz_xff_trusted_hops="1")  # fmt: skip
    assert stack.envoy.request("/memorial/join", {"x-forwarded-for": CN})[0] == 200
    status, headers, _ = stack.envoy.request("/host/memorial/start", {"x-forwarded-for": CN})
    assert (status, headers["x-pdp-rule-id"]) == (403, "cn-memorial")


def test_zero_trusted_hops_ignores_x_forwarded_for(stack: Stack, serve: Callable[..., PolicyHolder]) -> None:
    serve(ext_authz_xff_trusted_hops="0")
    # Envoy's peer is this test, on loopback: no country, and the policy's default (allow) applies.
    status, _, body = stack.envoy.request("/memorial/join", {"x-forwarded-for": CN})
    assert status == 200
    seen = body_json(body)["headers"]
    assert seen["x-pdp-verdict"] == "ALLOW"
    assert "x-pdp-country" not in seen
    serve(RULES.replace("version: 7", "version: 8\ndefaults: {unknown_location: deny}"))
    status, _, body = stack.envoy.request("/memorial/join", {"x-forwarded-for": HK})
    assert status == 403
    assert body_json(body)["location"]["found"] is False


def test_only_the_hops_nearest_envoy_are_trusted(stack: Stack, serve: Callable[..., PolicyHolder]) -> None:
    serve(ext_authz_xff_trusted_hops="2")
    # The client wrote CN at the left; the two trusted proxies appended HK and their own peer.
    status, _, body = stack.envoy.request("/memorial/join", {"x-forwarded-for": f"{CN}, {HK}, 10.0.0.7"})
    assert status == 200
    assert body_json(body)["headers"]["x-pdp-country"] == "HK"
    status, _, body = stack.envoy.request("/memorial/join", {"x-forwarded-for": f"{HK}, {CN}, 10.0.0.7"})
    assert status == 403


@pytest.mark.parametrize(
    ("path", "headers", "field", "words"),
    [
        # The host route's context_extensions carry no host account, required here.
        ("/host/memorial/start", {"x-forwarded-for": CN}, "host_account_id", "context:host_account_id gave nothing"),
        ("/memorial/join", {}, "participant.ip", "x-forwarded-for holds 0 addresses"),
        ("/memorial/join", {"x-forwarded-for": "not-an-address"}, "participant.ip", "is not an IPv4 or IPv6"),
        ("/memorial/join", {"x-forwarded-for": f"{CN}:443"}, "participant.ip", "without a port"),
    ],
)
def test_a_request_that_cannot_be_decided_is_400_naming_what(
    stack: Stack, serve: Callable[..., PolicyHolder], path: str, headers: dict[str, str], field: str, words: str
) -> None:
    serve(ext_authz_xff_trusted_hops="1", ext_authz_required="meeting_id,host_account_id")
    status, answer_headers, body = stack.envoy.request(path, headers)
    assert status == 400
    answer = body_json(body)
    assert (answer["verdict"], answer["field"]) == ("DENY", field)
    assert words in answer["message"]
    assert answer_headers["content-type"] == "application/json"


# --------------------------------------------------------------------------- verified join tokens


def test_a_join_token_is_decided_from_its_verified_claims(stack: Stack, serve: Callable[..., PolicyHolder]) -> None:
    serve(ext_authz_xff_trusted_hops="1", **FROM_CLAIMS)
    memorial = stack.token({"sub": "user-1", "video": {"room": "r-17"}, "pdp": {"tags": ["memorial"]}})
    plain = stack.token({"sub": "user-1", "video": {"room": "r-18"}, "pdp": {"tags": ["weekly"]}})
    status, headers, _ = stack.envoy.request("/rtc/join", {"authorization": f"Bearer {memorial}",
                                                           "x-forwarded-for": CN})  # fmt: skip
    assert (status, headers["x-pdp-rule-id"]) == (403, "cn-memorial")
    assert stack.envoy.request("/rtc/join", {"authorization": f"Bearer {memorial}", "x-forwarded-for": HK})[0] == 200
    assert stack.envoy.request("/rtc/join", {"authorization": f"Bearer {plain}", "x-forwarded-for": CN})[0] == 200


def test_a_client_header_claiming_other_tags_changes_nothing(stack: Stack, serve: Callable[..., PolicyHolder]) -> None:
    serve(ext_authz_xff_trusted_hops="1", **FROM_CLAIMS)
    token = stack.token({"sub": "user-1", "video": {"room": "r-17"}, "pdp": {"tags": ["memorial"]}})
    claims = {"x-meeting-tags": "weekly", "x-pdp-tags": "weekly", "tags": "weekly", "x-room": "r-18"}
    status, headers, _ = stack.envoy.request("/rtc/join", {"authorization": f"Bearer {token}",
                                                           "x-forwarded-for": CN, **claims})  # fmt: skip
    assert (status, headers["x-pdp-rule-id"]) == (403, "cn-memorial")


def test_a_token_with_a_bad_signature_never_reaches_pdp(stack: Stack, serve: Callable[..., PolicyHolder]) -> None:
    serve(ext_authz_xff_trusted_hops="1", **FROM_CLAIMS)
    forged = stack.token(
        {"sub": "user-1", "video": {"room": "r-18"}, "pdp": {"tags": []}}, Ed25519PrivateKey.generate()
    )
    calls, seen = stack.authz_calls(), stack.upstream.seen.count()
    for headers in ({"authorization": f"Bearer {forged}"}, {}):  # forged, then none at all
        status, _, body = stack.envoy.request("/rtc/join", {**headers, "x-forwarded-for": HK})
        assert status == 401, body
    assert stack.authz_calls() == calls
    assert stack.upstream.seen.count() == seen


def test_a_token_without_the_room_claim_is_400(stack: Stack, serve: Callable[..., PolicyHolder]) -> None:
    serve(ext_authz_xff_trusted_hops="1", **FROM_CLAIMS)
    token = stack.token({"sub": "user-1", "pdp": {"tags": ["memorial"]}})
    status, _, body = stack.envoy.request("/rtc/join", {"authorization": f"Bearer {token}", "x-forwarded-for": HK})
    assert status == 400
    assert body_json(body)["field"] == "meeting_id"


# --------------------------------------------------------------------------- failures and reloads


def test_pdp_stopped_envoy_answers_its_error_status(stack: Stack, serve: Callable[..., PolicyHolder]) -> None:
    serve(ext_authz_xff_trusted_hops="1")
    assert stack.envoy.request("/memorial/join", {"x-forwarded-for": HK})[0] == 200
    stack.pdp.stop()
    seen = stack.upstream.seen.count()
    for address in (HK, CN):
        assert stack.envoy.request("/memorial/join", {"x-forwarded-for": address})[0] == 503
    assert stack.upstream.seen.count() == seen, "fail closed: nothing reached the meeting node"


def test_before_a_policy_is_loaded_envoy_answers_its_error_status(
    stack: Stack, serve: Callable[..., PolicyHolder]
) -> None:
    holder = serve(loaded=False, ext_authz_xff_trusted_hops="1")
    assert stack.envoy.request("/memorial/join", {"x-forwarded-for": HK})[0] == 503
    holder.activate(policy_from(RULES), stack.pdp.geo, "test.yaml")
    assert stack.envoy.request("/memorial/join", {"x-forwarded-for": HK})[0] == 200


def test_a_policy_reload_between_two_requests_shows_in_the_second(
    stack: Stack, serve: Callable[..., PolicyHolder]
) -> None:
    holder = serve(ext_authz_xff_trusted_hops="1")
    status, _, body = stack.envoy.request("/memorial/join", {"x-forwarded-for": TW})
    assert (status, body_json(body)["headers"]["x-pdp-policy-version"]) == (200, "7")
    holder.activate_policy(policy_from(RULES.replace("version: 7", "version: 8").replace("[CN]", "[CN, TW]")), "v8")
    status, _, body = stack.envoy.request("/memorial/join", {"x-forwarded-for": TW})
    assert status == 403
    assert (body_json(body)["policy_version"], body_json(body)["rule_id"]) == (8, "cn-memorial")
    status, _, body = stack.envoy.request("/memorial/join", {"x-forwarded-for": HK})
    assert body_json(body)["headers"]["x-pdp-policy-version"] == "8"


# --------------------------------------------------------------------------- the same decisions as Check

PARITY_ADDRESSES = [CN, "114.114.114.114", "1.2.4.8", HK, "203.198.7.66", TW, MO, US, "3.0.0.1",
                    "2001:2e0::1", "2001:238::1", "10.1.2.3", "127.0.0.1"]  # fmt: skip


def test_the_envoy_path_decides_like_check(stack: Stack, serve: Callable[..., PolicyHolder]) -> None:
    serve(ext_authz_xff_trusted_hops="1")
    assert stack.pdp.running is not None
    with Client(stack.pdp.running.address, timeout=5) as client:
        for address in PARITY_ADDRESSES:
            expected = client.check(
                address, "memorial-2026", tags=["memorial", "public"], host_account_id="acct-memorial"
            )
            status, _, body = stack.envoy.request("/memorial/join", {"x-forwarded-for": address})
            if expected.verdict == Verdict.DENY:
                answer = body_json(body)
                assert status == 403, address
                got = (answer["verdict"], answer["rule_id"], answer["reason"], answer["legal_basis"])
                assert got == ("DENY", expected.rule_id, expected.reason, expected.legal_basis), address
                assert answer["location"]["country"] == expected.location.country
            else:
                seen = body_json(body)["headers"]
                assert (status, seen["x-pdp-verdict"]) == (200, "ALLOW"), address
                assert seen.get("x-pdp-country", "") == expected.location.country, address
                assert seen.get("x-pdp-shadow-rules", "") == ",".join(expected.shadow_rule_ids), address


def test_the_envoy_path_writes_the_audit_record_check_writes(
    stack: Stack, serve: Callable[..., PolicyHolder], tmp_path: Path
) -> None:
    key, log = tmp_path / "audit.key", tmp_path / "audit.jsonl"
    key.write_bytes(os.urandom(32))
    audit = AuditLog(AuditConfig(str(log), str(key), allow_sample_rate=1.0))
    serve(audit=audit, ext_authz_xff_trusted_hops="1")
    assert stack.pdp.running is not None
    with Client(stack.pdp.running.address, timeout=5) as client:
        for address in (CN, HK):
            assert stack.envoy.request("/memorial/join", {"x-forwarded-for": address})[0] in (200, 403)
            client.check(address, "memorial-2026", tags=["memorial", "public"], host_account_id="acct-memorial")
    stack.pdp.stop()
    audit.close()  # writes what is queued
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for record in records:
        del record["time"], record["decision_id"]
    # CN: one deny each; HK: an allow and the shadow rule's match each.
    assert len(records) == 6
    assert records[0] == records[1]
    assert records[2:4] == records[4:6]
    assert [(record["verdict"], record["mode"]) for record in records[:4]] == [
        ("DENY", "enforce"), ("DENY", "enforce"), ("ALLOW", "enforce"), ("DENY", "shadow")]  # fmt: skip
