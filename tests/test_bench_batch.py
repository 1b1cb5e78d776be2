"""The CheckBatch-against-nginx benchmark's pieces, against a real nginx and a real pdp serve."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import batch_peer, inprocess, nginx_peer
from benchmarks.harness import ROOT

from .servers import free_port


def _nginx_or_skip() -> None:
    missing = nginx_peer.available()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"nginx with the geoip2 module is required under CI: {missing}")
        pytest.skip(missing)


def test_both_sides_deny_the_same_and_count_decisions_and_cpu(tmp_path: Path) -> None:
    _nginx_or_skip()
    located = inprocess.located_addresses(300)
    addresses = tmp_path / "addresses.txt"
    addresses.write_text("\n".join(located))
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(batch_peer.RULES))
    nginx = batch_peer.Nginx(tmp_path, addresses, port=free_port())
    pdp = batch_peer.start_pdp(ROOT, f"unix:{tmp_path}/pdp.sock", rules)
    try:
        verdicts = batch_peer.same_verdicts(pdp, nginx, located[: batch_peer.BATCH])
        ours = batch_peer.pdp_repeat(pdp, addresses, 0.5, 2)
        theirs = nginx.repeat(1, 4)  # wrk takes whole seconds
    finally:
        nginx.stop()
        pdp.stop()
    assert verdicts["asked"] == 100
    assert 0 < verdicts["denied_by_both"] < 100  # the addresses span CN and elsewhere
    assert ours["errors"] == {}
    assert ours["decisions"] > 0
    assert ours["decisions"] % batch_peer.BATCH == 0
    assert ours["server_cpu_s"] > 0
    assert 0 < theirs["denied"] < theirs["decisions"]
    assert theirs["server_cpu_s"] > 0
    runs = {"pdp": [ours], "nginx-geoip2": [theirs]}
    summary = batch_peer.summary(runs)
    assert summary["sides"]["nginx-geoip2"]["ratio_to_nginx"] == 1.0
    assert summary["ratio_per_repeat"] == [round(ours["decisions_per_cpu_s"] / theirs["decisions_per_cpu_s"], 3)]
