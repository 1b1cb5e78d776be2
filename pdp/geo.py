"""GeoIP: MaxMind databases opened with the C extension, behind an LRU cache.

A :class:`GeoDatabase` is one open database plus its own location cache; a new
database file means a new object (and so an empty cache), never a mutation.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cachetools
import maxminddb
from maxminddb.errors import InvalidDatabaseError

from pdp.model import UNKNOWN_LOCATION, Location

__all__ = ["DEMO", "GeoDatabase", "GeoIPError", "InvalidAddressError", "demo_database_path", "parse_address"]

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


class GeoIPError(Exception):
    """A GeoIP database is missing, unreadable, corrupt or of the wrong type."""


class InvalidAddressError(ValueError):
    """An address is not a plain IPv4 or IPv6 address."""


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

    Thread-safe: the reader is used without a lock (the C extension releases
    nothing shared), the cache under a short lock around each dict operation.

    :raises GeoIPError: on open, if the file is missing, corrupt, of a type
        without countries, or if maxminddb's C extension is unavailable.
    """

    def __init__(self, path: str | Path, cache_size: int = 100_000) -> None:
        self.path = str(path)
        self.cache_size = cache_size
        self._reader = _open(self.path)
        metadata = self._reader.metadata()
        self.database_type: str = metadata.database_type
        self.build_epoch: int = int(metadata.build_epoch)
        self._ipv4_only = metadata.ip_version == 4
        if not any(kind in self.database_type for kind in _SUPPORTED_TYPES):
            self._reader.close()
            raise GeoIPError(
                f"{self.path}: database type {self.database_type!r} has no countries; "
                "use a GeoIP2/GeoLite2 City or Country database"
            )
        self._cache: cachetools.LRUCache[str, Location] = cachetools.LRUCache(maxsize=max(cache_size, 1))
        self._lock = threading.Lock()
        # Many addresses share a location: keep one object per distinct location.
        self._interned: dict[tuple[str, tuple[str, ...]], Location] = {}
        self.hits = 0
        self.misses = 0

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

    def lookup_uncached(self, address: str) -> Location:
        """Like :meth:`locate`, bypassing (and not filling) the cache."""
        parse_address(address)
        return self._resolve(address)

    def record(self, address: str) -> Mapping[str, Any] | None:
        """The raw database record of ``address``, for ``pdp geo lookup``."""
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
        try:
            record = self._reader.get(self._lookup_key(address))
        except ValueError:
            # An IPv6 address asked of an IPv4-only database.
            return UNKNOWN_LOCATION
        # A record is untrusted data even in a database that opened cleanly.
        if not isinstance(record, dict):
            return UNKNOWN_LOCATION
        entry = record.get("country")
        country = entry.get("iso_code") if isinstance(entry, dict) else None
        if not isinstance(country, str) or not country:
            return UNKNOWN_LOCATION
        subdivisions = record.get("subdivisions")
        key = (country, _subdivision_codes(country, subdivisions) if subdivisions else ())
        location = self._interned.get(key)
        if location is None:
            location = self._interned.setdefault(key, Location(*key))
        return location

    def __repr__(self) -> str:
        return f"<GeoDatabase {self.path} type={self.database_type} build={self.build_epoch}>"


def _subdivision_codes(country: str, subdivisions: object) -> tuple[str, ...]:
    if not isinstance(subdivisions, list):
        return ()
    return tuple(
        f"{country}-{entry['iso_code']}" for entry in subdivisions if isinstance(entry, dict) and "iso_code" in entry
    )


# Addresses looked up once at open: a database whose search tree or data
# section is broken fails here, before it can serve a single request.
_PROBES = ("1.1.1.1", "8.8.8.8", "81.2.69.142", "175.16.199.1", "2001:4860::1", "2001:250::1")


def _open(path: str) -> maxminddb.Reader:
    try:
        import maxminddb.extension  # only checks that it exists
    except ImportError:
        raise GeoIPError(
            "maxminddb's C extension is not available; pdp requires it because the pure-Python "
            "reader accepts some corrupt files (reinstall maxminddb from a wheel)"
        ) from None
    if not Path(path).is_file():
        raise GeoIPError(f"{path}: no such GeoIP database file")
    try:
        reader = maxminddb.open_database(path, maxminddb.MODE_MMAP_EXT)
    except (InvalidDatabaseError, ValueError, OSError, UnicodeDecodeError) as error:
        raise GeoIPError(f"{path}: not a valid MaxMind database ({error})") from None
    try:
        ipv4_only = reader.metadata().ip_version == 4
        for probe in _PROBES:
            if not (ipv4_only and ":" in probe):
                reader.get(probe)
    except (InvalidDatabaseError, ValueError, OSError, UnicodeDecodeError, RecursionError) as error:
        reader.close()
        raise GeoIPError(f"{path}: corrupt MaxMind database, a test lookup failed ({error})") from None
    return reader
