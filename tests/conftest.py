"""Shared fixtures: MaxMind test databases and a real gRPC server on a Unix socket."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pdp.client import Client
from pdp.config import ServeConfig
from pdp.geo import GeoDatabase
from pdp.rules import Policy, parse_policy
from pdp.server import RunningServer, start_server
from pdp.state import PolicyHolder

from .servers import http_store, redis_server  # noqa: F401  # fixtures shared by every test module

ROOT = Path(__file__).resolve().parent.parent
# MaxMind's official test databases are vendored (tests/data/maxmind/PROVENANCE.md);
# PDP_TESTDATA points at another copy of the same layout, for trying newer upstream files.
TESTDATA = Path(os.environ.get("PDP_TESTDATA", ROOT / "tests" / "data")) / "maxmind"
CITY_DB = TESTDATA / "test-data" / "GeoIP2-City-Test.mmdb"
COUNTRY_DB = TESTDATA / "test-data" / "GeoIP2-Country-Test.mmdb"
BAD_DATA = TESTDATA / "bad-data"

if not CITY_DB.is_file():  # pragma: no cover - a broken checkout, not a test result
    raise RuntimeError(
        f"MaxMind test databases not found under {TESTDATA}: they ship in the repository under"
        " tests/data/maxmind/ (restore them with `git checkout -- tests/data`), or set PDP_TESTDATA"
        " to a folder holding maxmind/test-data/ from github.com/maxmind/MaxMind-DB"
    )

CN_MEMORIAL = """
version: 7
rules:
  - id: cn-memorial
    effect: deny
    jurisdiction: [CN]
    meetings: {tags: [memorial]}
    legal_basis: Order 17/2020
  - id: us-wa
    effect: deny
    jurisdiction: [US-WA]
    legal_basis: WA statute
"""


def replace_file(path: Path, data: bytes) -> None:
    """Publish ``data`` at ``path`` as editors, ``mv`` and ``pdp snapshot publish`` do:
    a new file renamed in, which the file source reads at its next look (one written
    in place is read once two looks in a row see it unchanged)."""
    staged = path.with_name(f".{path.name}.staged")
    staged.write_bytes(data)
    staged.replace(path)


def policy_from(text: str) -> Policy:
    """Compile a snapshot written inline in a test."""
    return parse_policy(textwrap.dedent(text).encode(), "test.yaml")


@pytest.fixture(scope="session")
def city_db() -> Iterator[GeoDatabase]:
    geo = GeoDatabase(CITY_DB, cache_size=1000)
    yield geo
    geo.close()


ServerFactory = Callable[..., tuple[RunningServer, PolicyHolder, Client]]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start real servers on Unix sockets in tmp_path; all are stopped afterwards.

    ``start(rules_text, loaded=True, **config)`` returns (server, holder, client).
    """
    started: list[tuple[RunningServer, Client]] = []

    def factory(
        rules: str = CN_MEMORIAL, *, loaded: bool = True, **settings: object
    ) -> tuple[RunningServer, PolicyHolder, Client]:
        config = ServeConfig(listen=f"unix:{tmp_path}/pdp-{len(started)}.sock", **settings)  # type: ignore[arg-type]
        holder = PolicyHolder()
        running = start_server(config, holder)
        if loaded:
            holder.activate(policy_from(rules), GeoDatabase(CITY_DB, config.cache_size), "test.yaml")
        client = Client(running.address, timeout=5)
        started.append((running, client))
        return running, holder, client

    yield factory
    for running, client in started:
        client.close()
        running.stop(grace=0)


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Client]]:
    """One real server for a whole module (CN_MEMORIAL rules): (address, client).

    For tests that throw many requests at it and check afterwards that it still decides the same.
    """
    folder = tmp_path_factory.mktemp("module-server")
    holder = PolicyHolder()
    holder.activate(policy_from(CN_MEMORIAL), GeoDatabase(CITY_DB), "test.yaml")
    running = start_server(ServeConfig(listen=f"unix:{folder}/s.sock"), holder)
    client = Client(running.address, timeout=10)
    yield running.address, client
    client.close()
    running.stop(grace=0)
