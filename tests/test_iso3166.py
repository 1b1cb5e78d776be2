"""Jurisdiction codes: the ISO 3166 table, its agreement with pycountry and with real GeoIP data."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import maxminddb
import pycountry
import pytest

from pdp.geo import demo_database_path
from pdp.iso3166 import AS_COUNTRIES, COUNTRIES, SUBDIVISIONS, WITHDRAWN_SUBDIVISIONS, jurisdiction_problem

from .conftest import ROOT, TESTDATA

PDP = str(Path(sys.executable).parent / "pdp")
TABLE = json.loads((ROOT / "pdp" / "iso3166.json").read_text(encoding="utf-8"))


def test_table_is_generated_from_the_installed_pycountry() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_iso3166.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_iso_code_is_accepted_except_those_geoip_locates_as_countries() -> None:
    iso = {sub.code for sub in pycountry.subdivisions}
    assert {c.alpha_2 for c in pycountry.countries} | {"XK"} == COUNTRIES
    assert iso - SUBDIVISIONS == set(AS_COUNTRIES)
    assert all(jurisdiction_problem(code) is None for code in COUNTRIES | SUBDIVISIONS)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("US-ZZ", "'US-ZZ' is not an ISO 3166-2 subdivision of US"),
        ("CN-XX", "'CN-XX' is not an ISO 3166-2 subdivision of CN"),
        ("FR-999", "'FR-999' is not an ISO 3166-2 subdivision of FR"),
        ("US-WS", "'US-WS' is not an ISO 3166-2 subdivision of US; did you mean 'US-WA' (Washington)?"),
        ("US-WAS", "did you mean 'US-WA' (Washington)?"),
        ("us-ws", "'us-ws' must be upper case: 'US-WS', and 'US-WS' is not an ISO 3166-2 subdivision of US; did you"),
        ("CN-35", "'CN-35' was withdrawn from ISO 3166-2 in 2017 and GeoIP data does not return it; did you mean"),
        ("CN-22", "did you mean 'CN-JL' (Jilin Sheng)?"),
        ("UK", "'UK' is not an ISO 3166-1 alpha-2 country code (like 'CN'): the United Kingdom is 'GB'"),
        ("UK-ENG", "'UK-ENG' names no ISO 3166-1 country ('UK'); did you mean 'GB-ENG' (England)?"),
        ("EU", "the European Union is not a country: name each member state"),
        ("China", "did you mean 'CN' (China)?"),
        ("CHN", "did you mean 'CN' (China)?"),
        ("ZR", "it was withdrawn on 1997-07-14 (Zaire, Republic of); did you mean 'CD'"),
        ("XX", "'XX' is not an ISO 3166-1 alpha-2 country code (like 'CN')"),
        ("QQ-1", "'QQ-1' names no ISO 3166-1 country ('QQ')"),
        ("CN-TW", "'CN-TW' reaches nobody: GeoIP data locates Taiwan as the country 'TW', never as a subdivision"),
        ("CN-HK", "GeoIP data locates Hong Kong as the country 'HK'"),
        ("CN-MO", "GeoIP data locates Macao as the country 'MO'"),
        ("CN-71", "GeoIP data locates Taiwan as the country 'TW'"),
        ("US-PR", "GeoIP data locates Puerto Rico as the country 'PR'"),
        ("FR-GP", "GeoIP data locates Guadeloupe as the country 'GP'"),
    ],
)
def test_unassigned_codes_are_refused_with_what_was_meant(code: str, expected: str) -> None:
    problem = jurisdiction_problem(code)
    assert problem is not None
    assert expected in problem


def test_snapshot_validate_refuses_unassigned_subdivisions_with_lines(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    codes = ["US-ZZ", "CN-XX", "FR-999", "CN-35", "US-WS", "CN-TW", "CN-HK", "CN-MO", "UK"]
    rules.write_text(
        "version: 1\nrules:\n"
        + "".join(f"  - {{id: r{n}, effect: allow, jurisdiction: [{code}]}}\n" for n, code in enumerate(codes))
    )
    result = subprocess.run([PDP, "snapshot", "validate", str(rules)], capture_output=True, text=True, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"snapshot rejected, {len(codes)} problems" in result.stderr
    for line, code in enumerate(codes, start=3):
        assert f"rules.yaml:{line}: rules[{line - 3}] (r{line - 3}).jurisdiction: '{code}'" in result.stderr
    assert "did you mean 'US-WA' (Washington)?" in result.stderr
    assert "did you mean 'CN-FJ' (Fujian Sheng)?" in result.stderr


def test_withdrawn_chinese_codes_name_the_same_province_as_maxmind() -> None:
    """The only numeric CN code in MaxMind's test data is named like its letter code in ISO 3166-2."""
    document = json.loads((TESTDATA / "source-data" / "GeoIP2-City-Test.json").read_text())
    found = {
        f"CN-{sub['iso_code']}": sub["names"]["en"]
        for entry in document
        for record in entry.values()
        if record.get("country", {}).get("iso_code") == "CN"
        for sub in record.get("subdivisions", [])
    }
    assert found == {"CN-22": "Jilin Sheng"}
    assert all(TABLE["subdivisions"][WITHDRAWN_SUBDIVISIONS[code]] == name for code, name in found.items())
    assert set(WITHDRAWN_SUBDIVISIONS.values()) <= set(TABLE["subdivisions"])


# --------------------------------------------------------------------------- the demo GeoLite2-City, every record


# The demo database's codes, as a scan of every record found them; valid for the bytes
# whose SHA-256 it names (`python -m tests.test_iso3166` writes it again).
RECORDED_CODES = ROOT / "tests" / "data" / "demo-database-codes.json"
Codes = tuple[set[str], set[str], set[str]]


def _scan_demo() -> Codes:
    """(countries, subdivisions, country of any record) in every record of the demo
    database: it decodes all of 3.6 M nodes, about a minute."""
    countries: set[str] = set()
    subdivisions: set[str] = set()
    any_country: set[str] = set()
    with maxminddb.open_database(str(demo_database_path()), maxminddb.MODE_MMAP_EXT) as reader:
        for _, record in reader:
            assert isinstance(record, dict)
            country = (record.get("country") or {}).get("iso_code")
            if country:
                countries.add(country)
            for key in ("registered_country", "represented_country"):
                other = (record.get(key) or {}).get("iso_code")
                if other:
                    any_country.add(other)
            for sub in record.get("subdivisions") or []:
                if sub.get("iso_code"):
                    subdivisions.add(f"{country}-{sub['iso_code']}")  # MaxMind's WA is the jurisdiction US-WA
    return countries, subdivisions, any_country | countries


def _demo_sha256() -> str:
    return hashlib.sha256(demo_database_path().read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo_codes() -> Codes:
    """The recorded scan when the installed demo database is the one it was made from
    (a scan depends on the bytes alone), otherwise a scan now."""
    recorded = json.loads(RECORDED_CODES.read_text(encoding="utf-8"))
    if recorded["database_sha256"] == _demo_sha256():
        return set(recorded["countries"]), set(recorded["subdivisions"]), set(recorded["any_country"])
    return _scan_demo()


def test_the_recorded_codes_name_the_database_they_came_from() -> None:
    recorded = json.loads(RECORDED_CODES.read_text(encoding="utf-8"))
    assert len(recorded["database_sha256"]) == 64
    assert set(recorded) == {"about", "database_sha256", "countries", "subdivisions", "any_country"}
    assert all(recorded[key] == sorted(set(recorded[key])) for key in ("countries", "subdivisions", "any_country"))


# A scan (a different demo database) decodes every record of 3.6 M nodes: about 40 s
# alone, several times that on a loaded machine, so these two get more than the suite's 120 s.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_code_in_the_demo_database_is_accepted(demo_codes: Codes) -> None:
    countries, subdivisions, any_country = demo_codes
    assert len(countries) > 240  # the whole database was read
    assert len(subdivisions) > 4000
    refused = {code: jurisdiction_problem(code) for code in sorted(any_country | subdivisions)}
    assert {code: problem for code, problem in refused.items() if problem} == {}
    # The table holds exactly the codes ISO does not list, nothing invented.
    assert set(TABLE["geoip_subdivisions"]) == subdivisions - set(TABLE["subdivisions"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_codes_refused_as_countries_are_countries_in_geoip_data(demo_codes: Codes) -> None:
    countries, subdivisions, _ = demo_codes
    assert set(AS_COUNTRIES) <= set(TABLE["subdivisions"]), "each is listed by ISO 3166-2"
    assert set(AS_COUNTRIES) & subdivisions == set(), "GeoIP data never returns them as subdivisions"
    assert {target for target, _ in AS_COUNTRIES.values()} <= countries, "it returns their own country codes"
    assert set(WITHDRAWN_SUBDIVISIONS) & subdivisions == set(), "nor the withdrawn numeric CN codes"


if __name__ == "__main__":  # python -m tests.test_iso3166: record the demo database's codes again
    countries, subdivisions, any_country = _scan_demo()
    document = {
        "about": "every code in the demo database's records; written by python -m tests.test_iso3166",
        "database_sha256": _demo_sha256(),
        "countries": sorted(countries),
        "subdivisions": sorted(subdivisions),
        "any_country": sorted(any_country),
    }
    RECORDED_CODES.write_text(json.dumps(document, indent=0) + "\n", encoding="utf-8")
    print(f"{RECORDED_CODES}: {len(countries)} countries, {len(subdivisions)} subdivisions")
