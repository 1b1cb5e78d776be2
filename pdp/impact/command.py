"""``pdp snapshot impact NEW --audit-log FILE...``: the command around the replay.

Exit codes: 0 nothing flips, 1 decisions flip, 2 an error (unreadable or
invalid snapshot, unreadable log, bad option), 4 the boundary check failed
(a flipped participant outside a deciding rule's jurisdiction: a bug in pdp).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdp.commands.keys import add_pubkey_option, trusted_keys

if TYPE_CHECKING:
    from pdp.impact.report import Inputs
    from pdp.impact.snapshots import SnapshotFinder
    from pdp.rules import Policy
    from pdp.signing import TrustedKeys

EXIT_SAME, EXIT_FLIPS, EXIT_ERROR, EXIT_BOUNDARY = 0, 1, 2, 4


class _RefusedError(Exception):
    """An input the command cannot use; the message says which and why."""


def add_parser(snapshot_commands: Any) -> None:
    """Register ``impact`` on the ``pdp snapshot`` subparsers."""
    parser = snapshot_commands.add_parser(
        "impact",
        help="replay audit logs against a candidate snapshot: every decision that would flip",
        description="Decide every decision recorded in audit logs again with a candidate snapshot and report "
        "those whose verdict would change: counts by jurisdiction, rule, legal basis, meeting and action "
        "(scaled by the recorded ALLOW sampling), sample records (pseudonymous ids only), and per rule the "
        "proof that no flipped participant lies outside its jurisdiction. The baseline is what each record "
        "says was decided, checked by deciding it again with the policy it names when that snapshot is found "
        "(in --state-dir or --snapshots); --against OLD replaces the baseline by OLD's decisions. Logs may be "
        "rotated files or gzip; lines that cannot be replayed are counted and skipped, with file:line.",
        epilog="Exit codes: 0 nothing flips, 1 decisions flip, 2 error, 4 boundary check failed (a bug: report it).",
    )
    parser.add_argument("new", help="the candidate snapshot (YAML, JSON or a signed envelope)")
    parser.add_argument(
        "--audit-log", required=True, nargs="+", action="extend", metavar="FILE", help="audit logs (plain or gzip)"
    )
    parser.add_argument("--against", metavar="OLD", help="decide the baseline with this snapshot instead")
    parser.add_argument(
        "--state-dir",
        action="append",
        metavar="DIR",
        help="a sidecar's --state-dir, whose archive holds the snapshots it activated (repeatable) [env PDP_STATE_DIR]",
    )
    parser.add_argument(
        "--snapshots", action="append", default=[], metavar="PATH", help="snapshot files or folders (repeatable)"
    )
    parser.add_argument(
        "--audit-hmac-key-file",
        metavar="FILE",
        default=os.environ.get("PDP_AUDIT_HMAC_KEY_FILE") or None,
        help="the key the log was pseudonymised with: host_accounts selectors are pseudonymised with it to "
        "match the log [env PDP_AUDIT_HMAC_KEY_FILE]",
    )
    add_pubkey_option(parser)
    parser.add_argument("--since", metavar="TIME", help="only records at or after this time (RFC 3339)")
    parser.add_argument("--until", metavar="TIME", help="only records before this time (RFC 3339)")
    parser.add_argument("--format", choices=("md", "csv", "json"), default="md", help="output format (default md)")
    parser.add_argument("--json", action="store_const", const="json", dest="format", help="same as --format json")
    parser.add_argument("--chart", metavar="PNG", help="also draw the flips (needs the report extra)")
    parser.add_argument("--samples", type=int, default=20, metavar="N", help="sample records listed (default 20)")
    parser.set_defaults(handler=cmd_snapshot_impact)


def cmd_snapshot_impact(options: argparse.Namespace) -> int:
    from pdp.impact.records import LogError

    try:
        return _run(options)
    except (_RefusedError, LogError) as error:
        print(f"pdp: {error}", file=sys.stderr)
        return EXIT_ERROR


def _run(options: argparse.Namespace) -> int:
    from pdp.audit import key_id
    from pdp.impact.records import LogReader
    from pdp.impact.render import RenderError, chart, csv_text, markdown
    from pdp.impact.replay import Replay
    from pdp.impact.report import Inputs, document

    keys = _keys(options.pubkey)
    key = _hmac_key(options.audit_hmac_key_file)
    candidate = _prepared(_snapshot(options.new, keys), key, options.new)
    against = _prepared(_snapshot(options.against, keys), key, options.against) if options.against else None
    finder = None if against is not None else _finder(options, keys, key)
    reader = LogReader(_moment(options.since, "--since"), _moment(options.until, "--until"), key_id(key) if key else "")
    if against is not None:
        replay = Replay(candidate, lambda record: against, against=True, samples_wanted=options.samples)
    else:
        assert finder is not None
        replay = Replay(
            candidate, lambda r: finder.find(r.policy_version, r.policy_sha256), samples_wanted=options.samples
        )
    for record in reader.read(options.audit_log):
        replay.add(record)
    inputs = Inputs(options.new, candidate, options.against or "")
    baselines = [against] if against is not None else finder.policies() if finder is not None else []
    _changes(inputs, baselines)
    if against is None and not (finder is not None and finder.where):
        inputs.notes.append("no snapshot a record names was found: changed rules are not listed (pass --state-dir)")
    doc = document(inputs, replay, reader, finder)
    if options.format == "json":
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(csv_text(doc) if options.format == "csv" else markdown(doc))
    if options.chart:
        try:
            chart(doc, options.chart)
        except RenderError as error:
            raise _RefusedError(str(error)) from None
        print(f"chart written to {options.chart}", file=sys.stderr)
    if replay.violations:
        count = len(replay.violations)
        print(f"pdp: BOUNDARY VIOLATED by {count} flipped decisions: a bug in pdp, report it", file=sys.stderr)
        return EXIT_BOUNDARY
    return EXIT_FLIPS if replay.flips else EXIT_SAME


def _keys(files: list[str] | None) -> TrustedKeys:
    from pdp.signing import SignatureError

    try:
        return trusted_keys(files)
    except SignatureError as error:
        raise _RefusedError(str(error)) from None


def _hmac_key(name: str | None) -> bytes:
    if not name:
        return b""
    try:
        key = Path(name).read_bytes().strip()
    except OSError as error:
        raise _RefusedError(f"--audit-hmac-key-file {name}: {error.strerror or error}") from None
    if len(key) < 16:
        raise _RefusedError(f"--audit-hmac-key-file {name}: shorter than 16 bytes, not a key pdp serve accepts")
    return key


def _snapshot(name: str, keys: TrustedKeys) -> Policy:
    from pdp.impact.snapshots import read_policy
    from pdp.reload import SnapshotRejectedError

    try:
        return read_policy(Path(name), keys)[0]
    except OSError as error:
        raise _RefusedError(f"{name}: cannot read: {error.strerror or error}") from None
    except SnapshotRejectedError as error:
        raise _RefusedError(str(error)) from None


def _selects_hosts(policy: Policy) -> list[str]:
    return [rule.id for rule in policy.rules if rule.host_accounts]


def _prepared(policy: Policy, key: bytes, name: str) -> Policy:
    from pdp.impact.replay import pseudonymised

    if key:
        return pseudonymised(policy, key)
    hosts = _selects_hosts(policy)
    if hosts:
        raise _RefusedError(
            f"{name}: {', '.join(hosts)} {'selects' if len(hosts) == 1 else 'select'} host_accounts, and the "
            "log holds host pseudonyms: "
            "pass --audit-hmac-key-file (the key of the sidecars' --audit-hmac-key-file)"
        )
    return policy


def _finder(options: argparse.Namespace, keys: TrustedKeys, key: bytes) -> SnapshotFinder:
    from pdp.impact.replay import pseudonymised
    from pdp.impact.snapshots import SnapshotFinder

    state_dirs = options.state_dir or ([os.environ["PDP_STATE_DIR"]] if os.environ.get("PDP_STATE_DIR") else [])
    finder = SnapshotFinder([Path(d) for d in state_dirs], [Path(p) for p in options.snapshots], keys)

    def prepare(policy: Policy, path: Path) -> Policy | None:
        if key:
            return pseudonymised(policy, key)
        if _selects_hosts(policy):
            finder.notes.append(
                f"{path}: version {policy.version} selects host_accounts; without --audit-hmac-key-file "
                "its records are compared with the recorded verdict only"
            )
            return None
        return policy

    finder.prepare = prepare
    return finder


def _changes(inputs: Inputs, baselines: list[Policy]) -> None:
    from pdp.diff import diff_policies

    for baseline in baselines:
        diff = diff_policies(baseline, inputs.candidate)
        for kind, rule_ids in (
            ("added", [rule.id for rule in diff.added]),
            ("removed", [rule.id for rule in diff.removed]),
            ("changed", [change.rule_id for change in diff.changed]),
        ):
            for rule_id in rule_ids:
                known = inputs.changed_rules.get(rule_id)
                label = f"{kind} since version {baseline.version}"
                inputs.changed_rules[rule_id] = f"{known}; {label}" if known else label
        inputs.changed_defaults += [f"{change.field} since version {baseline.version}" for change in diff.defaults]


def _moment(text: str | None, what: str) -> float:
    if not text:
        return -math.inf if what == "--since" else math.inf
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise _RefusedError(f"{what}: {text!r} is not a time like 2026-11-01T00:00:00Z") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()
