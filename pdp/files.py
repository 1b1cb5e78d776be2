"""Files that are replaced while pdp runs: telling versions apart, writing them whole."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["Identity", "atomic_write", "identity", "identity_of"]

Identity = tuple[int, int, int, int]


def identity_of(status: os.stat_result) -> Identity:
    """Device, inode, size and mtime: together they tell a file from its replacement,
    whether it was rewritten in place, renamed in (geoipupdate, ``mv``) or swapped
    behind a symlink (Kubernetes ConfigMaps)."""
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def identity(path: str | Path) -> Identity | None:
    """The identity of the file at ``path``, or None when it cannot be read."""
    try:
        return identity_of(Path(path).stat())
    except OSError:
        return None


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new file, never half of one.

    :raises OSError: the folder cannot be created or written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(temporary).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(temporary).unlink()
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
