"""Files that are replaced while pdp runs: telling versions apart, writing them whole,
and trusting them only when nobody but pdp's user could have written them."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
from pathlib import Path

__all__ = [
    "Identity",
    "NotPrivateError",
    "atomic_write",
    "identity",
    "identity_of",
    "private_directory",
    "read_private",
    "remove_temporaries",
]

Identity = tuple[int, int, int, int]


class NotPrivateError(Exception):
    """A directory or file pdp trusts could have been written by another user; the
    message names it, says why and how to fix it."""


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


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new file, never half of one.

    The temporary file is created 0600 beside ``path``; one a kill left behind is
    found by :func:`remove_temporaries`.

    :raises OSError: the folder cannot be created or written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid in the name: workers of --processes N share a state directory.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f"{_temporary_prefix(path)}{os.getpid()}.")
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


def remove_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` left for ``path`` when it was
    killed before its rename; one whose writer still runs (another worker sharing the
    directory, mid-write) is kept. Returns what was removed.

    :raises OSError: the folder cannot be listed or a file removed.
    """
    # PREFIX + [pid.] + mkstemp's 8 characters; the pid is missing from older names.
    name = re.compile(rf"{re.escape(_temporary_prefix(path))}(?:(\d+)\.)?[a-z0-9_]{{8}}")
    removed = []
    for candidate in path.parent.glob(f"{_temporary_prefix(path)}*"):
        found = name.fullmatch(candidate.name)
        if found is None or not stat.S_ISREG(candidate.lstat().st_mode):
            continue  # another file's temporary (``snapshot.meta.json``'s for ``snapshot``), or not a file
        if found.group(1) is not None and _running(int(found.group(1))):
            continue
        candidate.unlink()
        removed.append(candidate)
    return removed


def _running(pid: int) -> bool:
    """Whether ``pid`` is a running process other than this one (a pid of this
    process in a leftover name is a previous process that had the same pid)."""
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, as another user
        return True
    except OverflowError:  # no such pid can exist
        return False
    return True


def _not_private(path: Path, status: os.stat_result, advice: str | None = None) -> str:
    """Why ``status`` lets someone other than this process's user (or root) write
    ``path``, or ''; ``advice`` replaces the fix suggested for a writable mode."""
    if status.st_uid not in (os.geteuid(), 0):
        return f"owned by uid {status.st_uid}, not by pdp's user (uid {os.geteuid()}) or root"
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"writable by group or others (mode {stat.S_IMODE(status.st_mode):04o}); {advice or f'chmod go-w {path}'}"
        )
    return ""


def private_directory(path: Path, *, mode: int = 0o700, advice: str | None = None) -> None:
    """Make sure ``path`` is a directory only pdp's user (or root) can write, as ssh
    demands of ``~/.ssh``: created with ``mode`` when missing (0700; a socket's
    directory is 0750, so that pdp's group may reach the socket), refused otherwise,
    sticky bit or not. ``advice`` is the fix the refusal suggests.

    :raises NotPrivateError: it exists and others could write it.
    :raises OSError: it cannot be created or examined, or is not a directory.
    """
    if not path.exists():
        path.mkdir(mode=mode, parents=True)
    status = path.stat()
    if not stat.S_ISDIR(status.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    problem = _not_private(path, status, advice)
    if problem:
        raise NotPrivateError(f"{path}: {problem}")


def read_private(path: Path, limit: int) -> bytes | None:
    """The bytes of ``path``, None when it does not exist; read through one descriptor
    that was checked, so a file swapped in between cannot be read instead.

    :raises NotPrivateError: a symbolic link, not a regular file, or writable by others.
    :raises OSError: it cannot be read, or holds more than ``limit`` bytes.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as error:
        if path.is_symlink():
            raise NotPrivateError(f"{path}: a symbolic link, which pdp does not follow here") from None
        raise error
    with os.fdopen(descriptor, "rb") as handle:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise NotPrivateError(f"{path}: not a regular file")
        problem = _not_private(path, status)
        if problem:
            raise NotPrivateError(f"{path}: {problem}")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"{path}: larger than {limit} bytes")
    return data
