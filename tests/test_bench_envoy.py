"""The Envoy benchmark's pieces: its configs are valid Envoy, its open-loop client counts right."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks import envoy_peer, http_load

from .envoyproxy import envoy_binary, start_upstream


@pytest.mark.parametrize("setup", [*envoy_peer.SETUPS, "unstripped"])
def test_every_setup_is_a_valid_envoy_config(tmp_path: Path, setup: str) -> None:
    text = envoy_peer.config(setup.replace("unstripped", "geoip+rbac"), 8080, tmp_path / "pdp.sock",
                             strip=setup != "unstripped")  # fmt: skip
    (tmp_path / "envoy.yaml").write_text(text)
    completed = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(tmp_path / "envoy.yaml"), "--disable-hot-restart",
         "-l", "error"], capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert ("x-geo-country" in text) == (setup in ("geoip+rbac", "unstripped"))
    assert ("remove: x-geo-country" in text) == (setup == "geoip+rbac")


def test_the_open_loop_client_answers_every_request_it_sends() -> None:
    upstream = start_upstream()
    try:
        result = http_load.measure(upstream.port, ["175.16.199.1", "1.36.0.1"], "/memorial/join", rate=200,
                                   seconds=0.5, connections=4, warmup=0.1)  # fmt: skip
    finally:
        upstream.stop()
    assert result["requests"] == 100
    assert result["unanswered"] == 0
    assert result["statuses"] == {"200": 100}
    assert 0 < result["latency_us"]["p50"] <= result["latency_us"]["p99"] <= result["latency_us"]["max"]
    forwarded = [headers["x-forwarded-for"] for _, headers in upstream.seen.requests]
    assert forwarded.count("175.16.199.1") == forwarded.count("1.36.0.1") == 60  # warm-up 20 + 100, alternating
