"""Snapshots, stores and the state directory under attack (issue 12, items 1, 5, 8, 10, 11).

Every test runs against a real store: an HTTP server on loopback written on sockets
(so that it can cut a body, drip bytes or redirect), files written in place,
redis-server, and `pdp serve` itself where the guarantee is about a restart.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pdp.sources import SourceError, SourceOptions, open_source

V2 = (
    b"version: 2\nrules:\n"
    b"  - {id: hk-press, effect: deny, legal_basis: Order 3, jurisdiction: [HK], meetings: {tags: [press]}}\n"
    b"  - {id: cn-deny, effect: deny, legal_basis: Order 17, jurisdiction: [CN]}\n"
)


# --------------------------------------------------------------------------- review mends (issue 13)


def test_the_file_source_honours_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(V2)
    source = open_source(path.as_uri(), SourceOptions(max_bytes=len(V2) - 1))
    with pytest.raises(SourceError, match=f"larger than {len(V2) - 1} bytes"):
        source.fetch()
    assert open_source(path.as_uri(), SourceOptions(max_bytes=len(V2))).fetch() is not None


def test_sources_are_light_and_own_the_one_scheme_list() -> None:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, pdp.sources, pdp.config; print(sorted(m for m in sys.modules if m.startswith('pdp.rules')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "[]"

    from pdp.config import ConfigError, resolve
    from pdp.rules import MAX_SNAPSHOT_BYTES
    from pdp.sources import SCHEMES
    from pdp.sources.base import MAX_SNAPSHOT_BYTES as SOURCE_LIMIT

    assert SOURCE_LIMIT == MAX_SNAPSHOT_BYTES  # one bound for the parser and the stores
    for scheme in SCHEMES:
        assert resolve({"snapshot": f"{scheme}://localhost/x"}, {}).snapshot.startswith(scheme)
    with pytest.raises(ConfigError, match="snapshot URLs are"):
        resolve({"snapshot": "ftp://store/rules.yaml"}, {})
