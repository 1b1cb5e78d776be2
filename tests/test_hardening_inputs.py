"""Rules files under attack (issue 12, items 3, 6 and 7, and bugs found in review):
alias bombs, text that cannot be answered, text that is not text, and values the
validator read as something they are not.

Each test goes through what users run: `pdp snapshot validate` and `pdp serve` as
processes (their memory measured by the kernel), a file source followed by a
reloader, and a real gRPC server answering Check and CheckBatch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pdp.bounds import MAX_ID_LENGTH, MAX_TAG_LENGTH
from pdp.client import Client
from pdp.config import ServeConfig
from pdp.geo import GeoDatabase
from pdp.model import Location, Meeting, Verdict
from pdp.reload import Reloader
from pdp.rules import SnapshotError, parse_policy
from pdp.rules.text import MAX_SHADOW_ID_BYTES, MAX_TEXT_BYTES
from pdp.server import start_server
from pdp.sources import open_source
from pdp.state import Active, PolicyHolder
from pdp.wire import encode_batch, encode_result

from .conftest import CITY_DB, replace_file

PDP = [sys.executable, "-m", "pdp"]
CN = "175.16.199.1"
MIB = 1024 * 1024
LONGEST_SHADOWS = MAX_SHADOW_ID_BYTES // 130  # shadow rules with the longest ids (128) one country may have
GOOD = b"version: 5\nrules:\n  - {id: cn, effect: deny, jurisdiction: [CN], legal_basis: Order 17}\n"


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_mb: float  # the command's own peak resident set, as the kernel counted it


# Runs the command as its only child, so that RUSAGE_CHILDREN is that command's alone;
# caps its address space (4 GiB) and CPU time (120 s) so that a regression fails the
# test instead of taking the shared machine.
_MEASURE = """
import resource, subprocess, sys
def cap():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    resource.setrlimit(resource.RLIMIT_CPU, (120, 120))
code = subprocess.call(sys.argv[2:], preexec_fn=cap)
with open(sys.argv[1], "w") as out:
    out.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code if code >= 0 else 128 - code)
"""


def run_measured(tmp_path: Path, *args: str) -> Finished:
    """Run `pdp ARGS`; its output, exit code and peak RSS."""
    rss = tmp_path / "peak-rss-kib"
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(rss), *PDP, *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    return Finished(result.returncode, result.stdout, result.stderr, int(rss.read_text()) / 1024)


# --------------------------------------------------------------------------- 3: alias bombs


def alias_chain(levels: int = 9, width: int = 9) -> str:
    """A flow list of anchors, each listing the previous one ``width`` times: 9 levels
    of 9 are about 450 bytes that expand to 9**9 (387 million) scalars."""
    anchors = ["&a0 [" + ", ".join(["x"] * width) + "]"]
    anchors += [f"&a{n} [" + ", ".join([f"*a{n - 1}"] * width) + "]" for n in range(1, levels)]
    return "[" + ", ".join(anchors) + "]"


BOMBS = {
    # The rules list itself is the expansion: every rule's text is 9**8 scalars.
    "top level": f"version: 5\nanchors: {alias_chain()}\nrules: *a8\n",
    # One rule carries it under a key the validator would name as unknown.
    "inside one rule": (
        "version: 5\nrules:\n"
        "  - {id: cn, effect: deny, jurisdiction: [CN], legal_basis: Order 17}\n"
        f"  - {{id: bomb, effect: allow, jurisdiction: [HK], note: {alias_chain()}}}\n"
    ),
    # A selector list whose items are the chain's lists.
    "inside a selector list": (
        f"version: 5\nrules:\n  - id: bomb\n    effect: allow\n    jurisdiction: [HK]\n"
        f"    meetings:\n      tags: {alias_chain()}\n"
    ),
}


@pytest.mark.parametrize("where", list(BOMBS))
def test_an_alias_bomb_is_refused_by_validate_in_bounded_memory(tmp_path: Path, where: str) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMBS[where])
    assert path.stat().st_size < 700
    result = run_measured(tmp_path, "snapshot", "validate", str(path))
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"{path}:" in result.stderr
    assert "aliases expand" in result.stderr, result.stderr[-2000:]
    assert result.peak_rss_mb < 150, result.peak_rss_mb


def test_an_alias_bomb_stops_pdp_serve_from_a_file_source_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMBS["inside one rule"])
    result = run_measured(
        tmp_path,
        "serve",
        "--listen",
        f"unix:{tmp_path}/pdp.sock",
        "--snapshot",
        path.as_uri(),
        "--geoip-db",
        str(CITY_DB),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "refusing to start" in result.stderr
    assert f"{path.as_uri()}:4: invalid YAML: aliases expand" in result.stderr, result.stderr[-2000:]
    assert result.peak_rss_mb < 200, result.peak_rss_mb


def test_an_alias_bomb_from_the_store_leaves_the_good_policy_serving(tmp_path: Path) -> None:
    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    path = tmp_path / "rules.yaml"
    path.write_bytes(GOOD)
    reloader = Reloader(holder, open_source(path.as_uri()))
    assert reloader.run_once() == "activated version 5"
    for text in BOMBS.values():
        replace_file(path, text.replace("version: 5", "version: 6").encode())
        result = reloader.run_once()
        assert result.startswith("rejected: "), result[:500]
        assert "aliases expand" in result, result[:500]
        assert holder.policy is not None
        assert holder.policy.version == 5


def test_aliases_that_merely_repeat_a_list_are_fine() -> None:
    """What anchors are for: one list of codes reused by many rules."""
    rules = "".join(
        f"  - {{id: r{n}, effect: deny, legal_basis: Order {n}, jurisdiction: *eu, meetings: {{tags: [t{n}]}}}}\n"
        for n in range(200)
    )
    text = "version: 5\ncodes: &eu [AT, BE, BG, HR, CY, CZ, DK, EE, FI, FR, DE, GR, HU, IE, IT, LV, LT]\nrules:\n"
    with pytest.raises(SnapshotError) as refused:  # the top-level helper key is still unknown...
        parse_policy((text + rules).encode(), "eu.yaml")
    assert [problem.message.startswith("unknown key") for problem in refused.value.problems] == [True]
    # ... and anchored where it is first used, the same reuse is a valid snapshot.
    first = rules.replace("jurisdiction: *eu", "jurisdiction: &eu [AT, BE, BG, HR, CY, CZ, DK, EE, FI]", 1)
    policy = parse_policy(("version: 5\nrules:\n" + first).encode(), "eu.yaml")
    assert len(policy.rules) == 200
    assert policy.rules[199].jurisdiction[-1] == "FI"


# --------------------------------------------------------------------------- 6: answers within the message limit


def test_the_largest_checkbatch_answer_the_bounds_allow_fits_4_mib_with_margin() -> None:
    """Worst case from the bounds, through the real encoder: 1,000 participants (the
    default --batch-limit), each denied by a rule with the longest id, reason and legal
    basis (in 4-byte UTF-8 characters) and the most shadow rules one place can meet,
    located at a country with two subdivisions, under the highest version."""
    longest_id = "r" * 128
    text = "\U0001f512" * (MAX_TEXT_BYTES // 4)  # 4 bytes each in UTF-8
    assert len(text.encode()) == MAX_TEXT_BYTES
    shadows = "".join(
        f"  - {{id: {'s' * 126}{n:02d}, effect: deny, mode: shadow, legal_basis: x, jurisdiction: [CN]}}\n"
        for n in range(LONGEST_SHADOWS)
    )
    snapshot = (
        f"version: {2**63 - 1}\nrules:\n"
        f"  - {{id: {longest_id}, effect: deny, jurisdiction: [CN], reason: '{text}', legal_basis: '{text}'}}\n"
        + shadows
    ).encode()
    policy = parse_policy(snapshot, "worst.yaml")
    geo = GeoDatabase(CITY_DB)
    active = Active(policy, geo, "worst.yaml", 0.0)
    results = []
    for n in range(1000):  # a Location object per participant: nothing shared or cached
        location = Location("CN", (f"CN-{n:03d}", f"CN-{n:03d}"))  # the longest codes, and two of them
        decision = policy.decide(location, 1, Meeting("m"), 0.0)
        assert decision.rule_id == longest_id
        assert len(decision.shadow_rule_ids) == LONGEST_SHADOWS
        results.append(encode_result(decision, location, active))
    size = len(encode_batch(results, active))
    # The GeoIP build is this database's; the largest possible adds 5 bytes per answer.
    worst = size + 5 * 1001
    assert worst < 0.8 * 4 * MIB, worst


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("legal_basis", "L" * (MAX_TEXT_BYTES + 1), f"{MAX_TEXT_BYTES + 1} bytes in UTF-8, at most {MAX_TEXT_BYTES}"),
        ("legal_basis", "§" * (MAX_TEXT_BYTES // 2 + 1), f"{MAX_TEXT_BYTES + 2} bytes in UTF-8, at most"),
        ("reason", "R" * 10_000_000, "10000000 bytes in UTF-8, at most"),
    ],
)
def test_a_text_longer_than_an_answer_can_carry_is_refused(
    tmp_path: Path, field: str, value: str, message: str
) -> None:
    rule = {"id": "cn", "effect": "deny", "jurisdiction": ["CN"], "legal_basis": "Order 17", field: value}
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"version": 5, "rules": [rule]}))
    result = run_measured(tmp_path, "snapshot", "validate", str(path))
    assert result.returncode == 1
    assert f"rules[0] (cn).{field}: {message}" in result.stderr, result.stderr[:2000]


@pytest.mark.parametrize(
    ("selector", "length", "bound"),
    [("tags", MAX_TAG_LENGTH + 1, MAX_TAG_LENGTH), ("meeting_ids", MAX_ID_LENGTH + 1, MAX_ID_LENGTH),
     ("host_accounts", MAX_ID_LENGTH + 1, MAX_ID_LENGTH)],
)  # fmt: skip
def test_a_selector_value_no_request_can_carry_is_refused(
    tmp_path: Path, selector: str, length: int, bound: int
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        f"version: 5\nrules:\n  - id: cn\n    effect: allow\n    jurisdiction: [CN]\n"
        f"    meetings:\n      {selector}: [ok, {'v' * length}]\n"
    )
    result = run_measured(tmp_path, "snapshot", "validate", str(path))
    assert result.returncode == 1
    expected = f"{path}:7: rules[0] (cn).meetings.{selector}[1]: {length} characters, longer than"
    assert expected in result.stderr, result.stderr
    assert f"{bound}" in result.stderr
    assert "can never match" in result.stderr


def test_shadow_rules_one_place_can_meet_are_bounded() -> None:
    """By what their ids take in an answer: many short ids, or a few long ones."""
    many = "".join(
        f"  - {{id: s{n}, effect: deny, mode: shadow, legal_basis: x, jurisdiction: [{code}]}}\n"
        for n, code in enumerate(["CN", "CN-BJ", "HK"] * 40)  # 80 short ids reach CN
    )
    assert len(parse_policy(f"version: 5\nrules:\n{many}".encode(), "many.yaml").rules) == 120
    long_ids = "".join(
        f"  - {{id: {code.lower()}{'x' * 120}{n:03d}, effect: deny, mode: shadow, legal_basis: x, "
        f"jurisdiction: [{code}]}}\n"
        for n, code in enumerate(["CN", "CN-BJ", "HK"] * LONGEST_SHADOWS)
    )
    with pytest.raises(SnapshotError) as refused:
        parse_policy(f"version: 5\nrules:\n{long_ids}".encode(), "long.yaml")
    (problem,) = refused.value.problems  # HK's ids take as much as is allowed; CN's (with CN-BJ) more
    # The rules reaching CN (CN and CN-BJ) are those at n % 3 in (0, 1): the one past the bound is n = 12.
    beyond = [n for n in range(3 * LONGEST_SHADOWS) if n % 3 != 2][LONGEST_SHADOWS]
    assert (problem.path.split(" ")[0], problem.line) == (f"rules[{beyond}]", 3 + beyond)
    assert problem.path.endswith(".mode")
    assert (
        f"the {LONGEST_SHADOWS + 1} shadow rules up to this one reaching participants located in CN" in problem.message
    )
    assert f"at most {MAX_SHADOW_ID_BYTES}" in problem.message


def test_the_largest_rules_serve_a_full_default_batch_through_a_real_server(tmp_path: Path) -> None:
    text = "Ünïcödé " * (MAX_TEXT_BYTES // 12)  # 12 bytes each
    snapshot = (
        f"version: 5\nrules:\n  - {{id: {'c' * 128}, effect: deny, jurisdiction: [CN], "
        f"reason: '{text.strip()}', legal_basis: '{text.strip()}'}}\n"
    ).encode()
    holder = PolicyHolder()
    holder.activate(parse_policy(snapshot, "big.yaml"), GeoDatabase(CITY_DB), "big.yaml")
    running = start_server(ServeConfig(listen=f"unix:{tmp_path}/pdp.sock"), holder)
    try:
        with Client(running.address, timeout=30) as client:  # grpc's default 4 MiB receive limit
            results = client.check_batch("m", [CN] * 1000)
            assert [result.verdict for result in results] == [Verdict.DENY] * 1000
    finally:
        running.stop(grace=0)


# --------------------------------------------------------------------------- 7: text that is not text


@pytest.fixture
def followed(tmp_path: Path) -> tuple[Path, Reloader, PolicyHolder]:
    """A file source followed by a reloader, version 5 (CN denied) active."""
    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"version": 5, "rules": [GOOD_RULE]}))
    reloader = Reloader(holder, open_source(path.as_uri()))
    assert reloader.run_once() == "activated version 5"
    return path, reloader, holder


GOOD_RULE = {"id": "cn", "effect": "deny", "jurisdiction": ["CN"], "legal_basis": "Order 17"}


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        ({"legal_basis": "\ud800"}, "rules[0] (cn).legal_basis", "a lone surrogate U+D800"),
        ({"legal_basis": "Order \udfff 17"}, "rules[0] (cn).legal_basis", "a lone surrogate U+DFFF at character 7"),
        ({"reason": "\ud83d"}, "rules[0] (cn).reason", "a lone surrogate U+D83D"),
        ({"meetings": {"tags": ["ok", "\udc80"]}}, "rules[0] (cn).meetings.tags[1]", "a lone surrogate U+DC80"),
        ({"jurisdiction": ["\ud800"]}, "rules[0] (cn).jurisdiction[0]", "a lone surrogate U+D800"),
        ({"id": "\ud800"}, "rules[0].id", "a lone surrogate U+D800"),
        ({"legal_basis": "\u200b"}, "rules[0] (cn).legal_basis", "required for a deny rule"),
        ({"legal_basis": " \u2060\ufeff\u00a0\u3164 "}, "rules[0] (cn).legal_basis", "required for a deny rule"),
        ({"meetings": {"tags": ["\u200b"]}}, "rules[0] (cn).meetings.tags[0]", "only whitespace or invisible"),
        ({"meetings": {"host_accounts": [" "]}}, "rules[0] (cn).meetings.host_accounts[0]", "only whitespace"),
        ({"legal_basis": "Order\x1b[2K 17"}, "rules[0] (cn).legal_basis", "control character U+001B at character 6"),
    ],
)
def test_text_that_is_not_valid_or_visible_is_refused_and_the_good_policy_keeps_denying(
    followed: tuple[Path, Reloader, PolicyHolder], tmp_path: Path, change: dict[str, object], where: str, message: str
) -> None:
    path, reloader, holder = followed
    rule = {**GOOD_RULE, **change}
    data = json.dumps({"version": 6, "rules": [rule]}).encode()  # ensure_ascii: "\ud800" travels as an escape
    replace_file(path, data)
    result = reloader.run_once()
    assert result.startswith("rejected: "), result
    assert f"{where}: " in result, result
    assert message in result, result
    result.encode("utf-8")  # the refusal itself is printable and fits a protobuf string
    assert holder.policy is not None
    assert holder.policy.version == 5
    running = start_server(ServeConfig(listen=f"unix:{tmp_path}/pdp.sock"), holder)
    try:
        with Client(running.address, timeout=10) as client:
            decision = client.check(CN, "m")
            assert (decision.verdict, decision.legal_basis) == (Verdict.DENY, "Order 17")
            assert message in client.status().last_error
    finally:
        running.stop(grace=0)


def test_yaml_cannot_even_write_a_lone_surrogate(tmp_path: Path) -> None:
    """Only JSON's escapes can make one; YAML's parser refuses the escape itself."""
    path = tmp_path / "rules.yaml"
    rule = '  - id: cn\n    effect: deny\n    jurisdiction: [CN]\n    legal_basis: "\\ud800"\n'
    path.write_text("version: 5\nrules:\n" + rule)
    result = run_measured(tmp_path, "snapshot", "validate", str(path))
    assert result.returncode == 1
    assert f"{path}:6: invalid YAML: found invalid Unicode character escape code" in result.stderr, result.stderr


# --------------------------------------------------------------------------- the validator, from review


@pytest.mark.parametrize(
    ("rule", "line", "where", "message"),
    [
        ("id: cn\n    effect: deny\n    jurisdiction: [CN]\n    legal_basis: null", 6,
         "rules[0] (cn).legal_basis", "required for a deny rule"),
        ("id: cn\n    effect: deny\n    jurisdiction: [CN]\n    legal_basis:", 6,
         "rules[0] (cn).legal_basis", "required for a deny rule"),
        ("id: cn\n    effect: deny\n    jurisdiction: [CN]\n    legal_basis: ''", 6,
         "rules[0] (cn).legal_basis", "required for a deny rule"),
        ('id: ""\n    effect: deny\n    jurisdiction: [CN]\n    legal_basis: Order 17', 3,
         "rules[0].id", "must not be empty"),
        ("id: cn\n    effect: ''\n    jurisdiction: [CN]", 4, "rules[0] (cn).effect", "'' is not one of: deny, allow"),
        ("id: cn\n    effect:\n    jurisdiction: [CN]", 4, "rules[0] (cn).effect", "required"),
        ("id: cn\n    effect: allow\n    mode: ''\n    jurisdiction: [CN]", 5,
         "rules[0] (cn).mode", "'' is not one of: enforce, shadow"),
    ],
)  # fmt: skip
def test_empty_and_null_values_are_problems_with_path_and_line(
    tmp_path: Path, rule: str, line: int, where: str, message: str
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(f"version: 5\nrules:\n  - {rule}\n")
    result = run_measured(tmp_path, "snapshot", "validate", str(path))
    assert result.returncode == 1, result.stdout
    assert f"{path}:{line}: {where}: {message}" in result.stderr, result.stderr


def test_an_empty_default_is_a_problem_too(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("version: 5\ndefaults:\n  unknown_location: ''\nrules: []\n")
    result = run_measured(tmp_path, "snapshot", "validate", str(path))
    assert result.returncode == 1
    assert f"{path}:3: defaults.unknown_location: '' is not one of: allow, deny" in result.stderr, result.stderr


# --------------------------------------------------------------------------- signed envelopes, from review


@pytest.mark.parametrize("payload", ["block YAML", "flow YAML", "JSON"])
@pytest.mark.parametrize("trusted", [True, False], ids=["key trusted", "no key"])
def test_a_signed_payload_is_read_in_its_own_format_whatever_the_envelope_is_called(
    tmp_path: Path, payload: str, trusted: bool
) -> None:
    rules = {
        "block YAML": ("rules.yaml", "version: 3\nrules:\n  - id: cn\n    effect: deny\n    jurisdiction: [CN]\n"
                       "    legal_basis: Order 17\n"),
        "flow YAML": ("rules.yaml", "{version: 3, rules: [{id: cn, effect: deny, jurisdiction: [CN], "
                      "legal_basis: Order 17}]}\n"),
        "JSON": ("rules.json", json.dumps({"version": 3, "rules": [GOOD_RULE]}, indent=1)),
    }[payload]  # fmt: skip
    source = tmp_path / rules[0]
    source.write_text(rules[1])
    signed = tmp_path / "rules.signed.json"  # an envelope is JSON, whatever its payload is
    keys = tmp_path / "k"
    assert subprocess.run([*PDP, "keygen", "--out", str(keys)], capture_output=True, check=False).returncode == 0
    signing = subprocess.run(
        [*PDP, "snapshot", "sign", str(source), "--key", f"{keys}.key", "--out", str(signed)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert signing.returncode == 0, signing.stderr
    target = f"unix:{tmp_path}/pdp.sock"
    pubkey = ["--snapshot-pubkey", f"{keys}.pub"] if trusted else []
    process = subprocess.Popen(
        [*PDP, "serve", "--listen", target, "--snapshot", signed.as_uri(), "--geoip-db", str(CITY_DB), *pubkey],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()  # blocks until it listens, or has exited
        assert "policy version 3 (1 rules)" in banner, banner + (process.stderr.read() if process.stderr else "")
        with Client(target, timeout=10) as client:
            assert client.check(CN, "m").verdict == Verdict.DENY
    finally:
        process.terminate()
        process.communicate(timeout=30)
