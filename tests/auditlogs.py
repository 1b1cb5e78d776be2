"""Audit logs for report tests, written by a real `pdp serve` under scripted traffic.

A real server writes its records within a second or two; a report over an
hour, a day, a month or a year needs records spread over that span. So
:func:`spread` copies a real log and rewrites the ``time`` field of each record,
and nothing else: every other field, the key order and the encoding stay as the
server wrote them, and the new times keep the server's format.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pdp.client import Client
from pdp.model import Action

from .conftest import CITY_DB

PDP = [sys.executable, "-m", "pdp"]

SNAPSHOT = """\
version: 42
defaults:
  unknown_location: deny
rules:
  - id: cn-memorial-17
    effect: deny
    jurisdiction: [CN]
    meetings: {tags: [memorial]}
    legal_basis: Order 17/2026 of the national network authority
    valid_from: 2026-01-01T00:00:00Z
  - id: cn-broadcast-4
    effect: deny
    jurisdiction: [CN]
    actions: [host]
    legal_basis: Notice 4/2025 on live broadcasting
  - id: us-wa-host
    effect: deny
    jurisdiction: [US-WA]
    actions: [host]
    legal_basis: "Wash. Rev. Code 19.999 (injunction, case 26-2-0001)"
    valid_from: 2026-01-01T00:00:00Z
    valid_until: 2036-01-01T00:00:00Z
  - id: se-e-court
    effect: deny
    jurisdiction: [SE-E]
    meetings: {tags: [memorial]}
    legal_basis: Court order B 1234-26, Linköping district court
  - id: gb-eng-draft
    effect: deny
    jurisdiction: [GB-ENG]
    mode: shadow
    legal_basis: Draft order 3 (consultation)
"""

# Addresses of MaxMind's test City database and where it puts them.
CN = [f"175.16.199.{n}" for n in range(1, 40)]  # CN, CN-22
HK = "2001:2e0::1"  # HK: not CN, never denied by a CN rule
US_WA = [f"216.160.83.{n}" for n in range(56, 64)]  # US, US-WA
US_CA = "214.78.120.1"  # US, US-CA
SE_E = [f"89.160.20.{n}" for n in range(112, 128)]  # SE, SE-E
GB_ENG = ["81.2.69.142", "81.2.69.143"]  # GB, GB-ENG
UNKNOWN = "2.3.3.1"  # in the database, without a country


@dataclass(frozen=True)
class Traffic:
    """What the scripted traffic should have produced, to check reports against."""

    cn_memorial: int
    cn_broadcast: int
    us_wa: int
    se_e: int
    gb_shadow: int
    unknown: int


def scripted_traffic(client: Client) -> Traffic:
    """A fixed, varied day of meetings: denials in three jurisdictions, shadow matches, allowed neighbours."""
    rng = random.Random(19)  # noqa: S311  # a fixed script, not a secret
    cn_memorial = cn_broadcast = us_wa = se_e = gb = unknown = 0
    for n in range(320):
        meeting = f"m-{n % 23}"
        tags = ["memorial"] if n % 3 == 0 else ["weekly"]
        account = f"acct-{rng.randrange(70)}"
        kind = rng.choices(["cn", "hk", "us", "se", "gb", "unknown"], weights=[36, 10, 18, 14, 14, 4])[0]
        host = rng.random() < (0.6 if kind == "us" else 0.3)
        action = Action.HOST if host else Action.JOIN
        ip = {
            "cn": rng.choice(CN),
            "hk": HK,
            "us": rng.choice([*US_WA, US_CA]),
            "se": rng.choice(SE_E),
            "gb": rng.choice(GB_ENG),
            "unknown": UNKNOWN,
        }[kind]
        result = client.check(ip, meeting, tags=tags, action=action, account_id=account, user_id=f"user-{account}")
        cn_memorial += result.rule_id == "cn-memorial-17"
        cn_broadcast += result.rule_id == "cn-broadcast-4"
        us_wa += result.rule_id == "us-wa-host"
        se_e += result.rule_id == "se-e-court"
        gb += "gb-eng-draft" in result.shadow_rule_ids
        unknown += kind == "unknown"
    return Traffic(cn_memorial, cn_broadcast, us_wa, se_e, gb, unknown)


def serve_and_log(folder: Path, rules: str = SNAPSHOT) -> tuple[Path, Path, Traffic]:
    """Run `pdp serve --audit-log` on ``rules``, send the traffic, stop it: (log, snapshot file, traffic)."""
    folder.mkdir(parents=True, exist_ok=True)
    snapshot, key, log = folder / "rules.yaml", folder / "audit.key", folder / "audit.jsonl"
    snapshot.write_text(rules)
    key.write_bytes(b"report-test-key-" * 2)
    target = f"unix:{folder}/pdp.sock"
    with (folder / "serve.stderr").open("w") as errors:
        serve = ["serve", "--listen", target, "--snapshot", f"file://{snapshot}", "--geoip-db", str(CITY_DB)]
        audit = ["--audit-log", str(log), "--audit-hmac-key-file", str(key)]
        process = subprocess.Popen(
            [*PDP, *serve, *audit],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        try:
            assert process.stdout is not None
            banner = process.stdout.readline()  # blocks until the server listens (or has died)
            assert f"listening on {target}" in banner, (folder / "serve.stderr").read_text()
            with Client(target, timeout=10) as client:
                traffic = scripted_traffic(client)
            process.send_signal(signal.SIGTERM)  # a graceful stop writes what the audit queue holds
            assert process.wait(timeout=60) == 0, (folder / "serve.stderr").read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
            if process.stdout is not None:
                process.stdout.close()
    return log, snapshot, traffic


def spread(source: Path, target: Path, start: dt.datetime, span: dt.timedelta, seed: int = 0) -> Path:
    """``source``'s records, in order, with times rewritten to fall inside [start, start + span).

    Only ``time`` changes; records of one decision (same time in the source) keep one time.
    """
    rng = random.Random(seed)  # noqa: S311  # reproducible spreading, not a secret
    lines = source.read_text().splitlines()
    originals = sorted({json.loads(line)["time"] for line in lines})
    offsets = sorted(rng.random() * span.total_seconds() for _ in originals)
    new_time = {
        original: (start + dt.timedelta(seconds=offset)).isoformat(timespec="milliseconds")
        for original, offset in zip(originals, offsets, strict=True)
    }
    out = []
    for line in lines:
        record = json.loads(line)
        record["time"] = new_time[record["time"]]
        out.append(json.dumps(record, separators=(",", ":"), ensure_ascii=False))
    target.write_text("\n".join(out) + "\n")
    return target
