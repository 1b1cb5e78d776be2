"""pdp snapshot promote: the candidate's rules published as the next version, signed, to real stores."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import redis

from pdp.diff import diff_policies
from pdp.reload import read_snapshot
from pdp.rules import load_policy, parse_policy
from pdp.signing import TrustedKeys, is_envelope, open_envelope

from .servers import RedisServer

PDP = [sys.executable, "-m", "pdp"]

ACTIVE = """\
version: 7
rules:
  - {id: cn-memorial, effect: deny, jurisdiction: [CN], meetings: {tags: [memorial]}, legal_basis: Order 17/2020}
"""
CANDIDATE = """\
# The HK order, reviewed in shadow for a day.
version: 1   # the draft's own number; promote replaces it
rules:
  - {id: cn-memorial, effect: deny, jurisdiction: [CN], meetings: {tags: [memorial]}, legal_basis: Order 17/2020}
  - id: hk-memorial
    effect: deny
    jurisdiction: [HK]      # not CN: a distinct code
    meetings: {tags: [memorial]}
    legal_basis: HK order 2026/1
"""


def pdp(*arguments: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PDP, *map(str, arguments)], capture_output=True, text=True, timeout=60, check=False)


def keys(tmp_path: Path) -> tuple[Path, Path]:
    assert pdp("keygen", "--out", tmp_path / "signing").returncode == 0
    return tmp_path / "signing.key", tmp_path / "signing.pub"


def test_promote_publishes_the_candidate_as_the_next_version_signed(tmp_path: Path) -> None:
    private, public = keys(tmp_path)
    (tmp_path / "active.yaml").write_text(ACTIVE)
    store = tmp_path / "store" / "rules.yaml"
    store.parent.mkdir()
    assert (
        pdp("snapshot", "publish", tmp_path / "active.yaml", "--to", f"file://{store}", "--key", private).returncode
        == 0
    )
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(CANDIDATE)
    result = pdp(
        "snapshot", "promote", candidate, "--to", f"file://{store}", "--key", private, "--pubkey", public
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"active version 7 at file://{store}; the candidate adds 1, removes 0 and changes 0 rules" in result.stdout
    assert f"promoted {candidate} as version 8 (signed) to file://{store}" in result.stdout
    data = store.read_bytes()
    policy = read_snapshot(data, TrustedKeys.from_files([str(public)]), str(store))  # what a sidecar does
    assert policy.version == 8
    assert diff_policies(load_policy(candidate), policy).rules_equal
    payload = open_envelope(data).payload.decode()
    assert payload == CANDIDATE.replace("version: 1   # the draft's", "version: 8  # the draft's")  # only the version


def test_a_version_not_above_the_active_one_is_refused_and_nothing_written(tmp_path: Path) -> None:
    store = tmp_path / "rules.yaml"
    store.write_text(ACTIVE)
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(CANDIDATE)
    for version in ("7", "3"):
        result = pdp("snapshot", "promote", candidate, "--to", f"file://{store}", "--version", version)
        assert result.returncode == 2
        assert f"version {version} is not above the active 7: sidecars would refuse it" in result.stderr
    assert store.read_text() == ACTIVE
    given = pdp("snapshot", "promote", candidate, "--to", f"file://{store}", "--version", "20")
    assert given.returncode == 0, given.stderr
    assert parse_policy(store.read_bytes(), "rules.yaml").version == 20


def test_an_empty_store_needs_an_explicit_version(tmp_path: Path) -> None:
    store = tmp_path / "new" / "rules.json"
    store.parent.mkdir()
    candidate = tmp_path / "candidate.json"
    candidate.write_text(json.dumps({"version": 1, "rules": [{"id": "hk", "effect": "deny", "jurisdiction": ["HK"],
                                                             "legal_basis": "HK order 2026/1"}]}))  # fmt: skip
    refused = pdp("snapshot", "promote", candidate, "--to", f"file://{store}")
    assert refused.returncode == 2
    assert "cannot tell the active version" in refused.stderr
    assert "pass --version N" in refused.stderr
    assert not store.exists()
    result = pdp("snapshot", "promote", candidate, "--to", f"file://{store}", "--version", "1")
    assert result.returncode == 0, result.stderr
    assert store.read_bytes() == candidate.read_bytes()  # same version: published as it is
    again = pdp("snapshot", "promote", candidate, "--to", f"file://{store}")
    assert again.returncode == 0, again.stderr
    assert json.loads(store.read_text())["version"] == 2  # JSON is rewritten with the next version


def test_a_signed_candidate_needs_a_key_to_be_signed_again(tmp_path: Path) -> None:
    private, public = keys(tmp_path)
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(CANDIDATE)
    signed = tmp_path / "candidate.signed"
    assert pdp("snapshot", "sign", candidate, "--key", private, "--out", signed).returncode == 0
    store = tmp_path / "rules.yaml"
    store.write_text(ACTIVE)
    refused = pdp("snapshot", "promote", signed, "--to", f"file://{store}", "--pubkey", public)
    assert refused.returncode == 2
    assert "is signed: pass --key" in refused.stderr
    tampered = tmp_path / "tampered.signed"
    envelope = json.loads(signed.read_bytes())
    envelope["payload"] = base64.b64encode(CANDIDATE.replace("HK order", "XX order").encode()).decode()
    tampered.write_text(json.dumps(envelope))
    bad = pdp("snapshot", "promote", tampered, "--to", f"file://{store}", "--pubkey", public, "--key", private)
    assert bad.returncode == 2
    assert "signature" in bad.stderr
    assert store.read_text() == ACTIVE


def test_promote_from_the_candidate_url_to_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    private, public = keys(tmp_path)
    (tmp_path / "active.yaml").write_text(ACTIVE)
    (tmp_path / "candidate.yaml").write_text(CANDIDATE)
    active_url, candidate_url = redis_server.url("pdp:snapshot"), redis_server.url("pdp:candidate")
    for name, url in (("active.yaml", active_url), ("candidate.yaml", candidate_url)):
        assert pdp("snapshot", "publish", tmp_path / name, "--to", url, "--key", private).returncode == 0
    result = pdp("snapshot", "promote", candidate_url, "--to", active_url, "--key", private, "--pubkey", public)
    assert result.returncode == 0, result.stderr
    stored = redis.Redis(port=redis_server.port).get("pdp:snapshot")
    assert isinstance(stored, bytes)
    assert is_envelope(stored)
    policy = read_snapshot(stored, TrustedKeys.from_files([str(public)]), active_url)
    assert policy.version == 8
    assert sorted(policy.by_id) == ["cn-memorial", "hk-memorial"]
