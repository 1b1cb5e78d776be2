"""The README's AuthZEN examples, pasted into a shell against a real sidecar as `make run` starts it."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdp.geo import demo_database_path

from .authzen import SidecarFactory, running_sidecars
from .conftest import ROOT
from .servers import require_binary

DOCUMENTED_URL = "http://127.0.0.1:8080"  # make run's --http-listen


@pytest.fixture
def sidecars(tmp_path: Path) -> Iterator[SidecarFactory]:
    yield from running_sidecars(tmp_path)


def examples() -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for every ``$ `` line of the README's AuthZEN section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## AuthZEN\n", 1)[1].split("\n## ", 1)[0]
    found: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", section, re.DOTALL):
        lines = block.splitlines()
        position = 0
        while position < len(lines):
            assert lines[position].startswith("$ "), lines[position]
            command = [lines[position][2:]]
            # A command goes on while a quote is open or a line ends with a backslash.
            while "".join(command).count("'") % 2 or command[-1].endswith("\\"):
                position += 1
                command.append(lines[position])
            position += 1
            output: list[str] = []
            while position < len(lines) and not lines[position].startswith("$ "):
                output.append(lines[position])
                position += 1
            found.append(("\n".join(command), output))
    return found


def test_the_readme_has_authzen_examples() -> None:
    commands = [command for command, _ in examples()]
    assert len(commands) >= 5
    assert all(command.startswith("curl -s http://127.0.0.1:8080/") for command in commands)


def test_the_readme_examples_print_what_the_readme_says(sidecars: SidecarFactory) -> None:
    require_binary("curl", "curl")
    require_binary("jq", "jq")
    rules = (ROOT / "examples" / "rules.yaml").read_text()
    sidecar = sidecars(rules, geoip_db=str(demo_database_path()))
    assert sidecar.http is not None
    for command, expected in examples():
        completed = subprocess.run(
            ["bash", "-c", "set -o pipefail; " + command.replace(DOCUMENTED_URL, sidecar.http.url)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert completed.returncode == 0, (command, completed.stderr)
        wanted = [line.replace(DOCUMENTED_URL, sidecar.http.url) for line in expected]
        assert completed.stdout.splitlines() == wanted, command
