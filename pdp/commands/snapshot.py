"""`pdp snapshot validate|sign|publish` and `pdp keygen`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pdp.rules import Policy, SnapshotError, load_policy, parse_policy, policy_summary, sniff_format

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


from pdp.commands.common import (
    EXIT_INVALID,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
)


def cmd_snapshot_validate(options: argparse.Namespace) -> int:
    status = EXIT_OK
    for name in options.file:
        try:
            policy = load_policy(name)
        except SnapshotError as error:
            print(str(error), file=sys.stderr)
            status = max(status, EXIT_INVALID)
            continue
        except OSError as error:
            print(f"pdp: {name}: cannot read: {error.strerror or error}", file=sys.stderr)
            status = EXIT_USAGE
            continue
        counts = policy_summary(policy)
        print(
            f"{name}: valid, version {policy.version}: {counts['rules']} rules ({counts['deny']} deny, "
            f"{counts['allow']} allow, {counts['shadow']} shadow) over {counts['jurisdictions']} jurisdictions; "
            f"unknown locations {policy.unknown_location.name.lower()}; sha256 {policy.sha256}"
        )
    return status


def cmd_keygen(options: argparse.Namespace) -> int:
    from pdp.signing import generate_keypair

    base = Path(options.out)
    private_path, public_path = base.with_name(base.name + ".key"), base.with_name(base.name + ".pub")
    try:
        kid = generate_keypair(private_path, public_path)
    except FileExistsError as error:
        raise UsageError(str(error)) from None
    print(f"key id {kid}\n  private {private_path} (mode 0600: sign with it, keep it off the sidecars)")
    print(f"  public  {public_path} (give it to the sidecars: PDP_SNAPSHOT_PUBKEY)")
    return EXIT_OK


def _signed(path: str, key_file: str | None, as_json: bool = False) -> tuple[bytes, Policy, Ed25519PrivateKey | None]:
    """A validated rules file's bytes (as canonical JSON if asked, see pdp.canonical), in a
    signed envelope when a key is given; and the key."""
    from pdp.canonical import canonical_snapshot
    from pdp.signing import SignatureError, load_private_key, sign

    policy = load_policy(path)
    data = Path(path).read_bytes()
    if as_json:
        data = canonical_snapshot(data, path)
    if not key_file:
        return data, policy, None
    # Sidecars read a signed payload in the format its content shows (the envelope's name
    # says nothing of it): refuse here what they would refuse.
    parse_policy(data, path, sniff_format(data))
    try:
        key = load_private_key(key_file)
    except SignatureError as error:
        raise UsageError(f"--key: {error}") from None
    return sign(data, policy.version, key), policy, key


def cmd_snapshot_sign(options: argparse.Namespace) -> int:
    from pdp.compression import compress

    data, policy, _ = _signed(options.file, options.key, options.json)
    data = compress(data, options.compress)
    if options.out == "-":
        sys.stdout.buffer.write(data)
    else:
        Path(options.out).write_bytes(data)
        print(f"signed version {policy.version} into {options.out}")
    return EXIT_OK


def cmd_snapshot_publish(options: argparse.Namespace) -> int:
    from pdp.publish import PublishError, publish

    # Redis stores get canonical JSON: deltas are computed on it, and it compiles faster.
    to_redis = options.to.startswith(("redis://", "rediss://", "redis+sentinel://"))
    data, policy, key = _signed(options.file, options.key, options.json or to_redis)
    try:
        outcome = publish(
            data,
            options.to,
            policy.version,
            notify=not options.no_notify,
            key=key,
            compression=options.compress,
            deltas=not options.no_delta,
            stream_maxlen=options.stream_maxlen,
        )
    except (PublishError, ValueError) as error:
        raise UsageError(str(error)) from None
    signed = "signed" if options.key else "unsigned"
    print(f"published version {policy.version} ({signed}) to {options.to}: {outcome}")
    return EXIT_OK
