"""The last activated snapshot, kept in ``--state-dir`` to outlive a restart.

``snapshot`` holds the bytes exactly as fetched (signature included);
``snapshot.meta.json`` says where they came from, their version, SHA-256 and
format, so that they are read back the way they were read the first time. Both
are written atomically. At start the pair is the replay floor, and it is trusted
only as far as the directory is: the directory and both files must be writable
by pdp's user (or root) alone, as ssh demands of ``~/.ssh``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from pdp.files import atomic_write, private_directory, read_private, remove_temporaries
from pdp.sources.base import MAX_SNAPSHOT_BYTES

__all__ = ["SNAPSHOT", "SNAPSHOT_META", "Persisted", "StateDir"]

log = logging.getLogger("pdp.reload")

SNAPSHOT = "snapshot"
SNAPSHOT_META = "snapshot.meta.json"


@dataclass(frozen=True, slots=True)
class Persisted:
    """Snapshot bytes as fetched, and what is needed to read them again."""

    data: bytes
    source: str  # the snapshot URL, credentials masked
    version: int
    sha256: str  # of ``data``
    format: str | None  # "yaml", "json", or None: the parser told them apart by name and content


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    def prepare(self) -> None:
        """At start: create the directory (0700) or check that it is private, and
        remove the temporary files a kill during a write left.

        :raises NotPrivateError: others could write the directory.
        :raises OSError: it cannot be created, examined or cleaned.
        """
        private_directory(self.path)
        for name in (SNAPSHOT, SNAPSHOT_META):
            for removed in remove_temporaries(self.path / name):
                log.warning("removed %s, left by an interrupted write", removed)

    def load(self) -> Persisted | None:
        """The persisted snapshot, or None when there is none or its two files disagree
        (a crash between the two writes; logged).

        :raises NotPrivateError: others could have written the directory or a file.
        :raises OSError: a file exists but cannot be read.
        """
        private_directory(self.path)
        data = read_private(self.path / SNAPSHOT, MAX_SNAPSHOT_BYTES)
        meta_bytes = read_private(self.path / SNAPSHOT_META, 64 * 1024)
        if data is None or meta_bytes is None:
            return None
        try:
            meta = json.loads(meta_bytes)
            persisted = Persisted(
                data, str(meta["source"]), int(meta["version"]), str(meta["sha256"]), meta.get("format")
            )
        except (ValueError, TypeError, KeyError) as error:
            log.error("%s is not what pdp writes (%s); the persisted snapshot is not used", SNAPSHOT_META, error)
            return None
        if hashlib.sha256(data).hexdigest() != persisted.sha256:
            log.error("%s and %s disagree (interrupted between the two writes?); not used", SNAPSHOT, SNAPSHOT_META)
            return None
        return persisted

    def save(self, persisted: Persisted) -> None:
        """Write ``persisted`` whole: the bytes, then the metadata naming their digest.

        :raises NotPrivateError: others could write the directory.
        :raises OSError: it cannot be written.
        """
        private_directory(self.path)
        meta = {key: value for key, value in asdict(persisted).items() if key != "data"}
        atomic_write(self.path / SNAPSHOT, persisted.data)
        atomic_write(self.path / SNAPSHOT_META, json.dumps(meta).encode())
