"""GeoIP: MaxMind databases behind an LRU location cache.

Two official-lineage readers, each for what it does best (see :mod:`pdp.mmdb`,
which copies the file into private memory and validates the copy):

- MaxMind's ``maxminddb`` C extension is the gate: a copy is opened with it,
  its type checked and a set of probe addresses looked up; a file it refuses is
  never served. (Its pure-Python mode accepts some corrupt files, so the C
  extension is required.)
- ``maxminddb-rust`` (by MaxMind's reader maintainer) then serves the lookups:
  its ``get_path`` decodes only ``country.iso_code`` and the subdivision codes,
  about 1 us, where a full record decode costs about 7 us.

An IPv6 address that carries an IPv4 one (NAT64, SIIT, 6to4, Teredo; see
:mod:`pdp.addresses`) is located by that IPv4 address.

A :class:`GeoDatabase` is one open database plus its own location cache; a new
database file means a new object (and so an empty cache), never a mutation.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import maxminddb_rust

from pdp.addresses import Forms, InvalidAddressError, embedded_ipv4, embeddings, parse_address
from pdp.mmdb import COUNTRY, SUBDIVISIONS, FileChangedError, GeoIPError, load
from pdp.model import UNKNOWN_LOCATION, Location

log = logging.getLogger("pdp.geo")

__all__ = [
    "DEMO",
    "FileChangedError",
    "GeoDatabase",
    "GeoIPError",
    "InvalidAddressError",
    "Located",
    "demo_database_path",
    "format_build",
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


def format_build(epoch: int) -> str:
    """A database's build time as a date, as operators compare it with MaxMind's releases."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True, slots=True)
class Located:
    """Where an address was located, and which address that was: the address
    itself, or the IPv4 address it carries (``via`` names the form)."""

    location: Location
    address: str
    via: str = ""  # "" when the address itself was looked up


class GeoDatabase:
    """An open MaxMind City or Country database with an LRU location cache.

    Thread-safe without a lock of ours: the reader is safe for concurrent reads,
    and the cache is :func:`functools.lru_cache`, whose C implementation keeps
    its own structure consistent under concurrent calls (two threads missing
    the same address both look it up and store the same location).

    :raises GeoIPError: on open, if the file is missing, corrupt, of a type
        without countries, or if maxminddb's C extension is unavailable.
    """

    def __init__(
        self,
        path: str | Path,
        cache_size: int = 100_000,
        *,
        sha256: str = "",
        nat64_prefixes: Sequence[str] = (),
    ) -> None:
        """``sha256``, when given (see :func:`read_pinned_sha256`), is the digest
        the file must have: MaxMind databases carry no checksum of their own, so
        without it a flipped bit that leaves the file readable cannot be told
        from a new database. ``nat64_prefixes`` are the operator's NAT64
        prefixes (like ``2001:db8:64::/96``) besides the well-known ones.

        :raises FileChangedError: the file changed while it was read (look again later).
        :raises InvalidPrefixError: a NAT64 prefix is malformed.
        """
        self.path = str(path)
        self.cache_size = cache_size
        self.nat64_prefixes = tuple(nat64_prefixes)
        loaded = load(self.path, sha256)
        self.database_type: str = loaded.database_type
        self.build_epoch: int = loaded.build_epoch
        self.sha256: str = loaded.sha256  # of the bytes served, which no later write to the file can change
        self.look = loaded.look  # of the file they were read from
        subdivisions = SUBDIVISIONS if "Country" not in self.database_type else ()
        self._resolver = _Resolver(
            loaded.reader,
            embeddings(self.nat64_prefixes),
            loaded.ip_version == 4,
            subdivisions,
            f"{self.path} ({self.database_type} built {format_build(self.build_epoch)})",
        )
        # A hit is one call into C, no Python frame and no lock. The cache holds the
        # resolver, not this object, so that a replaced database is freed (and its
        # memory unmapped) as soon as the last call using it drops it, without
        # waiting for the cycle collector.
        self._cached: Callable[[str], Location] = functools.lru_cache(maxsize=max(cache_size, 1))(
            self._resolver.checked
        )

    def locate(self, address: str) -> Location:
        """Location of ``address`` (cached). Private, reserved and unlisted
        addresses give an unknown location.

        :raises InvalidAddressError: ``address`` is not a plain IPv4 or IPv6 address.
        """
        return self._cached(address)

    def locate_many(self, addresses: Sequence[str]) -> list[Location]:
        """:meth:`locate` for a whole batch, every lookup made from C.

        :raises InvalidAddressError: with ``position`` set to the first bad address's index.
        """
        try:
            return list(map(self._cached, addresses))
        except InvalidAddressError:
            pass
        for position, address in enumerate(addresses):  # only to say which one
            try:
                parse_address(address)
            except InvalidAddressError as error:
                error.position = position
                raise
        raise AssertionError("an address was refused, then accepted")

    def lookup_uncached(self, address: str) -> Location:
        """Like :meth:`locate`, bypassing (and not filling) the cache."""
        parse_address(address)
        return self._resolver.resolve(address)

    def trace(self, address: str) -> Located:
        """Where ``address`` is located and by which address, for `pdp explain` and `pdp geo lookup`.

        :raises InvalidAddressError: ``address`` is not a plain IPv4 or IPv6 address.
        """
        parse_address(address)
        resolve = self._resolver.resolve
        embedded = embedded_ipv4(address, self._resolver.forms)
        if embedded is None:
            return Located(resolve(address), address)
        return Located(resolve(address), embedded[0], embedded[1].name)

    @property
    def hits(self) -> int:
        return int(self._cached.cache_info().hits)  # type: ignore[attr-defined]

    @property
    def misses(self) -> int:
        """Addresses looked up in the database (refused ones are not), those
        that met a broken record (:attr:`lookup_errors`) included."""
        return int(self._cached.cache_info().misses) - self._resolver.refused  # type: ignore[attr-defined]

    @property
    def cache_entries(self) -> int:
        return int(self._cached.cache_info().currsize)  # type: ignore[attr-defined]

    @property
    def lookup_errors(self) -> int:
        """Lookups in the database that met a broken record, each read as an
        unknown location (and cached as one, so an address counts once while
        it stays in the cache). The first is logged as a warning."""
        return self._resolver.lookup_errors

    def close(self) -> None:
        """Close the reader at once; calls still using this object will fail. The
        server never calls it: a replaced database is unmapped when the last call
        holding it finishes and drops the reference."""
        self._resolver.reader.close()

    def __repr__(self) -> str:
        return f"<GeoDatabase {self.path} type={self.database_type} build={self.build_epoch}>"


class _Resolver:
    """An address's location from the database itself: the cache's miss path."""

    __slots__ = (
        "errors_lock",
        "forms",
        "interned",
        "ipv4_only",
        "lookup_errors",
        "name",
        "reader",
        "refused",
        "subdivision_paths",
    )

    def __init__(
        self,
        reader: maxminddb_rust.Reader,
        forms: Forms,
        ipv4_only: bool,
        subdivision_paths: Sequence[Sequence[str | int]],
        name: str = "",
    ) -> None:
        self.reader, self.forms, self.ipv4_only, self.name = reader, forms, ipv4_only, name
        self.subdivision_paths = tuple(subdivision_paths)
        # Many addresses share a location: keep one object per distinct location.
        self.interned: dict[tuple[object, ...], Location] = {}
        self.refused = 0  # addresses that are not addresses: counted by lru_cache as misses
        self.lookup_errors = 0
        # Taken only on a broken record or a refused address, never on the way of a good
        # lookup: it keeps the counts exact and the warning single when threads meet errors at once.
        self.errors_lock = threading.Lock()

    def checked(self, address: str) -> Location:
        """:meth:`resolve` for an address checked first (never cached when refused).

        :raises InvalidAddressError: ``address`` is not a plain IPv4 or IPv6 address.
        """
        try:
            parse_address(address)
        except InvalidAddressError:
            with self.errors_lock:  # += is no atomic step: threads refusing at once would lose counts
                self.refused += 1
            raise
        return self.resolve(address)

    def resolve(self, address: str) -> Location:
        if ":" in address:  # only IPv6 may carry an IPv4 address; on a cache miss only
            embedded = embedded_ipv4(address, self.forms)
            if embedded is not None:
                address = embedded[0]
            elif self.ipv4_only:
                return UNKNOWN_LOCATION
        get_path = self.reader.get_path
        try:
            country = get_path(address, COUNTRY)
            if country is None:
                return UNKNOWN_LOCATION
            key: tuple[object, ...] = (country,)
            for path in self.subdivision_paths:
                code = get_path(address, path)
                if code is None:
                    break
                key = (*key, code)
        except ValueError:
            # An IPv6 address asked of an IPv4-only database.
            return UNKNOWN_LOCATION
        except maxminddb_rust.InvalidDatabaseError:
            # A broken record the probes at open did not reach: no location
            # rather than a failed call, so the policy's unknown_location decides.
            self._lookup_failed()
            return UNKNOWN_LOCATION
        try:
            location = self.interned.get(key)
        except TypeError:  # an unhashable value where a code belongs
            return UNKNOWN_LOCATION
        if location is None:
            location = self.interned.setdefault(key, _location(key))
        return location

    def _lookup_failed(self) -> None:
        """Count a broken record; the first of this database is logged, the rest
        only counted (GetStatus.geoip_lookup_errors, pdp.geoip.lookup_errors),
        so that a much-visited broken record costs no log line per request."""
        with self.errors_lock:
            self.lookup_errors += 1
            first = self.lookup_errors == 1
        if first:
            log.warning(
                "GeoIP database %s: a lookup met a broken record (corrupt data the checks at open did not reach); "
                "addresses whose record is broken are answered as location unknown, decided by the policy's "
                "defaults.unknown_location. Logged once for this database, counted in "
                "GetStatus.geoip_lookup_errors and the metric pdp.geoip.lookup_errors: replace the file",
                self.name,
            )


def _location(codes: tuple[object, ...]) -> Location:
    """A location from (country, subdivision, ...) as found in a record, which
    is untrusted data even in a database that opened cleanly."""
    country, *subdivisions = codes
    if not isinstance(country, str) or not country:
        return UNKNOWN_LOCATION
    return Location(country, tuple(f"{country}-{code}" for code in subdivisions if isinstance(code, str) and code))


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
