"""``pdp snapshot promote CANDIDATE --to URL``: publish the candidate as the next version.

The candidate (a file, or the URL sidecars follow it at with
``--candidate-snapshot``) is read and verified like any snapshot; the version
active in the store (``--active URL``, by default the first ``--to``) is read the
same way. The candidate's rules are published unchanged under the next version
(active + 1, or ``--version N``, which must be higher: sidecars refuse a lower
one as a replay), validated again as published, signed with ``--key``, to every
``--to`` URL that ``pdp snapshot publish`` supports. Only the version changes:
the text of a YAML snapshot is kept (comments too), a JSON one is rewritten with
the new version, and a Redis store gets canonical JSON with a delta, as
``pdp snapshot publish`` writes it; what is published is compiled and compared with the candidate
rule by rule before anything is written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdp.commands.keys import add_pubkey_option, trusted_keys

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from pdp.rules import Policy
    from pdp.signing import TrustedKeys

EXIT_OK, EXIT_ERROR = 0, 2
_YAML_VERSION = re.compile(rb"^version:[ \t]*(\d+)[ \t]*(#.*)?$", re.MULTILINE)


class PromoteError(Exception):
    """The candidate cannot be promoted; the message says why."""


def add_parser(snapshot_commands: Any) -> None:
    """Register ``promote`` on the ``pdp snapshot`` subparsers."""
    parser = snapshot_commands.add_parser(
        "promote",
        help="publish a candidate snapshot as the next version",
        description="Read the candidate (a file or a snapshot URL) and the version active in the store, then "
        "validate, sign and publish the candidate's rules as the next version (active + 1, or --version) to every "
        "--to URL. Only the version changes; what is published is checked against the candidate rule by rule.",
    )
    parser.add_argument("candidate", help="the candidate: a rules file, or the URL sidecars follow it at")
    parser.add_argument(
        "--to",
        required=True,
        action="append",
        metavar="URL",
        help="file:///path or redis://host:port/db?key=K (repeatable)",
    )
    parser.add_argument("--active", metavar="URL", help="where to read the active version (default: the first --to)")
    parser.add_argument("--version", type=int, metavar="N", help="publish as version N (default: active + 1)")
    parser.add_argument("--key", metavar="PRIVATE_KEY", help="sign with this PEM private key")
    add_pubkey_option(parser, "the candidate and the active snapshot")
    parser.add_argument("--no-notify", action="store_true", help="redis: store without the pub/sub notice")
    parser.set_defaults(handler=cmd_snapshot_promote)


def cmd_snapshot_promote(options: argparse.Namespace) -> int:
    try:
        print("\n".join(_promote(options)))
    except PromoteError as error:
        print(f"pdp: {error}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _promote(options: argparse.Namespace) -> list[str]:
    from pdp.diff import diff_policies
    from pdp.publish import PublishError, publish
    from pdp.signing import sign

    keys = _keys(options.pubkey)
    payload, candidate, signed = _read(options.candidate, keys)
    active_url = options.active or options.to[0]
    active = _active(active_url, keys, required=options.version is None)
    version = options.version if options.version is not None else (active.version + 1 if active else 0)
    if active is not None and version <= active.version:
        raise PromoteError(f"version {version} is not above the active {active.version}: sidecars would refuse it")
    if signed and not options.key:
        raise PromoteError(f"{options.candidate} is signed: pass --key, the promoted version must be signed again")
    data = _with_version(payload, options.candidate, version, candidate)
    key = _private_key(options.key) if options.key else None
    lines = []
    if active is not None:
        diff = diff_policies(active, candidate)
        lines.append(
            f"active version {active.version} at {active_url}; the candidate adds {len(diff.added)}, "
            f"removes {len(diff.removed)} and changes {len(diff.changed)} rules"
        )
    for url in options.to:
        body = _stored_form(data, url, options.candidate)
        if key is not None:
            body = sign(body, version, key)
        try:
            outcome = publish(body, url, version, notify=not options.no_notify, key=key)
        except (PublishError, ValueError) as error:
            raise PromoteError(f"{url}: {error}") from None
        state = "signed" if options.key else "unsigned"
        lines.append(f"promoted {options.candidate} as version {version} ({state}) to {url}: {outcome}")
    return lines


def _keys(files: list[str] | None) -> TrustedKeys:
    from pdp.signing import SignatureError

    try:
        return trusted_keys(files)
    except SignatureError as error:
        raise PromoteError(str(error)) from None


def _fetch(where: str) -> bytes:
    """A snapshot's bytes from a file or a URL, through the sources sidecars use.

    :raises PromoteError: it cannot be read.
    """
    from pdp.rules import MAX_SNAPSHOT_BYTES
    from pdp.sources import SourceError, open_source

    if "://" not in where:
        try:
            with Path(where).open("rb") as handle:
                return handle.read(MAX_SNAPSHOT_BYTES + 1)
        except OSError as error:
            raise PromoteError(f"{where}: cannot read: {error.strerror or error}") from None
    try:
        source = open_source(where)
    except ValueError as error:
        raise PromoteError(f"{where}: {error}") from None
    try:
        fetched = source.fetch()
    except SourceError as error:
        raise PromoteError(f"{where}: {error}") from None
    finally:
        source.close()
    if fetched is None:
        raise PromoteError(f"{where}: nothing stored there")
    return fetched.data


def _read(where: str, keys: TrustedKeys) -> tuple[bytes, Policy, bool]:
    """The candidate's rules document, compiled, and whether it came signed."""
    from pdp.reload import SnapshotRejectedError, read_snapshot
    from pdp.signing import SignatureError, is_envelope, open_envelope

    data = _fetch(where)
    try:
        policy = read_snapshot(data, keys if is_envelope(data) else _no_keys(), where)
        payload = open_envelope(data).payload if is_envelope(data) else data
    except (SnapshotRejectedError, SignatureError) as error:
        raise PromoteError(str(error)) from None
    return payload, policy, is_envelope(data)


def _no_keys() -> TrustedKeys:
    from pdp.signing import TrustedKeys

    return TrustedKeys()


def _active(where: str, keys: TrustedKeys, *, required: bool) -> Policy | None:
    """The policy in the store, or None when the store is empty and ``--version`` says what to publish."""
    try:
        return _read(where, keys)[1]
    except PromoteError as error:
        if required:
            raise PromoteError(f"cannot tell the active version ({error}): pass --version N") from None
        return None


def _with_version(payload: bytes, name: str, version: int, candidate: Policy) -> bytes:
    """The candidate's document with only its version changed, checked by compiling it.

    :raises PromoteError: the result would not be the candidate's rules (never expected).
    """
    from pdp.diff import diff_policies
    from pdp.rules import SnapshotError, parse_policy, snapshot_as_json

    if candidate.version == version:
        data = payload
    elif len(_YAML_VERSION.findall(payload)) == 1 and not payload.lstrip().startswith(b"{"):
        data = _YAML_VERSION.sub(lambda m: b"version: %d" % version + (b"  " + m[2] if m[2] else b""), payload)
    else:
        document = json.loads(snapshot_as_json(payload, name))
        document["version"] = version
        data = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    try:
        promoted = parse_policy(data, name)
    except SnapshotError as error:
        raise PromoteError(f"the promoted snapshot does not validate: {error}") from None
    if promoted.version != version or not diff_policies(candidate, promoted).rules_equal:
        raise PromoteError("the promoted snapshot would differ from the candidate: nothing published")
    return data


def _stored_form(data: bytes, url: str, name: str) -> bytes:
    """What goes to ``url``: Redis stores get canonical JSON, as ``pdp snapshot publish``
    writes them (deltas are computed on it); files get the candidate's own text."""
    from pdp.canonical import canonical_snapshot

    if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
        return canonical_snapshot(data, name)
    return data


def _private_key(key_file: str) -> Ed25519PrivateKey:
    from pdp.signing import SignatureError, load_private_key

    try:
        return load_private_key(key_file)
    except SignatureError as error:
        raise PromoteError(f"--key: {error}") from None
