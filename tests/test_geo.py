"""GeoIP against MaxMind's official test databases."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pdp.geo import GeoDatabase, GeoIPError, InvalidAddressError, parse_address
from pdp.model import Location

from .conftest import BAD_DATA, CITY_DB, COUNTRY_DB, TESTDATA


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("175.16.199.1", Location("CN", ("CN-22",))),
        ("2001:250::1", Location("CN")),
        ("2001:2e0::1", Location("HK")),
        ("216.160.83.57", Location("US", ("US-WA",))),
        ("2001:480:10::1", Location("US", ("US-CA",))),
        # Registered in the US, located in GB: the location is what counts.
        ("81.2.69.143", Location("GB", ("GB-ENG",))),
        ("::ffff:81.2.69.142", Location("GB", ("GB-ENG",))),
        ("10.0.0.1", Location()),
        ("127.0.0.1", Location()),
        ("::1", Location()),
        ("240.0.0.1", Location()),
    ],
)
def test_city_locations(city_db: GeoDatabase, address: str, expected: Location) -> None:
    assert city_db.locate(address) == expected


def test_country_database_has_no_subdivisions() -> None:
    geo = GeoDatabase(COUNTRY_DB)
    assert geo.locate("81.2.69.143") == Location("GB")
    assert geo.database_type == "GeoIP2-Country"


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("", "required"),
        ("1.2.3", "is not an IPv4 or IPv6 address"),
        ("::g", "is not an IPv4 or IPv6 address"),
        ("1.2.3.4:80", "without a port"),
        ("[2001:db8::1]:443", "without a port or brackets"),
        ("fe80::1%eth0", "zone indexes are not accepted"),
        ("01.2.3.4", "is not an IPv4 or IPv6 address"),
        (" 1.2.3.4", "is not an IPv4 or IPv6 address"),
        ("1.2.3.4\x00", "is not an IPv4 or IPv6 address"),
        ("x" * 10_000, "is not an IPv4 or IPv6 address"),
    ],
)
def test_malformed_addresses_are_refused(address: str, message: str) -> None:
    with pytest.raises(InvalidAddressError, match=message):
        parse_address(address)


def test_error_messages_quote_at_most_a_prefix() -> None:
    with pytest.raises(InvalidAddressError) as caught:
        parse_address("y" * 100_000)
    assert len(str(caught.value)) < 120


def test_cache_counts_hits_and_misses_and_stays_bounded() -> None:
    geo = GeoDatabase(CITY_DB, cache_size=2)
    assert geo.locate("81.2.69.142").country == "GB"
    assert geo.locate("81.2.69.142").country == "GB"
    assert (geo.hits, geo.misses) == (1, 1)
    for address in ("175.16.199.1", "2001:2e0::1", "216.160.83.57"):
        geo.locate(address)
    assert geo.cache_entries == 2
    # Invalid input is never cached: the second attempt is refused again.
    for _ in range(2):
        with pytest.raises(InvalidAddressError):
            geo.locate("1.2.3")
    assert geo.cache_entries == 2


def test_a_new_database_object_starts_with_an_empty_cache() -> None:
    first = GeoDatabase(CITY_DB)
    first.locate("81.2.69.142")
    second = GeoDatabase(CITY_DB)
    assert (second.cache_entries, second.hits, second.misses) == (0, 0, 0)


def test_identical_locations_share_one_object(city_db: GeoDatabase) -> None:
    assert city_db.lookup_uncached("81.2.69.142") is city_db.lookup_uncached("81.2.69.143")


BROKEN = sorted(
    list(BAD_DATA.rglob("*.mmdb"))
    + [
        TESTDATA / "test-data" / name
        for name in (
            "GeoIP2-City-Test-Broken-Double-Format.mmdb",
            "GeoIP2-City-Test-Invalid-Node-Count.mmdb",
            "MaxMind-DB-test-broken-pointers-24.mmdb",
            "MaxMind-DB-test-broken-search-tree-24.mmdb",
        )
    ]
)


@pytest.mark.parametrize("path", BROKEN, ids=lambda path: path.name)
def test_corrupt_databases_are_rejected_on_open(path: Path) -> None:
    with pytest.raises(GeoIPError, match=str(path.name)):
        GeoDatabase(path)


def test_there_are_corrupt_databases_to_test() -> None:
    assert len(BROKEN) >= 20


@pytest.mark.parametrize("name", ["GeoLite2-ASN-Test.mmdb", "GeoIP2-Anonymous-IP-Test.mmdb"])
def test_databases_without_countries_are_rejected(name: str) -> None:
    with pytest.raises(GeoIPError, match="has no countries"):
        GeoDatabase(TESTDATA / "test-data" / name)


def test_missing_and_truncated_files(tmp_path: Path) -> None:
    with pytest.raises(GeoIPError, match="no such GeoIP database file"):
        GeoDatabase(tmp_path / "absent.mmdb")
    truncated = tmp_path / "truncated.mmdb"
    truncated.write_bytes(CITY_DB.read_bytes()[:5000])
    with pytest.raises(GeoIPError, match="not a valid MaxMind database"):
        GeoDatabase(truncated)
    copy = tmp_path / "copy.mmdb"
    shutil.copy(CITY_DB, copy)
    assert GeoDatabase(copy).locate("175.16.199.1").country == "CN"
