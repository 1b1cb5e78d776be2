"""AuthZEN Authorization API 1.0 over real HTTP, against a real sidecar (``--http-listen``).

Each test names the section of the Authorization API 1.0 it pins ("section
7.1.1, Default values"; numbered as the published text, whose source is
api/authorization-api-1_0.md in github.com/openid/authzen) and, where one applies, the case of the AuthZEN 1.0
certification scenario ("C-3-2-7"), the conformance suite PDPs are held to.
Cases of that scenario that need its fixture policy (alice, bob, record-1)
are pinned here with pdp's own subjects and resources instead: the structure
and the HTTP behaviour they check are the same.
"""

from __future__ import annotations

import json
import select
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdp.app import SetupError
from pdp.authzen import MAX_BODY_BYTES
from pdp.authzen.protocol import MAX_HEAD_BYTES
from pdp.authzen.server import MAX_CONNECTIONS
from pdp.bounds import MAX_ID_LENGTH, MAX_TAGS
from pdp.geo import GeoDatabase

from .authzen import (
    EVALUATION,
    EVALUATIONS,
    JSON,
    METADATA,
    AuthZenClient,
    SidecarFactory,
    action,
    client_of,
    request,
    resource,
    running_sidecars,
    subject,
    wait_for_version,
)
from .conftest import CITY_DB, CN_MEMORIAL, policy_from

CN, HK, GB = "175.16.199.1", "2001:2e0::1", "81.2.69.142"
CONTEXT_FIELDS = {
    "verdict", "rule_id", "reason", "legal_basis", "location", "policy_version", "geoip_build", "shadow_rule_ids",
}  # fmt: skip


@pytest.fixture
def sidecars(tmp_path: Path) -> Iterator[SidecarFactory]:
    yield from running_sidecars(tmp_path)


@pytest.fixture
def pdp(sidecars: SidecarFactory) -> AuthZenClient:
    return client_of(sidecars())


# --------------------------------------------------------------------------- Access Evaluation (section 6)


def test_a_deny_is_200_with_decision_false_and_carries_what_check_says(pdp: AuthZenClient) -> None:
    """Section 5.5, Decision, and 10.1.2, Error Responses: a deny is HTTP 200 with
    ``decision: false``; the context carries CheckResponse's fields (section 5.5.1).
    C-2-2-2, C-2-3-1, C-2-3-2."""
    reply = pdp.post(EVALUATION, request(CN, tags=["memorial"]))
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    answer = reply.json()
    assert answer["decision"] is False
    assert answer["context"] == {
        "verdict": "DENY",
        "rule_id": "cn-memorial",
        "reason": "participants located in CN are denied by rule cn-memorial",
        "legal_basis": "Order 17/2020",
        "location": {"found": True, "country": "CN", "subdivisions": ["CN-22"]},
        "policy_version": 7,
        "geoip_build": GeoDatabase(CITY_DB).build_epoch,
        "shadow_rule_ids": [],
    }


def test_an_allow_is_decision_true_with_the_same_context(pdp: AuthZenClient) -> None:
    """Section 5.5: ``true`` lets the request go forward. C-2-2-1."""
    for ip, country in ((HK, "HK"), (CN, "CN")):  # CN without the memorial tag: no rule applies
        answer = pdp.evaluate(request(ip))
        assert answer["decision"] is True
        assert set(answer["context"]) == CONTEXT_FIELDS
        assert (answer["context"]["verdict"], answer["context"]["rule_id"]) == ("ALLOW", "")
        assert answer["context"]["location"]["country"] == country


def test_properties_map_to_host_account_action_and_account(sidecars: SidecarFactory) -> None:
    """Section 5.1.1, 5.2.1 and 5.3: subject, resource and action properties are
    what the rules match on. C-2-2-4 to C-2-2-7, with pdp's properties."""
    rules = """
    version: 3
    rules:
      - {id: acme-host, effect: deny, jurisdiction: [CN], actions: [host], meetings: {host_accounts: [acme]},
         legal_basis: Notice 4/2025}
    """
    pdp = client_of(sidecars(rules))
    hosting = {"subject": subject(CN, account_id="a-9"), "action": action("host"), "resource": resource(host="acme")}
    assert pdp.evaluate(hosting)["context"]["rule_id"] == "acme-host"
    assert pdp.evaluate({**hosting, "action": action("join")})["decision"] is True
    assert pdp.evaluate({**hosting, "resource": resource(host="other")})["decision"] is True


def test_context_extra_properties_and_unknown_members_are_ignored(pdp: AuthZenClient) -> None:
    """Section 10.1.1, JSON Serialization: receivers MUST ignore unknown fields.
    C-2-2-3 (optional context), C-2-2-8 (additional properties), C-2-2-9 (unknown fields)."""
    document: dict[str, Any] = request(CN, tags=["memorial"])
    document["subject"]["properties"].update({"department": "Sales", "role": "manager"})
    document["subject"]["extra"] = [1, 2]
    document["action"]["properties"] = {"method": "GET"}
    document["resource"]["properties"]["owner"] = "bob"
    document["context"] = {"time": "2025-06-27T18:03-07:00", "ip": "192.168.1.1"}
    document["foo"] = "bar"
    document["futureField"] = {"nested": True}
    assert pdp.evaluate(document)["context"]["rule_id"] == "cn-memorial"


def test_null_members_count_as_absent(pdp: AuthZenClient) -> None:
    """Section 11.5, JSON Payload Considerations: null SHOULD be omitted; pdp
    reads an optional null member as absent and a required one as missing."""
    document = request(HK)
    document["resource"]["properties"] = {"tags": None, "host_account_id": None}
    document["context"] = None
    assert pdp.evaluate(document)["decision"] is True
    document["subject"]["id"] = None
    reply = pdp.post(EVALUATION, document)
    assert (reply.status, reply.json()["error"]["field"]) == (400, "subject.id")


MISSING = [
    ("subject", lambda d: d.pop("subject")),
    ("action", lambda d: d.pop("action")),
    ("resource", lambda d: d.pop("resource")),
    ("subject.type", lambda d: d["subject"].pop("type")),
    ("subject.id", lambda d: d["subject"].pop("id")),
    ("subject.properties.ip", lambda d: d["subject"].pop("properties")),
    ("subject.properties.ip", lambda d: d["subject"]["properties"].pop("ip")),
    ("action.name", lambda d: d["action"].pop("name")),
    ("resource.type", lambda d: d["resource"].pop("type")),
    ("resource.id", lambda d: d["resource"].pop("id")),
]


@pytest.mark.parametrize(("field", "change"), MISSING, ids=[f"{field}-{n}" for n, (field, _) in enumerate(MISSING)])
def test_a_missing_required_member_is_400_naming_it(pdp: AuthZenClient, field: str, change: Any) -> None:
    """Section 10.1.1: an omitted required attribute MUST be a Bad Request.
    C-2-4-1 (missing entities), C-2-4-2 (missing sub-fields)."""
    document = request(CN)
    change(document)
    reply = pdp.post(EVALUATION, document, {"X-Request-ID": "r-400"})
    assert reply.status == 400
    assert reply.json()["error"] == {"status": 400, "field": field, "message": f"{field}: required"}
    assert reply.headers["x-request-id"] == "r-400"


WRONG_TYPES = [
    ("subject", "alice", "subject: must be an object, not a string"),
    ("action", ["join"], "action: must be an object, not an array"),
    ("action.name", 123, "action.name: must be a string, not a number"),
    ("subject.id", True, "subject.id: must be a string, not a boolean"),
    ("subject.properties", "1.2.3.4", "subject.properties: must be an object, not a string"),
    ("subject.properties.ip", 16777216, "subject.properties.ip: must be a string, not a number"),
    ("subject.properties.account_id", {"a": 1}, "subject.properties.account_id: must be a string, not an object"),
    ("resource.id", 42, "resource.id: must be a string, not a number"),
    ("resource.properties.tags", "memorial", "resource.properties.tags: must be an array of strings, not a string"),
    ("resource.properties.tags", ["ok", 7], "resource.properties.tags[1]: must be a string, not a number"),
    ("resource.properties.host_account_id", 1, "resource.properties.host_account_id: must be a string, not a number"),
    ("context", "now", "context: must be an object, not a string"),
]


def _put(document: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for name in parents:
        document = document.setdefault(name, {})
    document[last] = value


@pytest.mark.parametrize(
    ("path", "value", "message"), WRONG_TYPES, ids=[f"{p}-{type(v).__name__}" for p, v, _ in WRONG_TYPES]
)
def test_a_wrong_typed_member_is_400_naming_it(pdp: AuthZenClient, path: str, value: Any, message: str) -> None:
    """Section 5 (each member's type) and 10.1.1. C-2-4-6 (invalid field types)."""
    document = request(CN)
    _put(document, path, value)
    reply = pdp.post(EVALUATION, document)
    assert reply.status == 400
    assert reply.json()["error"]["message"] == message


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("subject.type", "user", "subject.type: 'user' is not 'participant': pdp decides for participants"),
        ("resource.type", "record", "resource.type: 'record' is not 'meeting': pdp decides on meetings"),
        ("action.name", "read", "action.name: 'read' is not one of join, host"),
        ("action.name", "JOIN", "action.name: 'JOIN' is not one of join, host"),
    ],
)
def test_types_and_actions_pdp_does_not_decide_are_400(pdp: AuthZenClient, path: str, value: str, message: str) -> None:
    """Section 5.1 and 5.2: ``type`` scopes the id; pdp knows participants,
    meetings, and the actions join and host, and refuses others by name."""
    document = request(CN)
    _put(document, path, value)
    reply = pdp.post(EVALUATION, document)
    assert (reply.status, reply.json()["error"]["message"]) == (400, message)


@pytest.mark.parametrize(
    ("path", "value", "field", "says"),
    [
        ("resource.id", "", "resource.id", "required"),
        ("resource.id", "m" * (MAX_ID_LENGTH + 1), "resource.id", f"longer than {MAX_ID_LENGTH}"),
        ("subject.id", "u" * (MAX_ID_LENGTH + 1), "subject.id", f"longer than {MAX_ID_LENGTH}"),
        ("subject.properties.account_id", "a" * 300, "subject.properties.account_id", "longer than"),
        ("resource.properties.host_account_id", "h" * 300, "resource.properties.host_account_id", "longer than"),
        ("resource.properties.tags", ["t"] * (MAX_TAGS + 1), "resource.properties.tags", f"at most {MAX_TAGS}"),
        ("resource.properties.tags", ["t" * 129], "resource.properties.tags", "a tag longer than 128"),
        ("subject.properties.ip", "1.2.3", "subject.properties.ip", "is not an IPv4 or IPv6 address"),
        ("subject.properties.ip", "", "subject.properties.ip", "required"),
        ("subject.properties.ip", "fe80::1%eth0", "subject.properties.ip", "zone indexes are not accepted"),
    ],
)
def test_the_decision_paths_bounds_are_400_under_authzen_names(
    pdp: AuthZenClient, path: str, value: Any, field: str, says: str
) -> None:
    """The bounds are Check's own (pdp.decisions), named as the request spelled the field."""
    document = request(CN)
    _put(document, path, value)
    reply = pdp.post(EVALUATION, document)
    assert reply.status == 400
    error = reply.json()["error"]
    assert error["field"] == field
    assert says in error["message"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"", "request body: empty"),
        (b"  \r\n", "request body: empty"),
        (b'{"subject": ', "not valid JSON"),
        (b"[]", "must be a JSON object, not an array"),
        (b'"evaluation"', "must be a JSON object, not a string"),
        (b"null", "must be a JSON object, not null"),
        (b'{"subject": {"type": "participant"}}\xff', "not UTF-8"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),  # a byte order mark: I-JSON text has none
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"subject": {"type": "participant", "type": "user"}}', "member 'type' given twice"),
        (b'{"subject": {"type": "participant", "id": "\\ud800", "properties": {"ip": "2001:2e0::1"}},'
         b' "action": {"name": "join"}, "resource": {"type": "meeting", "id": "m"}}', "unpaired surrogate"),
    ],
    ids=["empty", "blank", "truncated", "array", "string", "null", "latin1", "bom", "deep", "duplicate", "surrogate"],
)  # fmt: skip
def test_a_body_that_is_not_one_json_object_is_400(pdp: AuthZenClient, body: bytes, says: str) -> None:
    """Section 10.1.1 (the top level MUST be an object) and 11.5 (I-JSON: UTF-8,
    no unpaired surrogates, unique member names: a name given twice could be
    read one way by a proxy and another by pdp). C-2-4-4, C-2-4-5."""
    for path in (EVALUATION, EVALUATIONS):
        reply = pdp.request("POST", path, body, JSON)
        assert reply.status == 400, reply
        assert says in reply.json()["error"]["message"]
    assert pdp.evaluate(request(CN))["decision"] is True  # and it keeps serving


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"])
def test_a_body_that_is_not_application_json_is_400(pdp: AuthZenClient, content_type: str | None) -> None:
    """Section 10.1: requests MUST carry ``Content-Type: application/json``;
    the certification scenario wants 400 for any other (C-2-4-3), so not 415."""
    headers = {"Content-Type": content_type} if content_type else {}
    reply = pdp.request("POST", EVALUATION, json.dumps(request(CN)).encode(), headers)
    assert reply.status == 400
    assert reply.json()["error"]["field"] == "Content-Type"


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_media_type_parameters_and_case_are_accepted(pdp: AuthZenClient, content_type: str) -> None:
    """RFC 9110 section 8.3.1: media types are case-insensitive and may carry parameters."""
    reply = pdp.request("POST", EVALUATION, json.dumps(request(CN)).encode(), {"Content-Type": content_type})
    assert reply.status == 200


def test_a_body_over_the_bound_is_413_before_and_while_reading(pdp: AuthZenClient) -> None:
    """Section 11.7, Availability & Denial of Service: payload size is bounded
    (MAX_BODY_BYTES, 1 MiB). A declared length over it is refused before a byte
    is read; a chunked body is refused once it passes the bound."""
    declared = pdp.connection()
    declared.putrequest("POST", EVALUATION)
    for name, value in {**JSON, "Content-Length": str(MAX_BODY_BYTES + 1), "X-Request-ID": "big"}.items():
        declared.putheader(name, value)
    declared.endheaders()  # and no body at all: the answer must not wait for one
    response = declared.getresponse()
    assert response.status == 413
    assert response.getheader("x-request-id") == "big"
    assert str(MAX_BODY_BYTES) in json.loads(response.read())["error"]["message"]
    declared.close()

    def chunks() -> Any:  # one byte over the bound, so that nothing is left unread when the answer comes
        for _ in range(MAX_BODY_BYTES // 65536):
            yield b" " * 65536
        yield b" "

    chunked = pdp.connection()
    try:
        chunked.request("POST", EVALUATIONS, body=chunks(), headers=JSON, encode_chunked=True)
        assert chunked.getresponse().status == 413
    except (BrokenPipeError, ConnectionResetError):
        pytest.fail("the server closed the connection instead of answering 413")
    finally:
        chunked.close()
    padded = json.dumps(request(CN)).encode()
    padded += b" " * (MAX_BODY_BYTES - len(padded))  # exactly at the bound: accepted
    assert pdp.request("POST", EVALUATION, padded, JSON).status == 200


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", EVALUATION, "POST"), ("PUT", EVALUATIONS, "POST"), ("DELETE", EVALUATION, "POST"),
    ("POST", METADATA, "GET, HEAD"),
])  # fmt: skip
def test_a_wrong_method_is_405_with_allow(pdp: AuthZenClient, method: str, path: str, allow: str) -> None:
    """Section 10.1: the APIs are POST, the metadata GET (section 9.2.1); RFC 9110 15.5.6 wants ``Allow``."""
    reply = pdp.request(method, path, b"{}", {**JSON, "X-Request-ID": "m-1"})
    assert (reply.status, reply.headers["allow"], reply.headers["x-request-id"]) == (405, allow, "m-1")


@pytest.mark.parametrize("path", ["/", "/access/v1/evaluation/", "/access/v1/search/subject", "/access/v2/evaluation"])
def test_an_unknown_path_is_404(pdp: AuthZenClient, path: str) -> None:
    """Section 10.1: only the endpoints in the metadata exist; search is not offered (section 9.1.1)."""
    assert pdp.post(path, request(CN)).status == 404


def test_x_request_id_is_echoed_on_every_answer(sidecars: SidecarFactory) -> None:
    """Section 10.1.3, Request Identification: the PDP MUST include the same
    identifier in the response. C-2-5-1, C-2-5-2 (absent: no failure)."""
    pdp = client_of(sidecars())
    ident = {"X-Request-ID": "bfe9eb29-ab87-4ca3-be83-a1d5d8305716"}
    replies = [
        pdp.post(EVALUATION, request(CN), ident),
        pdp.post(EVALUATIONS, {"evaluations": [request(CN)]}, ident),
        pdp.post(EVALUATION, {}, ident),
        pdp.request("GET", METADATA, headers=ident),
        pdp.request("GET", "/nowhere", headers=ident),
        pdp.request("GET", EVALUATION, headers=ident),
        pdp.request("POST", EVALUATION, b"{}", ident),
    ]
    assert [reply.headers.get("x-request-id") for reply in replies] == [ident["X-Request-ID"]] * len(replies)
    assert [reply.status for reply in replies] == [200, 200, 400, 200, 404, 405, 400]
    plain = pdp.post(EVALUATION, request(CN))
    assert plain.status == 200
    assert "x-request-id" not in plain.headers


def test_the_same_request_gets_the_same_answer(pdp: AuthZenClient) -> None:
    """C-2-6, Idempotency: the same request, consecutively, the same decision."""
    replies = {pdp.post(EVALUATION, request(CN, tags=["memorial"])).body for _ in range(5)}
    assert len(replies) == 1


def test_no_policy_yet_is_503_until_one_is_published(sidecars: SidecarFactory, tmp_path: Path) -> None:
    """Section 10.1.2: an error unrelated to a decision is an HTTP error, never
    a ``decision``; with nothing to decide with, pdp says 503 (try again), and
    the metadata is served all the same."""
    sidecar = sidecars(rules=None)
    pdp = client_of(sidecar)
    for path, document in ((EVALUATION, request(CN)), (EVALUATIONS, {"evaluations": [request(CN)] * 3})):
        reply = pdp.post(path, document, {"X-Request-ID": "early"})
        assert (reply.status, reply.headers["x-request-id"]) == (503, "early")
        assert "decision" not in reply.json()
    assert pdp.request("GET", METADATA).status == 200
    snapshot = Path(sidecar.config.snapshot.removeprefix("file://"))
    snapshot.write_text(CN_MEMORIAL)
    wait_for_version(sidecar, 7)
    assert pdp.evaluate(request(CN, tags=["memorial"]))["decision"] is False


# --------------------------------------------------------------------------- Access Evaluations (section 7)


def test_top_level_defaults_are_overridden_per_item_as_whole_entities(pdp: AuthZenClient) -> None:
    """Section 7.1.1, Default values: an item's own entity replaces the default
    whole (no member merging). C-3-2-1, C-3-2-7."""
    answers = pdp.evaluate_all({
        "subject": subject(CN), "action": action(), "resource": resource("m-1", ["memorial"]),
        "evaluations": [
            {},                                                   # every default
            {"resource": resource("m-2")},                        # a meeting without the tag
            {"subject": subject(HK)},                             # another participant
            {"resource": {"type": "meeting", "id": "m-3"}},       # no properties: the default's tags are not merged in
            {"resource": {"id": "m-4"}},                          # no type: not taken from the default either
        ],
    })  # fmt: skip
    assert [answer["decision"] for answer in answers] == [False, True, True, True, False]
    assert answers[0]["context"]["rule_id"] == "cn-memorial"
    assert answers[2]["context"]["location"]["country"] == "HK"
    assert answers[4]["context"]["error"]["field"] == "evaluations[4].resource.type"


def test_results_are_in_request_order_one_per_item(pdp: AuthZenClient) -> None:
    """Section 7.2: the decisions in the same order as the request's items. C-3-2-5, C-3-3-1 to C-3-3-4."""
    places = [CN, HK, CN, GB, "10.0.0.1", CN, HK] * 3
    reply = pdp.post(EVALUATIONS, {"evaluations": [request(ip, tags=["memorial"]) for ip in places]})
    document = reply.json()
    assert set(document) == {"evaluations"}  # no top-level decision (section 7.2: RECOMMENDED omitted)
    countries = [answer["context"]["location"]["country"] for answer in document["evaluations"]]
    assert countries == [{CN: "CN", HK: "HK", GB: "GB"}.get(ip, "") for ip in places]
    assert [answer["decision"] for answer in document["evaluations"]] == [ip != CN for ip in places]


def test_context_defaults_and_overrides_are_accepted(pdp: AuthZenClient) -> None:
    """Section 7.1.1: ``context`` is a default too. C-3-2-6."""
    answers = pdp.evaluate_all({
        "subject": subject(HK), "action": action(), "context": {"time": "2025-06-27T18:03-07:00"},
        "evaluations": [{"resource": resource("m-1")},
                        {"resource": resource("m-2"), "context": {"source": "batch-override"}}],
    })  # fmt: skip
    assert [answer["decision"] for answer in answers] == [True, True]


def test_execute_all_answers_every_item_and_a_failed_item_is_false(pdp: AuthZenClient) -> None:
    """Section 7.2.1, Errors: an item's error is in its context and its decision
    defaults to closed. C-3-4-1 (a missing entity inside a valid batch: 200)."""
    answers = pdp.evaluate_all({
        "subject": subject(HK), "action": action(),
        "options": {"evaluations_semantic": "execute_all"},
        "evaluations": [
            {"resource": resource("m-1")},
            {},                                                    # no resource anywhere
            {"resource": resource("m-3"), "subject": subject("1.2.3")},
            "not an object",
            {"resource": resource("m-5"), "action": action("read")},
            {"resource": resource("m-6")},
        ],
    })  # fmt: skip
    assert [answer["decision"] for answer in answers] == [True, False, False, False, False, True]
    errors = [answer["context"].get("error", {}).get("field") for answer in answers]
    assert errors == [None, "evaluations[1].resource", "evaluations[2].subject.properties.ip", "evaluations[3]",
                      "evaluations[4].action.name", None]  # fmt: skip
    assert answers[1]["context"]["error"]["status"] == 400


def test_deny_on_first_deny_stops_after_the_first_false(pdp: AuthZenClient) -> None:
    """Section 7.1.2.1, Evaluations semantics: like ``&&``, a denial (or a
    failure) short-circuits; the answer ends with it."""
    items = [{"subject": subject(HK)}, {"subject": subject(CN)}, {"subject": subject(HK)}]
    document = {"action": action(), "resource": resource(tags=["memorial"]), "evaluations": items,
                "options": {"evaluations_semantic": "deny_on_first_deny"}}  # fmt: skip
    assert [answer["decision"] for answer in pdp.evaluate_all(document)] == [True, False]
    document["evaluations"] = [{"subject": subject(HK)}, {"subject": subject("bad")}, {"subject": subject(CN)}]
    answers = pdp.evaluate_all(document)
    assert [answer["decision"] for answer in answers] == [True, False]
    assert "error" in answers[1]["context"]
    document["evaluations"] = [{"subject": subject(HK)}] * 3
    assert [answer["decision"] for answer in pdp.evaluate_all(document)] == [True, True, True]


def test_permit_on_first_permit_stops_after_the_first_true(pdp: AuthZenClient) -> None:
    """Section 7.1.2.1: like ``||``, the first permit short-circuits."""
    items = [{"subject": subject(CN)}, {"subject": subject("bad")}, {"subject": subject(HK)}, {"subject": subject(GB)}]
    document = {"action": action(), "resource": resource(tags=["memorial"]), "evaluations": items,
                "options": {"evaluations_semantic": "permit_on_first_permit"}}  # fmt: skip
    assert [answer["decision"] for answer in pdp.evaluate_all(document)] == [False, False, True]
    document["evaluations"] = [{"subject": subject(CN)}] * 2
    assert [answer["decision"] for answer in pdp.evaluate_all(document)] == [False, False]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"options": {"evaluations_semantic": "first_applicable"}}, "options.evaluations_semantic"),
        ({"options": {"evaluations_semantic": 1}}, "options.evaluations_semantic"),
        ({"options": "execute_all"}, "options"),
        ({"evaluations": {"0": {}}}, "evaluations"),
        ({"subject": "alice"}, "subject"),
        ({"context": []}, "context"),
    ],
)
def test_what_is_wrong_at_the_top_of_a_batch_is_400(pdp: AuthZenClient, change: dict[str, Any], field: str) -> None:
    """Section 7.2.1: errors that pertain to the entire payload are transport
    errors; only ``execute_all``, ``deny_on_first_deny`` and
    ``permit_on_first_permit`` exist (section 7.1.2.1)."""
    document = {"action": action(), "resource": resource(), "evaluations": [{"subject": subject(HK)}], **change}
    reply = pdp.post(EVALUATIONS, document)
    assert (reply.status, reply.json()["error"]["field"]) == (400, field)


@pytest.mark.parametrize("evaluations", [None, []], ids=["absent", "empty"])
def test_without_items_evaluations_is_one_evaluation(pdp: AuthZenClient, evaluations: list[Any] | None) -> None:
    """Section 7.1: without (or with an empty) ``evaluations`` the request is an
    Access Evaluation, and so is the answer. C-3-4-2, C-3-4-3."""
    document: dict[str, Any] = request(CN, tags=["memorial"])
    if evaluations is not None:
        document["evaluations"] = evaluations
    answer = pdp.post(EVALUATIONS, document).json()
    assert set(answer) == {"decision", "context"}
    assert answer["context"]["rule_id"] == "cn-memorial"
    missing = pdp.post(EVALUATIONS, {"evaluations": evaluations} if evaluations is not None else {})
    assert (missing.status, missing.json()["error"]["field"]) == (400, "subject")


def test_more_items_than_the_batch_limit_is_400(sidecars: SidecarFactory) -> None:
    """Section 11.7: the number of evaluations is bounded by --batch-limit, as CheckBatch's participants are."""
    pdp = client_of(sidecars(batch_limit=3))
    document: dict[str, Any] = {
        "action": action(),
        "resource": resource(),
        "evaluations": [{"subject": subject(HK)}] * 4,
    }
    reply = pdp.post(EVALUATIONS, document)
    assert reply.status == 400
    assert reply.json()["error"] == {
        "status": 400, "field": "evaluations", "message": "evaluations: 4 given, between 1 and 3 accepted",
    }  # fmt: skip
    document["evaluations"] = document["evaluations"][:3]
    assert len(pdp.evaluate_all(document)) == 3


@pytest.mark.parametrize("shared_meeting", [True, False], ids=["check-batch-path", "item-by-item"])
def test_a_batch_is_decided_at_one_policy_version_while_versions_change(
    sidecars: SidecarFactory, shared_meeting: bool
) -> None:
    """The issue's promise: one policy version for the whole batch, while new
    versions are activated as fast as one thread can (the version appears in
    every item's context)."""
    sidecar = sidecars()
    pdp = client_of(sidecar)
    active = wait_for_version(sidecar, 7)
    policies = [policy_from(CN_MEMORIAL.replace("version: 7", f"version: {version}")) for version in range(8, 60)]
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            for policy in policies:
                sidecar.holder.activate(policy, active.geo, "churn")

    items = [{"subject": subject(HK if n % 2 else CN), "resource": resource("m" if shared_meeting else f"m-{n}")}
             for n in range(1000)]  # fmt: skip
    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        seen: set[int] = set()
        for _ in range(5):
            answers = pdp.evaluate_all({"action": action(), "evaluations": items})
            versions = {answer["context"]["policy_version"] for answer in answers}
            assert len(versions) == 1, versions
            seen |= versions
    finally:
        stop.set()
        thread.join(timeout=30)
    assert len(seen) > 1  # versions did change between the batches


# --------------------------------------------------------------------------- metadata (section 9)


def test_metadata_names_this_pdp_and_both_endpoints(sidecars: SidecarFactory) -> None:
    """Section 9.1.1, Endpoint Parameters, 9.2.2, Response (200, application/json,
    no members without values) and 9.2.3, Validation (``policy_decision_point``
    is the URL the metadata was fetched from). C-6-1 to C-6-3, C-6-5."""
    sidecar = sidecars()
    pdp = client_of(sidecar)
    assert sidecar.http is not None
    reply = pdp.request("GET", METADATA)
    assert reply.status == 200
    assert reply.headers["cache-control"] == "max-age=300"  # section 11.9, Metadata Caching
    document = reply.json()
    assert document == {
        "policy_decision_point": sidecar.http.url,
        "access_evaluation_endpoint": sidecar.http.url + EVALUATION,
        "access_evaluations_endpoint": sidecar.http.url + EVALUATIONS,
    }
    port = sidecar.http.address.rsplit(":", 1)[1]
    named = pdp.request("GET", METADATA, headers={"Host": f"localhost:{port}"}).json()
    assert named["access_evaluation_endpoint"] == f"http://localhost:{port}{EVALUATION}"
    forged = pdp.request("GET", METADATA, headers={"Host": "evil/x?y#z"}).json()
    assert forged["policy_decision_point"] == sidecar.http.url  # a malformed Host is never echoed
    head = pdp.request("HEAD", METADATA)
    assert (head.status, head.body, head.headers["content-length"]) == (200, b"", str(len(reply.body)))
    for endpoint in (document["access_evaluation_endpoint"], document["access_evaluations_endpoint"]):
        path = endpoint.removeprefix(sidecar.http.url)
        assert pdp.post(path, request(CN, tags=["memorial"])).status == 200


# --------------------------------------------------------------------------- transport


def test_a_unix_socket_listener_is_group_only(sidecars: SidecarFactory, tmp_path: Path) -> None:
    """``--http-listen unix:/path``: the same socket rules as ``--listen`` (0660, in a 0750 directory)."""
    path = tmp_path / "run" / "authzen" / "http.sock"
    sidecar = sidecars(http_listen=f"unix:{path}")
    assert sidecar.http is not None
    assert sidecar.http.url == f"unix:{path}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    pdp = client_of(sidecar)
    assert pdp.evaluate(request(CN, tags=["memorial"]))["decision"] is False
    assert pdp.request("GET", METADATA).json()["policy_decision_point"] == "http://localhost"


def test_a_remote_address_without_tls_is_refused(sidecars: SidecarFactory) -> None:
    """Section 11.1: the PEP-PDP connection MUST be secured; as for gRPC, a
    non-loopback address needs TLS or --allow-insecure-remote."""
    with pytest.raises(SetupError, match=r"refusing to serve 0\.0\.0\.0:0 without TLS \(--http-listen\)"):
        sidecars(http_listen="0.0.0.0:0")  # the refusal is the test


def test_a_busy_port_stops_the_start_and_leaves_nothing_running(sidecars: SidecarFactory, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(SetupError, match=f"--http-listen 127.0.0.1:{port}: cannot listen"):
            sidecars(http_listen=f"127.0.0.1:{port}")
    grpc_socket = tmp_path / "sidecar-0" / "pdp.sock"
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        probe.connect(str(grpc_socket))  # the gRPC listener was stopped too


def test_tls_and_mutual_tls_are_gprcs_settings(sidecars: SidecarFactory, tmp_path: Path) -> None:
    """Section 11.1 (TLS) and 11.2 (mutual TLS to authenticate the PEP): the
    same --tls-cert, --tls-key and --tls-client-ca as gRPC. Metadata then says https."""
    import ssl

    from .test_hardening import make_certificates

    files = {name: str(path) for name, path in make_certificates(tmp_path).items()}
    sidecar = sidecars(
        listen="127.0.0.1:0", tls_cert=files["server.crt"], tls_key=files["server.key"], tls_client_ca=files["ca.crt"]
    )
    assert sidecar.http is not None
    assert sidecar.http.url.startswith("https://127.0.0.1:")
    trusted = ssl.create_default_context(cafile=files["ca.crt"])
    with_certificate = ssl.create_default_context(cafile=files["ca.crt"])
    with_certificate.load_cert_chain(files["client.crt"], files["client.key"])
    pdp = client_of(sidecar, context=with_certificate)
    assert pdp.evaluate(request(CN, tags=["memorial"]))["decision"] is False
    assert pdp.request("GET", METADATA).json()["access_evaluation_endpoint"].startswith("https://")
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        client_of(sidecar, context=trusted).post(EVALUATION, request(CN))  # no client certificate
    plaintext = AuthZenClient(sidecar.http.url.replace("https://", "http://"))
    with pytest.raises((ConnectionResetError, OSError)):
        plaintext.post(EVALUATION, request(CN))


def test_stop_closes_the_listener_and_ends_its_thread(sidecars: SidecarFactory) -> None:
    """Sidecar.stop drains and stops the HTTP listener with the gRPC server: nothing keeps listening."""
    sidecar = sidecars()
    assert sidecar.http is not None
    address = sidecar.http.address
    pdp = client_of(sidecar)
    assert pdp.evaluate(request(CN))["decision"] is True
    sidecar.stop()
    assert not [thread for thread in threading.enumerate() if thread.name == "pdp-authzen"]
    host, port = address.rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=5).close()


def test_a_request_head_over_the_bound_is_431_and_the_connection_closed(pdp: AuthZenClient) -> None:
    """Section 11.7: httptools bounds nothing itself, so a client sending headers
    without end would grow the sidecar; past MAX_HEAD_BYTES it gets 431 (read
    while it is still sending) and the connection ends."""
    host, port = pdp.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"POST /access/v1/evaluation HTTP/1.1\r\nHost: pdp\r\n")
        header = b"X-Pad: " + b"a" * 1000 + b"\r\n"
        sent = 0
        while sent < 100 * MAX_HEAD_BYTES and not select.select([raw], [], [], 0)[0]:
            raw.sendall(header)
            sent += len(header)
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["status"] == 431
    assert sent < 100 * MAX_HEAD_BYTES  # answered long before the client gave up
    assert pdp.evaluate(request(CN))["decision"] is True


HALF_A_REQUEST = b"POST /access/v1/evaluation HTTP/1.1\r\nHost: pdp\r\n"


def _until_closed(raw: socket.socket) -> bytes:
    """Everything the server sends until it closes (the socket's timeout is the deadline)."""
    answer = b""
    while chunk := raw.recv(65536):
        answer += chunk
    return answer


def test_a_crowd_of_half_sent_requests_never_keeps_an_evaluation_out(sidecars: SidecarFactory) -> None:
    """Before: 1,024 connections that sent half a request line held every slot of
    uvicorn's connection limit for good, and every evaluation after them was 503.
    The receive deadline is far off here: what lets the evaluation in is that the
    connection waiting longest for its request gives up its slot (408)."""
    pdp = client_of(sidecars(receive_timeout=300))
    host, port = pdp.url.removeprefix("http://").rsplit(":", 1)
    crowd: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS + 10):
            raw = socket.create_connection((host, int(port)), timeout=30)
            raw.sendall(HALF_A_REQUEST)
            crowd.append(raw)
        assert pdp.evaluate(request(CN))["decision"] is True
        assert pdp.evaluate(request(CN, tags=["memorial"]))["decision"] is False
        answer = _until_closed(crowd[0])
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert "did not arrive whole" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"]
        crowd[-1].setblocking(False)
        with pytest.raises(BlockingIOError):  # the newest still wait, unharmed: nothing to read, not closed
            crowd[-1].recv(1)
    finally:
        for raw in crowd:
            raw.close()


def test_a_request_that_does_not_arrive_whole_within_the_receive_timeout_is_408(sidecars: SidecarFactory) -> None:
    """--receive-timeout bounds an HTTP request as it bounds a gRPC call: a head
    that stops halfway, or a body short of its Content-Length, is 408 and the
    connection closed; a connection that sends nothing is closed."""
    pdp = client_of(sidecars(receive_timeout=0.5))
    host, port = pdp.url.removeprefix("http://").rsplit(":", 1)
    short_body = b"POST /access/v1/evaluation HTTP/1.1\r\nHost: pdp\r\nContent-Type: application/json\r\n"
    short_body += b"Content-Length: 100\r\n\r\n" + b'{"subject": '
    for sent in (HALF_A_REQUEST, short_body):
        with socket.create_connection((host, int(port)), timeout=30) as raw:
            raw.sendall(sent)
            answer = _until_closed(raw)
        assert answer.startswith(b"HTTP/1.1 408 "), (sent, answer[:200])
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["status"] == 408
    with socket.create_connection((host, int(port)), timeout=30) as silent:
        assert _until_closed(silent) == b""
    assert pdp.evaluate(request(CN))["decision"] is True


def _read_response(stream: Any) -> tuple[int, dict[str, str], bytes]:
    status = int(stream.readline().split()[1])
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, stream.read(int(headers["content-length"]))


def test_keep_alive_and_pipelined_requests_are_answered_in_order(pdp: AuthZenClient) -> None:
    """HTTP/1.1 persistent connections (RFC 9112 section 9.3): PEPs keep one open;
    pipelined requests are answered in the order they were sent."""
    host, port = pdp.url.removeprefix("http://").rsplit(":", 1)
    bodies = [json.dumps(request(ip, tags=["memorial"])).encode() for ip in (CN, HK, CN, GB)]
    wire = b"".join(
        b"POST /access/v1/evaluation HTTP/1.1\r\nHost: pdp\r\nContent-Type: application/json\r\n"
        + f"X-Request-ID: r-{n}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
        for n, body in enumerate(bodies)
    )
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(wire)
        stream = raw.makefile("rb")
        seen = []
        for _ in bodies:
            status, headers, body = _read_response(stream)
            seen.append((status, headers["x-request-id"], json.loads(body)["decision"]))
    assert seen == [(200, "r-0", False), (200, "r-1", True), (200, "r-2", False), (200, "r-3", True)]


def test_pdp_serve_takes_the_flag_the_variable_and_the_config_key(tmp_path: Path) -> None:
    """--http-listen, PDP_HTTP_LISTEN and http_listen in --config, through the real command."""
    import os
    import signal
    import subprocess
    import sys

    rules = tmp_path / "rules.yaml"
    rules.write_text(CN_MEMORIAL)
    (tmp_path / "pdp.yaml").write_text("http_listen: 127.0.0.1:0\n")
    base = [sys.executable, "-m", "pdp", "serve", "--listen", f"unix:{tmp_path}/g.sock", "--snapshot", str(rules),
            "--geoip-db", str(CITY_DB), "--log-format", "text"]  # fmt: skip
    ways = {
        "flag": ([*base, "--http-listen", "127.0.0.1:0"], {}),
        "variable": (base, {"PDP_HTTP_LISTEN": "127.0.0.1:0"}),
        "config key": ([*base, "--config", str(tmp_path / "pdp.yaml")], {}),
    }
    for way, (argv, extra) in ways.items():
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, **extra})  # fmt: skip
        try:
            assert process.stdout is not None
            lines = [process.stdout.readline() for _ in range(3)]  # printed once signals are caught
            assert lines[2].startswith("AuthZEN listening on http://127.0.0.1:"), (way, lines)
            url = lines[2].split(" on ", 1)[1].strip()
            assert AuthZenClient(url).evaluate(request(CN, tags=["memorial"]))["decision"] is False, way
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, (way, stderr)
        with pytest.raises(ConnectionRefusedError):
            AuthZenClient(url).evaluate(request(CN))  # stopped with the sidecar
