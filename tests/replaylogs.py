"""Audit logs for replay tests, written by a real ``pdp serve`` under scripted traffic.

:func:`run_sidecar` starts ``python -m pdp serve`` on a Unix socket with the
MaxMind test City database, an audit log and a state directory, sends the
scripted :data:`TRAFFIC` (every call one real Check or CheckBatch), then stops
it with SIGTERM, which writes every queued record. :func:`retimed` rewrites the
``time`` field of a real log's records, and nothing else, for tests that need
decisions at controlled moments.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdp.client import Client, Participant
from pdp.model import Action

from .conftest import CITY_DB

PDP = [sys.executable, "-m", "pdp"]
KEY = b"replay-test-key-0123456789abcdef"

ACTIVE = """\
version: 1
rules:
  - id: cn-memorial
    effect: deny
    jurisdiction: [CN]
    actions: [join]
    meetings: {tags: [memorial]}
    legal_basis: Order 17/2020
    valid_from: 2020-01-01T00:00:00Z
  - id: cn-enterprise-exception
    effect: allow
    jurisdiction: [CN]
    meetings: {host_accounts: [acme-corp]}
    priority: 200
    legal_basis: Licence 3/2021
  - id: us-wa-host
    effect: deny
    jurisdiction: [US-WA]
    actions: [host]
    legal_basis: WA statute 19.999
  - id: gb-eng-draft
    effect: deny
    jurisdiction: [GB-ENG]
    mode: shadow
    legal_basis: Draft order 3
"""

HK_MEMORIAL_RULE = """\
  - id: hk-memorial
    effect: deny
    jurisdiction: [HK]
    actions: [join]
    meetings: {tags: [memorial]}
    legal_basis: HK order 2026/1
"""

CN = [f"175.16.199.{n}" for n in range(1, 7)]  # CN, CN-22
HK = ["2001:2e0::1", "2001:2e0::2", "2001:2e0::3"]
US_WA = ["216.160.83.56", "216.160.83.57", "216.160.83.58"]
SE_E = ["89.160.20.112", "89.160.20.113"]
GB_ENG = ["81.2.69.142", "81.2.69.143"]
FI = ["2a02:d200::1"]
UNKNOWN = ["2.3.3.1"]
EVERYONE = CN + HK + US_WA + SE_E + GB_ENG + FI + UNKNOWN


@dataclass(frozen=True)
class Meeting:
    meeting_id: str
    tags: tuple[str, ...]
    host: str


MEETINGS = (
    Meeting("m-memorial-1", ("memorial",), "acme-corp"),
    Meeting("m-memorial-2", ("memorial", "public"), "host-2"),
    Meeting("m-town-hall", ("town-hall",), "host-3"),
    Meeting("m-plain", (), ""),
)


def scripted_traffic(client: Client, rounds: int = 1) -> int:
    """Everyone joins every meeting (Check for half of them, CheckBatch for the
    rest), and everyone asks to host every meeting once. Returns the decisions made."""
    made = 0
    for round_number in range(rounds):
        for meeting in MEETINGS:
            half = len(EVERYONE) // 2
            for position, ip in enumerate(EVERYONE[:half]):
                client.check(
                    ip, meeting.meeting_id, tags=meeting.tags, host_account_id=meeting.host,
                    user_id=f"user-{position}", account_id=f"acct-{position}-{round_number}",
                )  # fmt: skip
            people = [
                Participant(ip, f"user-{position}", f"acct-{position}-{round_number}")
                for position, ip in enumerate(EVERYONE[half:], start=half)
            ]
            client.check_batch(meeting.meeting_id, people, tags=meeting.tags, host_account_id=meeting.host)
            for position, ip in enumerate(EVERYONE):
                client.check(
                    ip, meeting.meeting_id, tags=meeting.tags, host_account_id=meeting.host, action=Action.HOST,
                    account_id=f"acct-{position}-{round_number}",
                )  # fmt: skip
            made += 2 * len(EVERYONE)
    return made


@dataclass
class Sidecar:
    """A running ``pdp serve`` and where it writes."""

    process: subprocess.Popen[str]
    client: Client
    audit_log: Path
    state_dir: Path
    rules: Path
    key_file: Path
    stderr: str = ""  # the server's lifecycle log, once stopped


@contextmanager
def run_sidecar(
    folder: Path,
    rules: str = ACTIVE,
    *,
    sample_rate: float = 1.0,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Iterator[Sidecar]:
    """``pdp serve`` with an audit log in ``folder``; stopped (and its log complete) on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    rules_path, key_file = folder / "rules.yaml", folder / "audit.key"
    rules_path.write_text(rules)
    key_file.write_bytes(KEY)
    socket = folder / "pdp.sock"
    command = [
        *PDP, "serve", "--listen", f"unix:{socket}", "--snapshot", f"file://{rules_path}",
        "--geoip-db", str(CITY_DB), "--state-dir", str(folder / "state"), "--log-format", "text",
        "--audit-log", str(folder / "audit.jsonl"), "--audit-hmac-key-file", str(key_file),
        "--audit-allow-sample-rate", str(sample_rate), *extra,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    assert process.stdout is not None
    banner = process.stdout.readline()  # printed once the server listens, policy loaded
    if "listening on" not in banner:
        process.kill()
        raise AssertionError(f"pdp serve did not start: {banner}{process.communicate()[1]}")
    client = Client(f"unix:{socket}", timeout=10)
    sidecar = Sidecar(process, client, folder / "audit.jsonl", folder / "state", rules_path, key_file)
    try:
        yield sidecar
    finally:
        client.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        sidecar.stderr = stderr


def records(path: Path) -> list[dict[str, Any]]:
    """The log's lines as written."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def enforced(path: Path) -> list[dict[str, Any]]:
    """The log's recorded decisions (not its shadow-match lines)."""
    return [record for record in records(path) if record["mode"] == "enforce"]


def retimed(source: Path, target: Path, start: dt.datetime, step: dt.timedelta) -> list[dict[str, Any]]:
    """Copy a real log, giving its n-th line the time ``start + n * step`` and
    changing nothing else (field order and format as the server wrote them)."""
    out = []
    lines = []
    for number, line in enumerate(source.read_text().splitlines()):
        record = json.loads(line)
        record["time"] = (start + number * step).isoformat(timespec="milliseconds")
        out.append(record)
        lines.append(json.dumps(record, separators=(",", ":"), ensure_ascii=False))
    target.write_text("\n".join(lines) + "\n")
    return out


def impact(*arguments: str | Path) -> subprocess.CompletedProcess[str]:
    """``pdp snapshot impact ...`` as a user runs it."""
    return subprocess.run(
        [*PDP, "snapshot", "impact", *map(str, arguments)], capture_output=True, text=True, timeout=120, check=False
    )
