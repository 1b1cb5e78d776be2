"""pdp.app.Sidecar, the composition root, started in process as `pdp serve` starts it."""

from __future__ import annotations

import dataclasses
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from pdp.app import SetupError, Sidecar
from pdp.client import Client
from pdp.config import ServeConfig
from pdp.model import Verdict

from .conftest import CITY_DB, CN_MEMORIAL

CN = "175.16.199.1"


def config(tmp_path: Path, rules: Path, **settings: Any) -> ServeConfig:
    base = ServeConfig(
        listen=f"unix:{tmp_path}/s.sock", snapshot=rules.as_uri(), geoip_db=str(CITY_DB), poll_seconds=0.1
    )
    return dataclasses.replace(base, **settings)


def pdp_threads() -> set[str]:
    """pdp's threads: the RPC pool's, the reloader's, the watcher's, the audit writer's..."""
    return {thread.name for thread in threading.enumerate() if thread.name.startswith("pdp-")}


def test_a_sidecar_serves_follows_the_store_and_stops(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(CN_MEMORIAL)
    before = pdp_threads()
    sidecar = Sidecar(config(tmp_path, rules), environ={})
    sidecar.start()
    try:
        with Client(sidecar.address, timeout=10) as client:
            assert client.check(CN, "m-1", tags=["memorial"]).verdict == Verdict.DENY
            events = client.watch_policy(timeout=30)
            assert next(events).policy_version == 7
            rules.write_text(CN_MEMORIAL.replace("version: 7", "version: 8").replace("[memorial]", "[vigil]"))
            assert next(events).policy_version == 8  # the reloader's thread found and activated it
            assert client.check(CN, "m-1", tags=["memorial"]).verdict == Verdict.ALLOW
            assert client.status().serving
    finally:
        sidecar.stop()
    assert sidecar.address == ""
    assert pdp_threads() <= before  # the RPC pool's, the reloader's and the watcher's threads ended
    assert not (tmp_path / "s.sock").exists() or _refuses(tmp_path / "s.sock")
    sidecar.stop()  # a second stop is harmless


def _refuses(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return True
    return False


def test_an_invalid_snapshot_refuses_to_start_and_leaves_nothing_running(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nrules:\n  - id: x\n    effect: deny\n    jurisdiction: [CN]\n")
    before = pdp_threads()
    sidecar = Sidecar(config(tmp_path, rules), environ={})
    with pytest.raises(SetupError, match=r"refusing to start: .*rules\.yaml: snapshot rejected"):
        sidecar.start()
    assert sidecar.running is None
    assert not (tmp_path / "s.sock").exists()  # nothing was bound
    assert pdp_threads() <= before


def test_an_unusable_address_refuses_to_start_and_stops_what_it_started(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(CN_MEMORIAL)
    (tmp_path / "s.sock").write_text("not a socket")
    before = pdp_threads()
    sidecar = Sidecar(config(tmp_path, rules), environ={})
    with pytest.raises(SetupError, match="exists and is not a socket"):
        sidecar.start()
    assert sidecar.running is None
    assert pdp_threads() <= before
    assert (tmp_path / "s.sock").read_text() == "not a socket"  # never replaced


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"snapshot": ""}, "no snapshot: pass --snapshot"),
        ({"geoip_db": ""}, "no GeoIP database: pass --geoip-db"),
        ({"audit_log": "audit.log"}, "--audit-log needs --audit-hmac-key-file"),
    ],
)
def test_missing_settings_are_named(tmp_path: Path, settings: dict[str, str], message: str) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(CN_MEMORIAL)
    if settings.get("audit_log"):
        settings = {**settings, "audit_log": str(tmp_path / "audit.log")}
    sidecar = Sidecar(config(tmp_path, rules, **settings), environ={})
    with pytest.raises(SetupError, match=message):
        sidecar.start()
    assert sidecar.running is None
