"""``pdp snapshot diff OLD NEW``: the command around :mod:`pdp.diff`.

Exit codes follow diff(1): 0 the snapshots are equal, 1 they differ, 2 an error
(unreadable file, invalid snapshot, bad signature). Both sides are fully
validated; a signed envelope is verified with ``--pubkey`` (or
``PDP_SNAPSHOT_PUBKEY``), and without a key its payload is compared and the
output says that the signature was not checked. A plain rules file is compared
as it is, keys or not: it is the operator's own file, not a fetched one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pdp.commands.keys import add_pubkey_option, trusted_keys

EXIT_EQUAL, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2


def add_parser(snapshot_commands: Any) -> None:
    """Register ``diff`` on the ``pdp snapshot`` subparsers."""
    parser = snapshot_commands.add_parser(
        "diff",
        help="what a new snapshot changes: rules, defaults, and whom each change newly reaches",
        description="Compare two snapshots as pdp enforces them, rule by rule (matched by id): rules added, "
        "removed and changed field by field, changed defaults, and for each change the jurisdictions it "
        "touches and what it now reaches that it did not (countries or subdivisions, actions, meeting "
        "selectors, validity window). Both sides are validated completely first.",
        epilog="Exit codes: 0 equal, 1 different, 2 error (like diff).",
    )
    parser.add_argument("old", help="the snapshot in force (YAML, JSON or a signed envelope)")
    parser.add_argument("new", help="the candidate snapshot")
    add_pubkey_option(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(handler=cmd_snapshot_diff)


def cmd_snapshot_diff(options: argparse.Namespace) -> int:
    from pdp.diff import as_json, diff_policies, text_lines
    from pdp.reload import SnapshotRejectedError, read_snapshot
    from pdp.rules import MAX_SNAPSHOT_BYTES
    from pdp.signing import SignatureError, TrustedKeys, is_envelope

    try:
        keys = trusted_keys(options.pubkey)
    except SignatureError as error:
        print(f"pdp: {error}", file=sys.stderr)
        return EXIT_ERROR
    policies = []
    unverified = []
    for name in (options.old, options.new):
        try:
            with Path(name).open("rb") as handle:
                data = handle.read(MAX_SNAPSHOT_BYTES + 1)
            # A plain rules file is the operator's own; only an envelope has a signature to check.
            policies.append(read_snapshot(data, keys if is_envelope(data) else TrustedKeys(), name))
        except OSError as error:
            print(f"pdp: {name}: cannot read: {error.strerror or error}", file=sys.stderr)
            return EXIT_ERROR
        except SnapshotRejectedError as error:
            print(f"pdp: {error}", file=sys.stderr)
            return EXIT_ERROR
        if is_envelope(data) and not keys:
            unverified.append(name)
    diff = diff_policies(*policies)
    if options.json:
        print(json.dumps(as_json(diff) | {"unverified_signatures": unverified}, indent=2, ensure_ascii=False))
    else:
        print("\n".join(text_lines(diff, options.old, options.new)))
        for name in unverified:
            print(f"note: {name} is signed, but no --pubkey was given: its signature was not checked")
    return EXIT_EQUAL if diff.equal else EXIT_DIFFERENT
