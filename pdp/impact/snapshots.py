"""Finding the policy an audit record names: by version and SHA-256.

Looked for, in order, in each ``--state-dir`` (the sidecar's archive of
activated snapshots, :mod:`pdp.archive`, and its persisted last snapshot) and
in each ``--snapshots`` path (a snapshot file, or a folder of them, read only
when the archive does not have it). A snapshot counts as found only if it
compiles to exactly the digest the record names; a signed envelope is verified
when keys are given, and otherwise read with a note that it was not.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from pdp import archive
from pdp.persisted import SNAPSHOT, SNAPSHOT_META
from pdp.reload import SnapshotRejectedError, read_snapshot
from pdp.rules import MAX_SNAPSHOT_BYTES, Policy
from pdp.signing import TrustedKeys, is_envelope

__all__ = ["SnapshotFinder", "read_policy"]


def read_policy(path: Path, keys: TrustedKeys) -> tuple[Policy, bool]:
    """A snapshot file compiled, verified when it is an envelope and keys are given.
    Returns the policy and whether a signature went unchecked.

    :raises OSError: the file cannot be read.
    :raises SnapshotRejectedError: it is invalid or its signature does not verify.
    """
    with path.open("rb") as handle:
        data = handle.read(MAX_SNAPSHOT_BYTES + 1)
    enveloped = is_envelope(data)
    # A plain rules file is the operator's own; only an envelope has a signature to check.
    policy = read_snapshot(data, keys if enveloped else TrustedKeys(), str(path))
    return policy, enveloped and not keys


class SnapshotFinder:
    """Policies by (version, sha256), compiled once each and passed through
    ``prepare`` (which may refuse one, returning None, after saying why in ``notes``)."""

    def __init__(
        self,
        state_dirs: Iterable[Path],
        snapshot_paths: Iterable[Path],
        keys: TrustedKeys,
        prepare: Callable[[Policy, Path], Policy | None] = lambda policy, path: policy,
    ) -> None:
        self.keys = keys
        self.prepare = prepare
        self.notes: list[str] = []
        self.where: dict[tuple[int, str], str] = {}
        self._found: dict[tuple[int, str], Policy | None] = {}
        self._named: dict[int, list[tuple[str | None, Path]]] = {}  # version -> (sha256 if named, file)
        for state_dir in state_dirs:
            for entry in archive.entries(state_dir):
                self._named.setdefault(entry.version, []).append((entry.sha256, entry.path))
            persisted = _persisted(state_dir)
            if persisted is not None:  # a state directory from before the archive: its last snapshot
                self._named.setdefault(persisted[0], []).append((None, persisted[1]))
        self._loose = [path for given in snapshot_paths for path in _files(given)]
        self._loose_read = False

    def find(self, version: int, sha256: str) -> Policy | None:
        """The policy of that version and digest, or None when none of the places holds it."""
        key = (version, sha256)
        if key not in self._found:
            policy = None
            for named, path in self._named.get(version, []):
                if named in (None, sha256):
                    policy = self._read(path, key, quiet=named is None)
                    if policy is not None:
                        break
            if policy is None and not self._loose_read:
                self._read_loose()
                policy = self._found.get(key)
            self._found[key] = policy
        return self._found[key]

    def policies(self) -> list[Policy]:
        """Every policy found so far, oldest version first."""
        found = [policy for policy in self._found.values() if policy is not None]
        return sorted(found, key=lambda policy: policy.version)

    def _read(self, path: Path, wanted: tuple[int, str] | None, *, quiet: bool = False) -> Policy | None:
        try:
            policy, unverified = read_policy(path, self.keys)
        except OSError as error:
            self.notes.append(f"{path}: cannot read: {error.strerror or error}")
            return None
        except SnapshotRejectedError as error:
            self.notes.append(f"{path}: not used: {str(error).splitlines()[0]}")
            return None
        key = (policy.version, policy.sha256)
        if wanted is not None and key != wanted:
            if quiet:  # another policy of the same version: not the one looked for, and not wrong
                return None
            named = f"version {wanted[0]} sha256 {wanted[1][:12]}"
            self.notes.append(f"{path}: named {named}, holds version {key[0]} sha256 {key[1][:12]}")
            return None
        if unverified:
            self.notes.append(f"{path}: signed, but no --pubkey was given: its signature was not checked")
        prepared = self.prepare(policy, path)
        if prepared is not None:
            self.where[key] = str(path)
        return prepared

    def _read_loose(self) -> None:
        """Compile every ``--snapshots`` file once and file each under what it holds."""
        self._loose_read = True
        for path in self._loose:
            policy = self._read(path, None)
            if policy is not None:
                self._found.setdefault((policy.version, policy.sha256), policy)


def _persisted(state_dir: Path) -> tuple[int, Path] | None:
    """The version of the snapshot a sidecar persisted last, and its file."""
    try:
        meta = json.loads((state_dir / SNAPSHOT_META).read_bytes())
        return int(meta["version"]), state_dir / SNAPSHOT
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _files(given: Path) -> list[Path]:
    if given.is_dir():
        return sorted(path for path in given.iterdir() if path.is_file() and not path.name.startswith("."))
    return [given]
