"""What `pdp serve` and the recheck example print, through the real `pdp` command:
lines that run when pasted, a first line that says when nothing is served, every
message once, and pdp's own words instead of gRPC's."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdp import __version__

from .conftest import CITY_DB, CN_MEMORIAL, ROOT

# The console script `pip install` made, as `make run` starts it; not on the tests' PATH.
PDP_SCRIPT = Path(sys.executable).parent / "pdp"
# A user's shell: no virtualenv on PATH.
BARE_PATH = {**os.environ, "PATH": "/usr/bin:/bin"}


def start(*args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(PDP_SCRIPT), "serve", "--geoip-db", str(CITY_DB), "--log-format", "text", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=BARE_PATH,
        cwd=cwd,
    )


def stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=30)


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(CN_MEMORIAL)
    return path


@pytest.fixture
def serving(tmp_path: Path, rules: Path) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """`.venv/bin/pdp serve` on a TCP port the kernel picks; its two first lines."""
    process = start("--listen", "127.0.0.1:0", "--snapshot", rules.as_uri(), cwd=tmp_path)
    assert process.stdout is not None
    lines = [process.stdout.readline(), process.stdout.readline()]  # block until it listens (or died)
    yield process, lines
    stop(process)


def test_the_suggested_check_runs_when_pasted(serving: tuple[subprocess.Popen[str], list[str]], tmp_path: Path) -> None:
    _, (first, second) = serving
    assert first.startswith(f"pdp {__version__} listening on 127.0.0.1:"), first
    assert "policy version 7 (2 rules)" in first
    assert second.startswith("try: "), second
    command = shlex.split(second.removeprefix("try: "))
    assert command[0] != "pdp"  # not on this PATH: the path of the program itself
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # As pasted into a shell without the virtualenv, from another directory.
    pasted = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env=BARE_PATH, cwd=elsewhere, check=False
    )
    assert pasted.returncode == 3, pasted.stderr  # DENY
    assert pasted.stdout.splitlines()[0] == "DENY  cn-memorial"


def test_the_suggested_check_is_bare_pdp_when_that_is_this_pdp(tmp_path: Path, rules: Path) -> None:
    listen = f"unix:{tmp_path}/s.sock"
    process = subprocess.Popen(
        ["pdp", "serve", "--listen", listen, "--snapshot", rules.as_uri(), "--geoip-db", str(CITY_DB)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PATH": f"{PDP_SCRIPT.parent}:/usr/bin:/bin"},
    )  # fmt: skip
    assert process.stdout is not None
    process.stdout.readline()
    assert process.stdout.readline().startswith(f"try: pdp check --target unix:{tmp_path}/s.sock ")
    stop(process)


@pytest.mark.parametrize(("name", "reason"), [("absent.yaml", "No such file or directory"), ("", "Is a directory")])
def test_a_server_without_a_policy_says_so_first_and_suggests_nothing(tmp_path: Path, name: str, reason: str) -> None:
    snapshot = (tmp_path / name) if name else tmp_path  # a missing file, or a directory
    process = start("--listen", f"unix:{tmp_path}/s.sock", "--snapshot", snapshot.as_uri())
    assert process.stdout is not None
    first, second = process.stdout.readline(), process.stdout.readline()
    assert first.startswith(f"pdp {__version__} NOT SERVING on unix:{tmp_path}/s.sock: no policy: "), first
    assert reason in first
    assert "retries every 2 s" in second
    stdout, stderr = stop(process)
    assert "try:" not in first + second + stdout
    assert process.returncode == 0, stderr


def test_snapshot_problems_are_listed_once(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text("version: 1\nrules:\n  - id: x\n    effect: deny\n    jurisdiction: [XX]\n")
    process = start("--listen", f"unix:{tmp_path}/s.sock", "--snapshot", bad.as_uri())
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    for problem in ("rules.yaml:5: rules[0] (x).jurisdiction: 'XX'", "rules.yaml:3: rules[0] (x).legal_basis:"):
        assert stderr.count(problem) == 1, stderr
    assert stderr.rstrip().splitlines()[-1].startswith("pdp: refusing to start: ")


def test_snapshot_problems_are_in_the_message_when_warnings_are_off(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text("version: 1\nrules:\n  - id: x\n    effect: deny\n    jurisdiction: [XX]\n")
    process = start("--listen", f"unix:{tmp_path}/s.sock", "--snapshot", bad.as_uri(), "--log-level", "error")
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert stderr.count("rules.yaml:5: rules[0] (x).jurisdiction: 'XX'") == 1, stderr


def test_a_busy_port_is_said_once_in_pdps_words(rules: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start("--listen", f"127.0.0.1:{port}", "--snapshot", rules.as_uri())
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert f"pdp: cannot listen on 127.0.0.1:{port}: address already in use" in stderr
    assert "add_port" not in stderr  # gRPC's own C-core log line
    assert not re.search(r"^[EWI]\d{4} ", stderr, re.MULTILINE), stderr
    assert stdout == ""


def test_recheck_says_how_to_run_it_and_stops_quietly_on_ctrl_c(
    serving: tuple[subprocess.Popen[str], list[str]], tmp_path: Path
) -> None:
    _, (first, _) = serving
    target = first.split(" listening on ", 1)[1].split(":", 2)
    address = f"{target[0]}:{target[1]}"
    example = ROOT / "examples" / "recheck.py"
    help_text = subprocess.run([sys.executable, str(example), "--help"], capture_output=True, text=True, check=True)
    assert ".venv/bin/python examples/recheck.py --meetings examples/meetings.json" in help_text.stdout
    assert "--once" in help_text.stdout
    (tmp_path / "meetings.json").write_text(
        json.dumps({"m-1": {"tags": ["memorial"], "participants": [{"ip": "175.16.199.1", "user": "u-1"}]}})
    )
    process = subprocess.Popen(
        [sys.executable, str(example), "--target", address, "--meetings", str(tmp_path / "meetings.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stdout.readline().startswith("policy version 7 active: re-checking 1 meetings")
    assert "remove u-1 from m-1: cn-memorial" in process.stdout.readline()
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert "KeyboardInterrupt" not in stderr
