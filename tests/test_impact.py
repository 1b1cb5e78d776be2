"""pdp snapshot impact: replaying real audit logs, written by a real `pdp serve`, against candidates."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pdp import archive
from pdp.audit import key_id, pseudonym

from .replaylogs import (
    ACTIVE,
    CN,
    HK,
    HK_MEMORIAL_RULE,
    KEY,
    Sidecar,
    enforced,
    impact,
    records,
    retimed,
    run_sidecar,
    scripted_traffic,
)

EXIT_SAME, EXIT_FLIPS, EXIT_ERROR, EXIT_BOUNDARY = 0, 1, 2, 4


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Sidecar:
    """One real sidecar's audit log under the scripted traffic, every ALLOW recorded."""
    with run_sidecar(tmp_path_factory.mktemp("served")) as sidecar:
        scripted_traffic(sidecar.client)
    return sidecar


def candidate(folder: Path, text: str, name: str = "candidate.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def replay_json(*arguments: str | Path, expect: int = EXIT_FLIPS) -> dict[str, Any]:
    result = impact(*arguments, "--json", "--samples", "100000")
    assert result.returncode == expect, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def flipped_ids(document: dict[str, Any]) -> set[str]:
    return {sample["decision_id"] for sample in document["samples"]}


def without(rule_id: str) -> str:
    """ACTIVE as version 2, without one rule."""
    head, *blocks = ACTIVE.replace("version: 1", "version: 2").split("  - id: ")
    return head + "".join(f"  - id: {block}" for block in blocks if not block.startswith(f"{rule_id}\n"))


def with_key(sidecar: Sidecar) -> list[str | Path]:
    return ["--state-dir", sidecar.state_dir, "--audit-hmac-key-file", sidecar.key_file]


# --------------------------------------------------------------------------- the audit log carries the replay


def test_every_recorded_decision_carries_what_a_replay_needs(served: Sidecar) -> None:
    lines = records(served.audit_log)
    decisions = enforced(served.audit_log)
    assert len(decisions) == 144  # every decision of the scripted traffic, ALLOWs sampled at 1.0
    sha = hashlib.sha256(served.rules.read_bytes()).hexdigest()
    for record in decisions:
        assert {"location", "meeting_id", "tags", "host_account", "action", "verdict", "rule_id", "time"} <= set(record)
        assert (record["policy_version"], record["policy_sha256"]) == (1, sha)
        assert (record["allow_sample_rate"], record["hmac_key_id"]) == (1.0, key_id(KEY))
    memorial = [r for r in decisions if r["meeting_id"] == "m-memorial-2"]
    assert {tuple(r["tags"]) for r in memorial} == {("memorial", "public")}
    hosts = {r["meeting_id"]: r["host_account"] for r in decisions}
    assert hosts == {
        "m-memorial-1": pseudonym(KEY, "acme-corp"),
        "m-memorial-2": pseudonym(KEY, "host-2"),
        "m-town-hall": pseudonym(KEY, "host-3"),
        "m-plain": "",
    }
    text = served.audit_log.read_text()
    for raw in ("acme-corp", "host-2", "acct-1-0", "user-1", *CN, *HK):
        assert f'"{raw}"' not in text  # host accounts are personal data: pseudonyms only
    assert len(lines) > len(decisions)  # shadow-match lines too, which a replay must not count again
    assert [entry.version for entry in archive.entries(served.state_dir)] == [1]


# --------------------------------------------------------------------------- the acceptance cases


def test_an_hk_memorial_deny_flips_exactly_the_recorded_hk_memorial_joins(served: Sidecar, tmp_path: Path) -> None:
    new = candidate(tmp_path, ACTIVE.replace("version: 1", "version: 2") + HK_MEMORIAL_RULE)
    document = replay_json(new, "--audit-log", served.audit_log, *with_key(served))
    expected = {
        r["decision_id"]
        for r in enforced(served.audit_log)
        if r["location"]["country"] == "HK" and "memorial" in r["tags"] and r["action"] == "join"
    }
    assert len(expected) == 6  # 3 HK participants x 2 memorial meetings
    assert flipped_ids(document) == expected
    assert document["flips"]["records"] == 6
    assert [row["key"] for row in document["flips"]["by_rule"]] == [["hk-memorial", "HK order 2026/1"]]
    assert [row["key"] for row in document["flips"]["by_jurisdiction"]] == [["HK"]]
    assert [row["key"] for row in document["flips"]["by_direction"]] == [["ALLOW->DENY"]]
    assert {tuple(row["key"]) for row in document["flips"]["by_meeting"]} == {("m-memorial-1",), ("m-memorial-2",)}
    assert document["baselines"]["disagreements"] == 0
    assert document["baselines"]["by_policy"][0]["decided_again_from"].startswith(str(served.state_dir))
    assert document["changed_rules"] == {"hk-memorial": "added since version 1"}
    boundary = document["boundary"]
    assert boundary["holds"]
    assert boundary["rules"] == [
        {"rule_id": "hk-memorial", "change": "added since version 1", "jurisdiction": ["HK"], "flips": 6,
         "decisions": 6, "located_in": ["HK"], "outside": 0},
    ]  # fmt: skip


def test_narrowing_a_window_flips_exactly_the_decisions_in_the_removed_interval(
    served: Sidecar, tmp_path: Path
) -> None:
    # The server decided now; only the time field of its records is rewritten: line n at March 1 + n hours.
    log = tmp_path / "march.jsonl"
    start = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    rewritten = retimed(served.audit_log, log, start, dt.timedelta(hours=1))
    narrowed = ACTIVE.replace("version: 1", "version: 2").replace(
        "    valid_from: 2020-01-01T00:00:00Z\n",
        "    valid_from: 2026-03-02T18:00:00Z\n    valid_until: 2026-03-02T20:00:00Z\n",
    )
    new = candidate(tmp_path, narrowed)
    document = replay_json(new, "--audit-log", log, *with_key(served))
    window = (dt.datetime(2026, 3, 2, 18, tzinfo=dt.UTC), dt.datetime(2026, 3, 2, 20, tzinfo=dt.UTC))
    expected = {
        r["decision_id"]
        for r in rewritten
        if r["mode"] == "enforce"
        and r["rule_id"] == "cn-memorial"
        and not window[0] <= dt.datetime.fromisoformat(r["time"]) < window[1]
    }
    kept = [r for r in rewritten if r["rule_id"] == "cn-memorial" and r["mode"] == "enforce"]
    assert 0 < len(expected) < len(kept)  # some denials fall inside the new window, some outside
    assert flipped_ids(document) == expected
    assert [row["key"] for row in document["flips"]["by_direction"]] == [["DENY->ALLOW"]]
    assert [row["key"] for row in document["flips"]["by_rule"]] == [["cn-memorial", "Order 17/2020"]]
    assert document["baselines"]["disagreements"] == 0  # version 1 still decides every rewritten record as logged
    assert document["changed_rules"] == {"cn-memorial": "changed since version 1"}
    assert document["boundary"]["holds"]


@pytest.mark.parametrize("same", ["the active file", "a new version with the same rules"])
def test_a_candidate_equal_to_the_active_policy_flips_none(served: Sidecar, tmp_path: Path, same: str) -> None:
    new = served.rules if same == "the active file" else candidate(tmp_path, ACTIVE.replace("version: 1", "version: 9"))
    document = replay_json(new, "--audit-log", served.audit_log, *with_key(served), expect=EXIT_SAME)
    assert document["flips"]["records"] == 0
    assert document["samples"] == []
    assert document["sampling"]["records"] == 144
    assert document["baselines"]["disagreements"] == 0
    assert document["changed_rules"] == {}
    markdown = impact(new, "--audit-log", served.audit_log, *with_key(served))
    assert markdown.returncode == EXIT_SAME
    assert "**0 recorded decisions flip, standing for 0 decisions**" in markdown.stdout


def test_counts_scale_by_the_recorded_sample_rate(served: Sidecar, tmp_path: Path) -> None:
    with run_sidecar(tmp_path / "sampled", sample_rate=0.25) as sampled:
        scripted_traffic(sampled.client, rounds=8)
    logs = (served.audit_log, sampled.audit_log)
    hk_joins = [
        sum(1 for r in enforced(log) if r["location"]["country"] == "HK" and "memorial" in r["tags"]
            and r["action"] == "join")
        for log in logs
    ]  # fmt: skip
    us_hosts = [sum(1 for r in enforced(log) if r["rule_id"] == "us-wa-host") for log in logs]
    assert hk_joins[1] > 0
    assert us_hosts == [12, 96]  # a DENY is always recorded: 3 US-WA hosts x 4 meetings x rounds
    # The candidate adds the HK deny (ALLOW->DENY: sampled) and drops the US-WA one (DENY->ALLOW: exact).
    new = candidate(tmp_path, without("us-wa-host") + HK_MEMORIAL_RULE)
    document = replay_json(new, "--audit-log", *logs, *with_key(served))
    by_direction = {row["key"][0]: row for row in document["flips"]["by_direction"]}
    assert by_direction["ALLOW->DENY"]["flips"] == sum(hk_joins)
    assert by_direction["ALLOW->DENY"]["decisions"] == hk_joins[0] * 1 + hk_joins[1] * 4
    assert by_direction["DENY->ALLOW"]["flips"] == by_direction["DENY->ALLOW"]["decisions"] == sum(us_hosts)
    rates = {row["rate"]: row for row in document["sampling"]["allow"]}
    assert set(rates) == {0.25, 1.0}
    assert rates[0.25]["scale"] == 4
    assert rates[0.25]["decisions"] == rates[0.25]["records"] * 4
    markdown = impact(new, "--audit-log", *logs, *with_key(served)).stdout
    assert "- ALLOW: sampled at 0.25 (scale 4):" in markdown
    assert "- DENY: every one is recorded (scale 1):" in markdown


def test_damaged_and_foreign_lines_are_counted_and_skipped_with_their_line_number(
    served: Sidecar, tmp_path: Path
) -> None:
    real = served.audit_log.read_text().splitlines()
    decision = next(line for line in real if '"mode":"enforce"' in line)
    old = json.loads(decision)
    for name in ("tags", "host_account", "policy_sha256", "allow_sample_rate", "hmac_key_id"):
        del old[name]  # as an older pdp wrote it
    wrong_type = json.loads(decision) | {"tags": "memorial"}
    log = tmp_path / "audit.jsonl"
    lines = [
        decision,                                              # 1 fine
        "this is not json",                                    # 2 malformed
        '{"level":"info","msg":"nginx started"}',             # 3 foreign
        "[1, 2, 3]",                                           # 4 foreign
        json.dumps(old),                                       # 5 old format
        json.dumps(wrong_type),                                # 6 malformed
        "",                                                    # blank: ignored
    ]  # fmt: skip
    log.write_bytes("\n".join(lines).encode() + b"\n" + b'{"bad": "\xff\xfe"}\n' + decision[:90].encode())
    rotated = tmp_path / "audit.jsonl.1"
    rotated.write_text("\n".join(real) + "\n")
    packed = tmp_path / "audit.jsonl.2.gz"
    packed.write_bytes(gzip.compress(("\n".join(real) + "\n").encode()))
    cut = tmp_path / "audit.jsonl.3.gz"
    cut.write_bytes(gzip.compress(("\n".join(real) + "\n").encode())[:-400])
    new = candidate(tmp_path, ACTIVE.replace("version: 1", "version: 2") + HK_MEMORIAL_RULE)
    document = replay_json(new, "--audit-log", log, rotated, packed, cut, *with_key(served))
    skipped = document["logs"]["skipped"]
    assert {kind: entry["lines"] for kind, entry in skipped.items()} == {
        "malformed": 3, "truncated": 1 + 1, "foreign": 2, "old format": 1, "other key": 0,
    }  # fmt: skip
    assert skipped["malformed"]["first"][0].startswith(f"{log}:2: not JSON")
    assert skipped["malformed"]["first"][1] == f"{log}:6: tags is not a list of strings"
    assert skipped["malformed"]["first"][2] == f"{log}:8: not UTF-8"
    assert [entry.split(": ")[0] for entry in skipped["foreign"]["first"]] == [f"{log}:3", f"{log}:4"]
    assert skipped["old format"]["first"] == [f"{log}:5: no tags, host_account, policy_sha256, allow_sample_rate"]
    assert skipped["truncated"]["first"][0].startswith(f"{log}:9: ends mid-record")
    assert skipped["truncated"]["first"][1].startswith(f"{cut}:")
    # The good line once, the rotated file, the gzip file, and what the cut gzip held before its cut:
    # each decision once (decision_id), however many copies of the log were given.
    assert document["sampling"]["records"] == 144
    assert document["logs"]["duplicates"] > 144
    assert document["flips"]["records"] == 6


def test_records_under_another_key_are_skipped_not_mismatched(served: Sidecar, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    other.write_bytes(b"another-key-of-32-bytes-00000000")
    new = candidate(tmp_path, ACTIVE.replace("version: 1", "version: 2") + HK_MEMORIAL_RULE)
    document = replay_json(
        new, "--audit-log", served.audit_log, "--state-dir", served.state_dir, "--audit-hmac-key-file", other,
        expect=EXIT_SAME,
    )  # fmt: skip
    assert document["logs"]["skipped"]["other key"]["lines"] == 144
    assert document["sampling"]["records"] == 0


def test_host_accounts_are_matched_through_the_audit_key(served: Sidecar, tmp_path: Path) -> None:
    # The exception moves from acme-corp's meetings to host-2's.
    moved = ACTIVE.replace("version: 1", "version: 2").replace("host_accounts: [acme-corp]", "host_accounts: [host-2]")
    new = candidate(tmp_path, moved)
    refused = impact(new, "--audit-log", served.audit_log, "--state-dir", served.state_dir)
    assert refused.returncode == EXIT_ERROR
    assert "cn-enterprise-exception selects host_accounts" in refused.stderr
    assert "--audit-hmac-key-file" in refused.stderr
    document = replay_json(new, "--audit-log", served.audit_log, *with_key(served))
    cn_memorial_joins = {
        (r["decision_id"], r["meeting_id"])
        for r in enforced(served.audit_log)
        if r["location"]["country"] == "CN" and "memorial" in r["tags"] and r["action"] == "join"
    }
    assert {d for d, _ in cn_memorial_joins} == flipped_ids(document)
    directions = {tuple(row["key"]): row["flips"] for row in document["flips"]["by_direction"]}
    assert directions == {("ALLOW->DENY",): len(CN), ("DENY->ALLOW",): len(CN)}
    rules = {row["key"][0]: row["flips"] for row in document["flips"]["by_rule"]}
    assert rules == {"cn-memorial": len(CN), "cn-enterprise-exception": len(CN)}


def test_against_replaces_the_baseline(served: Sidecar, tmp_path: Path) -> None:
    old = candidate(tmp_path, "version: 0\nrules: []\n", "empty.yaml")
    document = replay_json(served.rules, "--audit-log", served.audit_log, "--against", old, *with_key(served))
    assert document["against"] == str(old)
    expected = {r["decision_id"] for r in enforced(served.audit_log) if r["verdict"] == "DENY"}
    assert flipped_ids(document) == expected  # against no rules, every recorded DENY is a new one
    assert document["baselines"]["by_policy"] == []


def test_without_the_snapshot_the_recorded_verdict_is_the_baseline(served: Sidecar, tmp_path: Path) -> None:
    new = candidate(tmp_path, ACTIVE.replace("version: 1", "version: 2") + HK_MEMORIAL_RULE)
    document = replay_json(new, "--audit-log", served.audit_log, "--audit-hmac-key-file", served.key_file)
    assert document["baselines"]["by_policy"][0]["decided_again_from"] is None
    assert document["flips"]["records"] == 6
    assert any("no snapshot a record names was found" in note for note in document["notes"])
    from_folder = replay_json(
        new, "--audit-log", served.audit_log, "--audit-hmac-key-file", served.key_file, "--snapshots", served.rules
    )
    assert from_folder["baselines"]["by_policy"][0]["decided_again_from"] == str(served.rules)


def test_a_flip_outside_the_rules_jurisdiction_fails_loudly(served: Sidecar, tmp_path: Path) -> None:
    # pdp cannot produce such a record; a forged one (a CN denial relocated to Hong Kong) shows the check bites.
    lines = served.audit_log.read_text().splitlines()
    forged = []
    for number, line in enumerate(lines):
        record = json.loads(line)
        if record["rule_id"] == "cn-memorial" and record["mode"] == "enforce":
            record["location"] = {"country": "HK", "subdivisions": []}
            forged.append(record["decision_id"])
            lines[number] = json.dumps(record)
            break
    log = tmp_path / "forged.jsonl"
    log.write_text("\n".join(lines) + "\n")
    new = candidate(tmp_path, without("cn-memorial"))  # every cn-memorial denial flips, the forged one too
    document = replay_json(new, "--audit-log", log, *with_key(served), expect=EXIT_BOUNDARY)
    assert not document["boundary"]["holds"]
    assert [v["decision_id"] for v in document["boundary"]["violations"]] == forged
    assert document["boundary"]["violations"][0]["outside"] == ["cn-memorial"]
    assert document["baselines"]["disagreements"] == 1  # and version 1 does not reproduce the forged record
    result = impact(new, "--audit-log", log, *with_key(served))
    assert result.returncode == EXIT_BOUNDARY
    assert "BOUNDARY VIOLATED" in result.stdout
    assert "BOUNDARY VIOLATED by 1 flipped decisions" in result.stderr


# --------------------------------------------------------------------------- formats and errors


def test_markdown_csv_and_chart(served: Sidecar, tmp_path: Path) -> None:
    new = candidate(tmp_path, ACTIVE.replace("version: 1", "version: 2") + HK_MEMORIAL_RULE)
    chart = tmp_path / "impact.png"
    result = impact(new, "--audit-log", served.audit_log, *with_key(served), "--chart", chart)
    assert result.returncode == EXIT_FLIPS
    for heading in (
        "## Sampling",
        "## Baseline",
        "### By jurisdiction",
        "### By rule",
        "### By legal basis",
        "### By meeting",
        "### By action",
        "## Boundary",
        "## Sample records",
        "## Lines not replayed",
    ):
        assert heading in result.stdout  # fmt: skip
    assert "| hk-memorial | added since version 1 | HK | 6 | 6 | HK | 0 |" in result.stdout
    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    table = impact(new, "--audit-log", served.audit_log, *with_key(served), "--format", "csv").stdout.splitlines()
    assert (
        table[0] == "jurisdiction,rule_id,legal_basis,meeting_id,action,direction,flips,decisions,distinct_participants"
    )
    assert sorted(table[1:]) == [
        "HK,hk-memorial,HK order 2026/1,m-memorial-1,join,ALLOW->DENY,3,3.0,3",
        "HK,hk-memorial,HK order 2026/1,m-memorial-2,join,ALLOW->DENY,3,3.0,3",
    ]


def test_bad_inputs_exit_2_naming_what_is_wrong(served: Sidecar, tmp_path: Path) -> None:
    bad = candidate(tmp_path, "version: 2\nrules:\n  - {id: x, effect: deny, jurisdiction: [XX]}\n", "bad.yaml")
    short = tmp_path / "short.key"
    short.write_bytes(b"0123456789")
    cases = {
        "bad.yaml": (bad, "--audit-log", served.audit_log),
        "missing.jsonl": (served.rules, "--audit-log", tmp_path / "missing.jsonl", *with_key(served)),
        "--since": (served.rules, "--audit-log", served.audit_log, "--since", "yesterday", *with_key(served)),
        "shorter than 16 bytes": (served.rules, "--audit-log", served.audit_log, "--audit-hmac-key-file", short),
    }
    for expected, arguments in cases.items():
        result = impact(*arguments)
        assert result.returncode == EXIT_ERROR, (expected, result.stderr)
        assert expected in result.stderr
        assert "Traceback" not in result.stderr


def test_the_archive_keeps_the_newest_versions(tmp_path: Path) -> None:
    folder = tmp_path / archive.ARCHIVE_DIR
    folder.mkdir()
    left = folder / f".v3-{3:064x}.yaml.k2j4l1"  # what a kill between write and rename leaves
    left.write_text("half a snap")
    for version in range(1, 7):
        archive.keep(tmp_path, f"version: {version}\nrules: []\n".encode(), version, f"{version:064x}", limit=3)
    assert sorted(entry.version for entry in archive.entries(tmp_path)) == [4, 5, 6]
    assert sorted(path.name for path in folder.iterdir()) == [f"v{v}-{v:064x}" for v in (4, 5, 6)]
    shutil.rmtree(tmp_path / archive.ARCHIVE_DIR)
    assert archive.entries(tmp_path) == []
