"""The activated snapshots a sidecar keeps, so that its audit log stays replayable.

Every audit record names the policy that decided it by version and SHA-256
(the digest of the rules document, inside any envelope). A sidecar with a
``--state-dir`` keeps each snapshot it activates, as it was fetched (signed
envelopes included, so they can be verified again), under
``STATE_DIR/snapshots/v<version>-<sha256>[.yaml|.json]`` (the format the
sidecar read it as, when its URL said); the newest :data:`KEEP` versions stay,
older ones are removed. The folder is private to pdp's user, like the state
directory. ``pdp snapshot impact`` finds the policy a record
names here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pdp.files import atomic_write

__all__ = ["ARCHIVE_DIR", "KEEP", "Archived", "entries", "keep"]

ARCHIVE_DIR = "snapshots"
KEEP = 32  # about a month of daily publications; a 10,000-rule snapshot is 1.5 MB
_NAME = re.compile(r"v(\d{1,19})-([0-9a-f]{64})(?:\.(yaml|json))?")
_TEMPORARY = re.compile(r"\.v\d{1,19}-[0-9a-f]{64}(?:\.yaml|\.json)?\..+")  # what a kill mid-write leaves


@dataclass(frozen=True, slots=True)
class Archived:
    """One kept snapshot: what it claims to be (by its name) and where it is."""

    version: int
    sha256: str
    path: Path
    format: str | None  # "yaml" or "json" when the sidecar was told; else the parser guesses


def keep(state_dir: Path, data: bytes, version: int, sha256: str, fmt: str | None = None, limit: int = KEEP) -> Path:
    """Store ``data`` (the snapshot as fetched) under its version and digest,
    then remove all but the newest ``limit`` versions.

    :raises OSError: the archive cannot be written.
    """
    folder = state_dir / ARCHIVE_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    for left in folder.iterdir():
        if _TEMPORARY.fullmatch(left.name) and left.is_file() and not left.is_symlink():
            left.unlink(missing_ok=True)
    path = folder / (f"v{version}-{sha256}" + (f".{fmt}" if fmt else ""))
    if not path.exists():
        atomic_write(path, data)
    kept = sorted(entries(state_dir), key=lambda entry: entry.version, reverse=True)
    newest = {entry.version for entry in kept[:limit]} | {version}
    for entry in kept:
        if entry.version not in newest:
            entry.path.unlink(missing_ok=True)
    return path


def entries(state_dir: Path) -> list[Archived]:
    """The snapshots kept under ``state_dir`` (none when it has no archive)."""
    folder = state_dir / ARCHIVE_DIR
    try:
        names = [path for path in folder.iterdir() if path.is_file()]
    except OSError:
        return []
    found = []
    for path in names:
        match = _NAME.fullmatch(path.name)
        if match is not None:
            found.append(Archived(int(match[1]), match[2], path, match[3]))
    return found
