"""GeoIP: MaxMind databases behind an LRU location cache.

Two official-lineage readers, each for what it does best:

- MaxMind's ``maxminddb`` C extension is the gate: a database is opened with it,
  its type checked and a set of probe addresses looked up; a file it refuses is
  never served. (Its pure-Python mode accepts some corrupt files, so the C
  extension is required.)
- ``maxminddb-rust`` (by MaxMind's reader maintainer) then serves the lookups:
  its ``get_path`` decodes only ``country.iso_code`` and the subdivision codes,
  about 1 us, where a full record decode costs about 7 us. Its probe answers
  must equal the C extension's, on the same inode, or the file is refused.

A :class:`GeoDatabase` is one open database plus its own location cache; a new
database file means a new object (and so an empty cache), never a mutation.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cachetools
import maxminddb
import maxminddb_rust
from maxminddb.errors import InvalidDatabaseError

from pdp.errors import PdpError
from pdp.files import identity as file_identity
from pdp.model import UNKNOWN_LOCATION, Location

__all__ = [
    "DEMO",
    "GeoDatabase",
    "GeoIPError",
    "InvalidAddressError",
    "demo_database_path",
    "parse_address",
    "read_pinned_sha256",
]

DEMO = "demo"
"""Name that selects the bundled, stale GeoLite2-City 2018 demo database."""

DEMO_NOTICE = (
    "using the demo GeoIP database: GeoLite2-City of July 2018 from the maxminddb-geolite2 package, "
    "stale and for trying pdp only. It includes GeoLite2 data created by MaxMind, licensed under "
    "CC BY-SA 4.0. For real use, mount a current GeoIP2/GeoLite2 City or Country database "
    "(kept fresh by MaxMind's geoipupdate) and point --geoip-db / PDP_GEOIP_DB at it."
)

# Types whose records carry `country` (and, for City, `subdivisions`).
_SUPPORTED_TYPES = ("City", "Country", "Enterprise")
_COUNTRY = ("country", "iso_code")
# MaxMind lists at most two subdivisions, largest first (e.g. GB-ENG, then a borough).
_SUBDIVISIONS = (("subdivisions", 0, "iso_code"), ("subdivisions", 1, "iso_code"))


class GeoIPError(PdpError):
    """A GeoIP database is missing, unreadable, corrupt or of the wrong type."""


class InvalidAddressError(PdpError, ValueError):
    """An address is not a plain IPv4 or IPv6 address. ``position`` is its index
    in a batch (see :meth:`GeoDatabase.locate_many`)."""

    position: int = 0


def demo_database_path() -> Path:
    """Path of the demo database from the optional ``maxminddb-geolite2`` package.

    :raises GeoIPError: the package is not installed.
    """
    try:
        from _maxminddb_geolite2 import geolite2_database  # type: ignore[import-untyped]
    except ImportError:
        raise GeoIPError(
            "the demo GeoIP database needs the maxminddb-geolite2 package: pip install 'pdp[demo]'"
        ) from None
    return Path(geolite2_database())


def parse_address(text: str) -> None:
    """Check that ``text`` is one plain IPv4 or IPv6 address.

    inet_pton is strict where the MaxMind extension is not (it would read "1.2.3"
    as 1.2.0.3 and drop a zone index), and costs a tenth of ipaddress'.

    :raises InvalidAddressError: with a message saying what is wrong.
    """
    try:
        socket.inet_pton(socket.AF_INET, text)
        return
    except (OSError, ValueError):
        pass
    try:
        socket.inet_pton(socket.AF_INET6, text)
        return
    except (OSError, ValueError):
        pass
    if not text:
        raise InvalidAddressError("required")
    if "%" in text:
        raise InvalidAddressError(f"{text[:64]!r}: zone indexes are not accepted, send the address alone")
    if text.count(":") == 1 or text.startswith("["):
        raise InvalidAddressError(f"{text[:64]!r}: send the address alone, without a port or brackets")
    raise InvalidAddressError(f"{text[:64]!r} is not an IPv4 or IPv6 address")


class GeoDatabase:
    """An open MaxMind City or Country database with an LRU location cache.

    Thread-safe: the reader is shared without a lock (it is safe for concurrent
    reads), the cache sits under a short lock around each dict operation.

    :raises GeoIPError: on open, if the file is missing, corrupt, of a type
        without countries, or if maxminddb's C extension is unavailable.
    """

    def __init__(self, path: str | Path, cache_size: int = 100_000, *, sha256: str = "") -> None:
        """``sha256``, when given (see :func:`read_pinned_sha256`), is the digest
        the file must have: MaxMind databases carry no checksum of their own, so
        without it a flipped bit that leaves the file readable cannot be told
        from a new database."""
        self.path = str(path)
        self.cache_size = cache_size
        self._reader, metadata = _open(self.path, sha256)
        self.database_type: str = metadata.database_type
        self.build_epoch: int = int(metadata.build_epoch)
        self._ipv4_only = metadata.ip_version == 4
        self._subdivision_paths = _SUBDIVISIONS if "Country" not in self.database_type else ()
        self._cache: cachetools.LRUCache[str, Location] = cachetools.LRUCache(maxsize=max(cache_size, 1))
        self._lock = threading.Lock()
        # Many addresses share a location: keep one object per distinct location.
        self._interned: dict[tuple[object, ...], Location] = {}
        self.hits = 0
        self.misses = 0
        self.lookup_errors = 0

    def locate(self, address: str) -> Location:
        """Location of ``address`` (cached). Private, reserved and unlisted
        addresses give an unknown location.

        :raises InvalidAddressError: ``address`` is not a plain IPv4 or IPv6 address.
        """
        with self._lock:
            location = self._cache.get(address)
            if location is not None:
                self.hits += 1
                return location
        parse_address(address)
        location = self._resolve(address)
        with self._lock:
            self.misses += 1
            self._cache[address] = location
        return location

    def locate_many(self, addresses: Sequence[str]) -> list[Location]:
        """:meth:`locate` for a whole batch, taking the cache lock once for its hits.

        :raises InvalidAddressError: with ``position`` set to the bad address's index.
        """
        found: list[Location | None]
        with self._lock:
            get = self._cache.get
            found = [get(address) for address in addresses]
        missing = [position for position, location in enumerate(found) if location is None]
        resolved = []
        for position in missing:
            try:
                parse_address(addresses[position])
            except InvalidAddressError as error:
                error.position = position
                raise
            resolved.append(self._resolve(addresses[position]))
        with self._lock:
            self.hits += len(addresses) - len(missing)
            self.misses += len(missing)
            for position, location in zip(missing, resolved, strict=True):
                found[position] = self._cache[addresses[position]] = location
        return found  # type: ignore[return-value]  # every None was filled above

    def lookup_uncached(self, address: str) -> Location:
        """Like :meth:`locate`, bypassing (and not filling) the cache."""
        parse_address(address)
        return self._resolve(address)

    def record(self, address: str) -> Mapping[str, Any] | None:
        """The whole database record of ``address``, for ``pdp geo lookup``."""
        parse_address(address)
        result = self._reader.get(self._lookup_key(address))
        return result if isinstance(result, Mapping) else None

    @property
    def cache_entries(self) -> int:
        return int(self._cache.currsize)

    def close(self) -> None:
        """Close the reader; calls still using this object will fail."""
        self._reader.close()

    def _lookup_key(self, address: str) -> str:
        # An IPv4-only database can answer IPv4-mapped addresses, no other IPv6.
        if self._ipv4_only and address[:7].lower() == "::ffff:" and "." in address:
            return address[7:]
        return address

    def _resolve(self, address: str) -> Location:
        address = self._lookup_key(address)
        get_path = self._reader.get_path
        try:
            country = get_path(address, _COUNTRY)
            if country is None:
                return UNKNOWN_LOCATION
            key: tuple[object, ...] = (country,)
            for path in self._subdivision_paths:
                code = get_path(address, path)
                if code is None:
                    break
                key = (*key, code)
        except ValueError:
            # An IPv6 address asked of an IPv4-only database.
            return UNKNOWN_LOCATION
        except maxminddb_rust.InvalidDatabaseError:
            # A broken record the probes at open did not reach: no location
            # rather than a failed call; counted for GetStatus.
            self.lookup_errors += 1
            return UNKNOWN_LOCATION
        try:
            location = self._interned.get(key)
        except TypeError:  # an unhashable value where a code belongs
            return UNKNOWN_LOCATION
        if location is None:
            location = self._interned.setdefault(key, _location(key))
        return location

    def __repr__(self) -> str:
        return f"<GeoDatabase {self.path} type={self.database_type} build={self.build_epoch}>"


def _location(codes: tuple[object, ...]) -> Location:
    """A location from (country, subdivision, ...) as found in a record, which
    is untrusted data even in a database that opened cleanly."""
    country, *subdivisions = codes
    if not isinstance(country, str) or not country:
        return UNKNOWN_LOCATION
    return Location(country, tuple(f"{country}-{code}" for code in subdivisions if isinstance(code, str) and code))


# Addresses looked up at open: a database whose search tree or data section is
# broken fails here, before it can serve a single request.
_PROBES = ("1.1.1.1", "8.8.8.8", "81.2.69.142", "175.16.199.1", "2001:4860::1", "2001:250::1")


def _codes_from_record(record: object) -> tuple[object, ...] | None:
    if not isinstance(record, dict) or not isinstance(record.get("country"), dict):
        return None
    codes: list[object] = [record["country"].get("iso_code")]
    for entry in record.get("subdivisions", [])[:2]:
        codes.append(entry.get("iso_code") if isinstance(entry, dict) else None)
    return tuple(codes)


def read_pinned_sha256(path: str | Path) -> str:
    """The SHA-256 in ``path``, written as ``sha256sum`` writes it (the digest,
    then optionally the file name), in lower case.

    :raises GeoIPError: the file cannot be read or does not start with 64 hex digits.
    """
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace")
    except OSError as error:
        raise GeoIPError(f"{path}: cannot read the pinned SHA-256 ({error.strerror or error})") from None
    words = text.split()
    digest = words[0].lower() if words else ""
    if len(digest) != 64 or any(char not in "0123456789abcdef" for char in digest):
        raise GeoIPError(f"{path}:1: expected the database's SHA-256 as 64 hex digits, as sha256sum writes it")
    return digest


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _open(path: str, sha256: str = "") -> tuple[maxminddb_rust.Reader, maxminddb.reader.Metadata]:
    try:
        import maxminddb.extension  # only checks that it exists
    except ImportError:
        raise GeoIPError(
            "maxminddb's C extension is not available; pdp requires it because the pure-Python "
            "reader accepts some corrupt files (reinstall maxminddb from a wheel)"
        ) from None
    if not Path(path).is_file():
        raise GeoIPError(f"{path}: no such GeoIP database file")
    identity = file_identity(path)
    if sha256:
        try:
            actual = _sha256_of(path)
        except OSError as error:
            raise GeoIPError(f"{path}: cannot read ({error.strerror or error})") from None
        if actual != sha256:
            raise GeoIPError(
                f"{path}: SHA-256 {actual[:16]}... is not the pinned {sha256[:16]}...; "
                "a damaged or unexpected database is not served"
            )
    try:
        gate = maxminddb.open_database(path, maxminddb.MODE_MMAP_EXT)
    except (InvalidDatabaseError, ValueError, OSError, UnicodeDecodeError) as error:
        raise GeoIPError(f"{path}: not a valid MaxMind database ({error})") from None
    try:
        metadata = gate.metadata()
        probes = [probe for probe in _PROBES if not (metadata.ip_version == 4 and ":" in probe)]
        expected = [_codes_from_record(gate.get(probe)) for probe in probes]
    except (InvalidDatabaseError, ValueError, OSError, UnicodeDecodeError, RecursionError) as error:
        raise GeoIPError(f"{path}: corrupt MaxMind database, a test lookup failed ({error})") from None
    finally:
        gate.close()
    if not any(kind in metadata.database_type for kind in _SUPPORTED_TYPES):
        raise GeoIPError(
            f"{path}: database type {metadata.database_type!r} has no countries; "
            "use a GeoIP2/GeoLite2 City or Country database"
        )
    try:
        reader = maxminddb_rust.open_database(path, maxminddb_rust.MODE_MMAP)
        served = [_codes_from_record(reader.get(probe)) for probe in probes]
    except (maxminddb_rust.InvalidDatabaseError, ValueError, OSError) as error:
        raise GeoIPError(f"{path}: the lookup reader refused the database ({error})") from None
    if file_identity(path) != identity or served != expected:
        reader.close()
        raise GeoIPError(f"{path}: changed while it was being opened, or its readers disagree; not served")
    return reader, metadata
