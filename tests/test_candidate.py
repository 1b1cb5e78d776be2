"""A candidate snapshot in shadow, live: a real `pdp serve --candidate-snapshot` under scripted traffic."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from pdp.client import Client
from pdp.model import Action, Verdict

from .replaylogs import (
    ACTIVE,
    CN,
    HK,
    HK_MEMORIAL_RULE,
    MEETINGS,
    enforced,
    impact,
    records,
    run_sidecar,
    scripted_traffic,
)
from .servers import free_port

PDP = [sys.executable, "-m", "pdp"]

# Three kinds of change at once: a new deny (HK), a removed deny (US-WA hosts),
# and an exception moved to another host account (pseudonymised offline, raw live).
CANDIDATE = (
    ACTIVE.replace("version: 1", "version: 2")
    .replace("host_accounts: [acme-corp]", "host_accounts: [host-2]")
    .split("  - id: us-wa-host")[0]
    + "  - id: gb-eng-draft"
    + ACTIVE.split("  - id: gb-eng-draft")[1]
    + HK_MEMORIAL_RULE
)


def live_flips(status: Any) -> Counter[tuple[str, str, str]]:
    counts: Counter[tuple[str, str, str]] = Counter()
    for row in status.candidate.flips_by_rule:
        direction = f"{Verdict(row.verdict).name}->{Verdict(row.candidate_verdict).name}"
        counts[(row.rule_id, row.jurisdiction, direction)] += row.count
    return counts


def offline_flips(document: dict[str, Any]) -> Counter[tuple[str, str, str]]:
    counts: Counter[tuple[str, str, str]] = Counter()
    for group in document["flips"]["groups"]:
        counts[(group["rule_id"], group["jurisdiction"], group["direction"])] += group["flips"]
    return counts


def test_live_counts_equal_the_offline_impact_over_the_same_traffic(tmp_path: Path) -> None:
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(CANDIDATE)
    with run_sidecar(tmp_path / "live", extra=("--candidate-snapshot", str(candidate))) as sidecar:
        made = scripted_traffic(sidecar.client, rounds=2)
        status = sidecar.client.status()
    assert status.candidate.policy_version == 2
    assert status.candidate.source == f"file://{candidate}"
    assert status.candidate.decisions == made == 288
    assert status.candidate.dropped == 0
    live = live_flips(status)
    assert sum(live.values()) == status.candidate.flips > 0
    # The same traffic, replayed from the audit log the same server wrote (every ALLOW recorded):
    result = impact(
        candidate, "--audit-log", sidecar.audit_log, "--state-dir", sidecar.state_dir,
        "--audit-hmac-key-file", sidecar.key_file, "--json", "--samples", "0",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert document["sampling"]["records"] == made
    assert offline_flips(document) == live
    assert set(live) == {
        ("hk-memorial", "HK", "ALLOW->DENY"),
        ("cn-memorial", "CN", "ALLOW->DENY"),  # acme-corp's meeting lost its exception
        ("cn-enterprise-exception", "CN", "DENY->ALLOW"),  # host-2's meeting gained it
        ("us-wa-host", "US-WA", "DENY->ALLOW"),
    }
    # The audit log says, record by record, what the candidate would have answered.
    decisions = enforced(sidecar.audit_log)
    assert all(record["candidate_version"] == 2 for record in records(sidecar.audit_log))
    flipped = [r for r in decisions if r["candidate_verdict"] != r["verdict"]]
    assert len(flipped) == status.candidate.flips
    assert Counter(r["candidate_rule_id"] for r in flipped if r["candidate_verdict"] == "DENY") == {
        "hk-memorial": live[("hk-memorial", "HK", "ALLOW->DENY")],
        "cn-memorial": live[("cn-memorial", "CN", "ALLOW->DENY")],
    }


def test_the_candidate_never_changes_an_answer(tmp_path: Path) -> None:
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(CANDIDATE)
    answers = {}
    for name, extra in (("without", ()), ("with", ("--candidate-snapshot", str(candidate)))):
        with run_sidecar(tmp_path / name, sample_rate=0.0, extra=extra) as sidecar:
            client = sidecar.client
            answers[name] = [
                (r.verdict, r.rule_id, r.reason, r.legal_basis, r.policy_version, r.shadow_rule_ids)
                for meeting in MEETINGS
                for action in (Action.JOIN, Action.HOST)
                for r in client.check_batch(
                    meeting.meeting_id, [*CN, *HK], tags=meeting.tags, host_account_id=meeting.host, action=action
                )
            ]
            if extra:
                assert client.status().candidate.flips > 0  # it would have changed some of them
    assert answers["with"] == answers["without"]


def test_a_bad_candidate_is_refused_said_and_never_stops_the_sidecar(tmp_path: Path) -> None:
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text("version: 2\nrules:\n  - {id: x, effect: deny, jurisdiction: [XX]}\n")
    with run_sidecar(tmp_path / "bad", extra=("--candidate-snapshot", str(candidate), "--poll-seconds", "0.2")) as s:
        first = s.client.check(CN[0], "m-memorial-2", tags=["memorial"])
        status = s.client.status()
        assert (first.verdict, first.rule_id) == (Verdict.DENY, "cn-memorial")
        assert status.candidate.policy_version == 0
        assert "XX" in status.candidate.last_error
        assert status.candidate.decisions == 0
        candidate.write_text(CANDIDATE)  # fixed: followed like the active snapshot
        status = wait_for(s.client, lambda st: st.candidate.policy_version == 2)
        assert status.candidate.last_error == ""
        s.client.check(HK[0], "m-memorial-2", tags=["memorial"])
        status = s.client.status()
        assert status.candidate.decisions == 1
        assert live_flips(status) == {("hk-memorial", "HK", "ALLOW->DENY"): 1}
        assert status.policy_version == 1  # the active policy never moved


def test_flips_are_exported_as_pdp_candidate_flips(tmp_path: Path) -> None:
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(CANDIDATE)
    port = free_port()
    environ = {"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": str(port)}
    extra = ("--candidate-snapshot", str(candidate))
    with run_sidecar(tmp_path / "metrics", extra=extra, env=environ) as sidecar:
        sidecar.client.check(HK[0], "m-memorial-2", tags=["memorial"])
        sidecar.client.check(HK[1], "m-memorial-2", tags=["memorial"])
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    lines = [line for line in scraped.splitlines() if line.startswith("pdp_candidate_flips")]
    assert len(lines) == 1, scraped
    assert 'rule_id="hk-memorial"' in lines[0]
    assert 'jurisdiction="HK"' in lines[0]
    assert 'candidate_verdict="DENY"' in lines[0]
    assert lines[0].endswith(" 2.0")


def test_promote_makes_the_candidate_the_active_policy(tmp_path: Path) -> None:
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(CANDIDATE)
    with run_sidecar(
        tmp_path / "promote", extra=("--candidate-snapshot", str(candidate), "--poll-seconds", "0.2")
    ) as s:
        events = s.client.watch_policy(timeout=30)
        assert next(events).policy_version == 1
        s.client.check(HK[0], "m-memorial-2", tags=["memorial"])  # allowed; the candidate would deny
        promoted = subprocess.run(
            [*PDP, "snapshot", "promote", candidate, "--to", f"file://{s.rules}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert promoted.returncode == 0, promoted.stderr
        assert next(events).policy_version == 2  # the sidecar activated it
        answer = s.client.check(HK[0], "m-memorial-2", tags=["memorial"])
        assert (answer.verdict, answer.rule_id) == (Verdict.DENY, "hk-memorial")
        status = s.client.status()
    assert status.policy_version == 2
    assert status.candidate.policy_version == 2
    assert (status.candidate.decisions, status.candidate.flips) == (2, 1)  # none since: they agree now


def wait_for(client: Client, condition: Any, seconds: float = 20.0) -> Any:
    """GetStatus until ``condition`` holds (each call a real round trip), or fail."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = client.status()
        if condition(status):
            return status
    raise AssertionError(f"not reached within {seconds} s: {status}")
