"""The vendored MaxMind test data is exactly what PROVENANCE.md says it is."""

from __future__ import annotations

import hashlib
import re

from .conftest import ROOT

DATA = ROOT / "tests" / "data" / "maxmind"
ROW = re.compile(r"^\| (\d+) \| ([0-9a-f]{64}) \| (\S+) \|$")


def test_every_vendored_file_matches_its_provenance_row() -> None:
    rows = {
        match[3]: (int(match[1]), match[2])
        for line in (DATA / "PROVENANCE.md").read_text().splitlines()
        if (match := ROW.match(line))
    }
    on_disk = {p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.is_file()} - {"PROVENANCE.md"}
    assert set(rows) == on_disk, "PROVENANCE.md and tests/data/maxmind/ list different files"
    for name, (size, digest) in rows.items():
        data = (DATA / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, digest), name


def test_the_license_travels_with_the_data() -> None:
    assert "Permission is hereby granted, free of charge" in (DATA / "LICENSE-MIT").read_text()
