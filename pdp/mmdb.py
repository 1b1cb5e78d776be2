"""A MaxMind database file, copied whole into private memory and validated there.

Serving from a mapping of the file itself lets any write to that file reach the
reader that is serving. ``cp new.mmdb db.mmdb`` truncates the file first, and a
lookup touching a page past the new end is SIGBUS: the process dies (measured).
An in-place write mixes new and old bytes under live lookups: mainland-China
checks answered ALLOW, "location unknown" (measured). So the file is read once,
into an anonymous memory file (``memfd``) sealed against writing, shrinking and
growing; both readers map that copy, and nothing done to the file on disk can
reach them afterwards. The copy costs the database's size in memory, counted
as shared memory (``RssShmem``) against a container's limit: see the README for
RSS and start-up, measured against reading it into the reader's own buffer.

Before a copy serves, it must:

- be the file as it was from the first byte to the last: the file's identity
  (device, inode, size, mtime, ctime) is the same before and after the read;
- match the pinned SHA-256, when one is given (the only check of every byte);
- open with MaxMind's C extension (metadata, search-tree bounds), whose
  pure-Python mode would accept some corrupt files, and be of a type with countries;
- answer a set of probe addresses spread over the address space identically
  through both readers: the C extension's full record and the codes
  ``maxminddb-rust``'s ``get_path`` serves.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import maxminddb
import maxminddb_rust
from maxminddb.errors import InvalidDatabaseError

from pdp.errors import PdpError

__all__ = ["FileChangedError", "GeoIPError", "Loaded", "Look", "load", "look", "require_extension"]

Look = tuple[int, int, int, int, int]
"""Device, inode, size, mtime and ctime of a file. The ctime moves on every
write and every metadata change, and no one can set it back (``touch -r`` can
restore an mtime), so a change in place is seen even with the size kept."""

# Types whose records carry `country` (and, for City, `subdivisions`).
_SUPPORTED_TYPES = ("City", "Country", "Enterprise")
COUNTRY = ("country", "iso_code")
# MaxMind lists at most two subdivisions, largest first (e.g. GB-ENG, then a borough).
SUBDIVISIONS = (("subdivisions", 0, "iso_code"), ("subdivisions", 1, "iso_code"))

_CHUNK = 1 << 20
_SEALS = ("F_SEAL_SEAL", "F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE")

# Addresses looked up before a copy serves: MaxMind's test networks, and one
# address in every IPv4 /8 and a spread of IPv6 ones, so that a search tree or
# data section broken anywhere near the top is found before any request meets it.
_PROBES = (
    "1.1.1.1",
    "8.8.8.8",
    "81.2.69.142",
    "175.16.199.1",
    "2001:4860::1",
    "2001:250::1",
    *(f"{n}.{(n * 53) % 256}.{(n * 151) % 256}.{(n * 29) % 256 or 1}" for n in range(1, 224)),
    *(f"{prefix:x}:{(n * 4099) % 65536:x}::1" for n, prefix in enumerate(range(0x2001, 0x2C00, 0x40))),
)


class GeoIPError(PdpError):
    """A GeoIP database is missing, unreadable, corrupt or of the wrong type."""


class FileChangedError(GeoIPError):
    """The file changed while it was being read: it is being written; look again later."""


@dataclass(frozen=True, slots=True)
class Loaded:
    """A validated private copy, mapped by ``reader``; unmapped when the reader is freed."""

    reader: maxminddb_rust.Reader
    database_type: str
    build_epoch: int
    ip_version: int
    sha256: str  # of the bytes served
    look: Look  # of the file they were read from


def look(path: str | Path) -> Look | None:
    """The identity of the file at ``path`` (following symlinks), or None when it cannot be read."""
    try:
        return _look_of(Path(path).stat())
    except OSError:
        return None


def _look_of(status: os.stat_result) -> Look:
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


def require_extension() -> None:
    """:raises GeoIPError: maxminddb's C extension is not importable."""
    try:
        import maxminddb.extension  # noqa: F401  # only checks that it exists
    except ImportError:
        raise GeoIPError(
            "maxminddb's C extension is not available; pdp requires it because the pure-Python "
            "reader accepts some corrupt files (reinstall maxminddb from a wheel)"
        ) from None


def load(path: str, sha256: str = "") -> Loaded:
    """Copy ``path`` into private memory, validate the copy, and open it for lookups.

    :raises FileChangedError: the file changed while it was read.
    :raises GeoIPError: missing, unreadable, not the pinned SHA-256, corrupt, of a
        type without countries, its readers disagree, or no C extension.
    """
    require_extension()
    with _private_copy(path) as (copy, digest, seen):
        if sha256 and digest != sha256:
            raise GeoIPError(
                f"{path}: SHA-256 {digest[:16]}... is not the pinned {sha256[:16]}...; "
                "a damaged or unexpected database is not served"
            )
        metadata, expected = _gate(path, copy)
        try:
            reader = maxminddb_rust.open_database(copy, maxminddb_rust.MODE_MMAP)
            served = [_served_codes(reader, probe) for probe in _probes(metadata.ip_version)]
        except (maxminddb_rust.InvalidDatabaseError, ValueError, OSError) as error:
            raise GeoIPError(f"{path}: the lookup reader refused the database ({error})") from None
    if served != expected:
        reader.close()
        raise GeoIPError(f"{path}: its two readers disagree on a probe address; not served")
    return Loaded(reader, metadata.database_type, int(metadata.build_epoch), metadata.ip_version, digest, seen)


@contextlib.contextmanager
def _private_copy(path: str) -> Iterator[tuple[str, str, Look]]:
    """Yield a path to a sealed private copy of ``path``, its SHA-256 and the file's look.
    The copy's descriptor is closed on exit; mappings made meanwhile keep it alive."""
    try:
        source = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise GeoIPError(f"{path}: no such GeoIP database file") from None
    except OSError as error:
        raise GeoIPError(f"{path}: cannot open ({error.strerror or error})") from None
    copy = -1
    try:
        before = os.fstat(source)
        if not stat.S_ISREG(before.st_mode):
            raise GeoIPError(f"{path}: not a regular file")
        copy = _memory_file()
        digest, copied = _copy(path, source, copy)
        after = os.fstat(source)
        if _look_of(before) != _look_of(after) or copied != after.st_size:
            raise FileChangedError(f"{path}: changed while it was being read ({copied} of {after.st_size} bytes)")
        _seal(copy)
        yield _descriptor_path(copy), digest, _look_of(after)
    finally:
        os.close(source)
        if copy >= 0:
            os.close(copy)


def _memory_file() -> int:
    if hasattr(os, "memfd_create"):
        return os.memfd_create("pdp-geoip", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    # Without memfd (not Linux): an unlinked temporary file that no one else can name.
    try:
        with tempfile.TemporaryFile() as handle:
            return os.dup(handle.fileno())
    except OSError as error:
        raise GeoIPError(f"no memory file for the database copy: {error.strerror or error}") from None


def _copy(path: str, source: int, copy: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    copied = 0
    try:
        while chunk := os.read(source, _CHUNK):
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(copy, view) :]
            copied += len(chunk)
    except OSError as error:
        raise GeoIPError(f"{path}: cannot read into memory ({error.strerror or error})") from None
    return digest.hexdigest(), copied


def _seal(copy: int) -> None:
    seals = 0
    for name in _SEALS:
        seals |= getattr(fcntl, name, 0)
    if seals and hasattr(fcntl, "F_ADD_SEALS"):
        with contextlib.suppress(OSError):  # a temporary file (no memfd) takes no seals
            fcntl.fcntl(copy, fcntl.F_ADD_SEALS, seals)


def _descriptor_path(descriptor: int) -> str:
    for folder in ("/proc/self/fd", "/dev/fd"):
        if Path(folder).is_dir():
            return f"{folder}/{descriptor}"
    raise GeoIPError("neither /proc/self/fd nor /dev/fd exists: the database copy cannot be opened")


def _probes(ip_version: int) -> list[str]:
    return [probe for probe in _PROBES if not (ip_version == 4 and ":" in probe)]


def _gate(path: str, copy: str) -> tuple[maxminddb.reader.Metadata, list[tuple[object, ...] | None]]:
    """Open the copy with the C extension; return its metadata and the probes' codes."""
    try:
        gate = maxminddb.open_database(copy, maxminddb.MODE_MMAP_EXT)
    except (InvalidDatabaseError, ValueError, OSError, UnicodeDecodeError) as error:
        raise GeoIPError(f"{path}: not a valid MaxMind database ({error})") from None
    try:
        metadata = gate.metadata()
        expected = [_codes_from_record(gate.get(probe)) for probe in _probes(metadata.ip_version)]
    except (InvalidDatabaseError, ValueError, OSError, UnicodeDecodeError, RecursionError) as error:
        raise GeoIPError(f"{path}: corrupt MaxMind database, a test lookup failed ({error})") from None
    finally:
        gate.close()
    if not any(kind in metadata.database_type for kind in _SUPPORTED_TYPES):
        raise GeoIPError(
            f"{path}: database type {metadata.database_type!r} has no countries; "
            "use a GeoIP2/GeoLite2 City or Country database"
        )
    return metadata, expected


def _codes_from_record(record: object) -> tuple[object, ...] | None:
    if not isinstance(record, dict) or not isinstance(record.get("country"), dict):
        return None
    codes: list[object] = [record["country"].get("iso_code")]
    subdivisions = record.get("subdivisions", [])
    for entry in subdivisions[:2] if isinstance(subdivisions, list) else []:
        codes.append(entry.get("iso_code") if isinstance(entry, dict) else None)
    return tuple(codes)


def _served_codes(reader: maxminddb_rust.Reader, address: str) -> tuple[object, ...] | None:
    """The codes as :class:`pdp.geo.GeoDatabase` reads them, path by path."""
    if reader.get_path(address, ("country",)) is None:
        return None
    codes: list[object] = [reader.get_path(address, COUNTRY)]
    for path in SUBDIVISIONS:
        if reader.get_path(address, path[:2]) is None:
            break
        codes.append(reader.get_path(address, path))
    return tuple(codes)
