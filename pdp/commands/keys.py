"""``--pubkey``, as every command that reads signed snapshots takes it: the option
(repeatable, ``PDP_SNAPSHOT_PUBKEY`` when absent, comma-separated, as `pdp serve`
reads it) and the keys it names."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pdp.config import comma_list

if TYPE_CHECKING:
    from pdp.signing import TrustedKeys

__all__ = ["add_pubkey_option", "key_files", "trusted_keys"]


def add_pubkey_option(parser: argparse.ArgumentParser, verifies: str = "signed envelopes") -> None:
    """``--pubkey FILE``; ``verifies``: what the keys check, for the help text."""
    parser.add_argument(
        "--pubkey",
        action="append",
        metavar="FILE",
        help=f"verify {verifies} with this Ed25519 public key (repeatable) [env PDP_SNAPSHOT_PUBKEY]",
    )


def key_files(given: list[str] | None, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The files given with ``--pubkey``, else those ``PDP_SNAPSHOT_PUBKEY`` lists."""
    return given or comma_list(environ.get("PDP_SNAPSHOT_PUBKEY", ""))


def trusted_keys(given: list[str] | None) -> TrustedKeys:
    """The keys of :func:`key_files` (none: nothing is verified).

    :raises SignatureError: a file is unreadable or holds no Ed25519 public key;
        the message starts with where the file was named (``--pubkey:`` or
        ``PDP_SNAPSHOT_PUBKEY:``).
    """
    from pdp.signing import SignatureError, TrustedKeys

    try:
        return TrustedKeys.from_files(key_files(given))
    except SignatureError as error:
        raise SignatureError(f"{'--pubkey' if given else 'PDP_SNAPSHOT_PUBKEY'}: {error}") from None
