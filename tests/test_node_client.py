"""examples/node/client.js, run with node against a real sidecar: what a Node meeting node sees.

The client loads proto/pdp/v1/admission.proto itself (@grpc/proto-loader) and talks to the
server over @grpc/grpc-js; its output is compared with `pdp check` on the same server.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdp.config import ServeConfig
from pdp.geo import GeoDatabase
from pdp.server import start_server
from pdp.state import PolicyHolder

from .conftest import CITY_DB, CN_MEMORIAL, ServerFactory, policy_from

NODE_DIR = Path(__file__).resolve().parent.parent / "examples" / "node"
CHINA, HONG_KONG, WASHINGTON = "175.16.199.1", "2001:2e0::1", "216.160.83.57"


@pytest.fixture(scope="module")
def node() -> str:
    """Path of node, once examples/node has its packages; else a skip (a failure under CI=true)."""
    path = shutil.which("node")
    if path is None:
        problem = "node not found: apt-get install -y nodejs npm, then run `npm ci` in examples/node"
    elif not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        problem = "examples/node has no node_modules: run `npm ci` in examples/node (.ci/run does)"
    else:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(problem)
    pytest.skip(problem)


def run_node(node: str, target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, str(NODE_DIR / "client.js"), *args, "--target", target],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run_pdp(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pdp", "check", "--target", target, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def tcp_target() -> Iterator[tuple[str, PolicyHolder]]:
    """A real server on TCP loopback, a free port chosen by the kernel."""
    holder = PolicyHolder()
    holder.activate(policy_from(CN_MEMORIAL), GeoDatabase(CITY_DB), "test.yaml")
    running = start_server(ServeConfig(listen="127.0.0.1:0"), holder)
    yield running.address, holder
    running.stop(grace=0)


def test_check_denies_mainland_china_with_the_rule_exactly_as_pdp_check_prints(node: str, start: ServerFactory) -> None:
    running, _, _ = start()
    args = ["--ip", CHINA, "--meeting", "m-1", "--tag", "memorial"]
    result = run_node(node, running.address, "check", *args)
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "DENY  cn-memorial"
    assert "  legal basis  Order 17/2020" in lines
    assert "  location     CN (CN-22)" in lines
    reference = run_pdp(running.address, *args)
    assert reference.returncode == 3, reference.stderr
    assert result.stdout == reference.stdout


def test_check_allows_hong_kong_and_json_matches_pdp_check(node: str, tcp_target: tuple[str, PolicyHolder]) -> None:
    target, _ = tcp_target
    args = ["--ip", HONG_KONG, "--meeting", "m-1", "--tag", "memorial"]
    text = run_node(node, target, "check", *args)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[:3] == ["ALLOW  (no rule)", "  reason       no rule applies", "  location     HK"]
    assert text.stdout == run_pdp(target, *args).stdout
    as_json = run_node(node, target, "check", *args, "--json")
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert document["location"] == {"found": True, "country": "HK", "subdivisions": []}
    assert document == json.loads(run_pdp(target, *args, "--json").stdout)


def test_check_batch_keeps_request_order(node: str, start: ServerFactory) -> None:
    running, _, _ = start()
    result = run_node(
        node, running.address, "batch", "--meeting", "m-1", "--tag", "memorial",
        "--ip", CHINA, "--ip", HONG_KONG, "--ip", WASHINGTON,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr  # at least one DENY
    lines = result.stdout.splitlines()
    assert lines[0].startswith("policy version 7, GeoIP build ")
    heads = [lines[i + 1] for i, line in enumerate(lines) if line.startswith("[")]
    assert [line for line in lines if line.startswith("[")] == [f"[0] {CHINA}", f"[1] {HONG_KONG}", f"[2] {WASHINGTON}"]
    # us-wa applies to every meeting; cn-memorial to memorial ones; HK is outside both.
    assert heads == ["DENY  cn-memorial", "ALLOW  (no rule)", "DENY  us-wa"]
    as_json = json.loads(run_node(node, running.address, "batch", "--meeting", "m-1", "--ip", CHINA, "--json").stdout)
    assert [item["verdict"] for item in as_json] == ["ALLOW"]  # not a memorial meeting


def test_watch_policy_reports_a_reload(node: str, start: ServerFactory) -> None:
    running, holder, _ = start()
    watcher = subprocess.Popen(
        [node, str(NODE_DIR / "client.js"), "watch", "--events", "2", "--target", running.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        first = watcher.stdout.readline()  # the event at subscription: the stream is open
        assert first.startswith("policy version 7 active since "), first
        holder.activate_policy(policy_from(CN_MEMORIAL.replace("version: 7", "version: 8")), "reloaded.yaml")
        rest, errors = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 0, errors
    assert rest.startswith("policy version 8 active since "), rest
    assert "GeoIP build " in rest


def test_health_says_serving_and_not_serving(node: str, start: ServerFactory) -> None:
    loaded, _, _ = start()
    serving = run_node(node, loaded.address, "health")
    assert (serving.returncode, serving.stdout) == (0, "SERVING\n"), serving.stderr
    per_service = run_node(node, loaded.address, "health", "--service", "pdp.v1.AdmissionService")
    assert per_service.stdout == "SERVING\n"
    empty, _, _ = start(loaded=False)
    waiting = run_node(node, empty.address, "health")
    assert (waiting.returncode, waiting.stdout) == (1, "NOT_SERVING\n"), waiting.stderr
    refused = run_node(node, empty.address, "check", "--ip", CHINA, "--meeting", "m-1")
    assert refused.returncode == 2
    assert "UNAVAILABLE" in refused.stderr


def test_health_over_tcp(node: str, tcp_target: tuple[str, PolicyHolder]) -> None:
    target, _ = tcp_target
    assert target.startswith("127.0.0.1:")
    result = run_node(node, target, "health")
    assert (result.returncode, result.stdout) == (0, "SERVING\n"), result.stderr


def test_bad_input_is_refused_with_the_field_named(node: str, start: ServerFactory) -> None:
    running, _, _ = start()
    result = run_node(node, running.address, "check", "--ip", "1.2.3", "--meeting", "m-1")
    assert result.returncode == 2
    assert "INVALID_ARGUMENT: participant.ip: '1.2.3' is not an IPv4 or IPv6 address" in result.stderr
    usage = run_node(node, running.address, "check", "--ip", CHINA, "--meeting", "m-1", "--action", "speak")
    assert usage.returncode == 2
    assert '--action: "speak" is not join or host' in usage.stderr


def test_every_call_carries_a_deadline(node: str, tmp_path: Path) -> None:
    # A socket that accepts connections into its backlog and never speaks HTTP/2: without
    # a deadline each call would wait forever (and communicate's timeout would fail the test).
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(path))
        silent.listen(8)
        for command in (["check", "--ip", CHINA, "--meeting", "m"], ["batch", "--ip", CHINA, "--meeting", "m"],
                        ["health"], ["watch", "--watch-seconds", "0.3", "--events", "1"]):  # fmt: skip
            result = run_node(node, f"unix:{path}", *command, "--deadline-ms", "300")
            assert result.returncode == 2, (command, result.stdout, result.stderr)
            assert "DEADLINE_EXCEEDED" in result.stderr, command
