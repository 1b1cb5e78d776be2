"""``pdp snapshot diff`` through the real command: exit codes like diff(1), reach spelled out."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

BASE = """
version: 41
defaults: {unknown_location: allow}
rules:
  - id: cn-memorial
    effect: deny
    jurisdiction: [CN]
    actions: [join]
    meetings: {tags: [memorial]}
    legal_basis: Order 17/2020
    valid_from: 2020-06-01T00:00:00Z
    valid_until: 2020-06-05T00:00:00Z
  - id: us-wa
    effect: deny
    jurisdiction: [US-WA]
    legal_basis: WA statute
"""


def pdp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdp", *args], capture_output=True, text=True, timeout=60, check=False)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def diff_json(old: Path, new: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = pdp("snapshot", "diff", str(old), str(new), "--json", *args)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def test_equal_snapshots_exit_0_even_when_written_differently(tmp_path: Path) -> None:
    old = write(tmp_path, "old.yaml", BASE)
    moved = "effect: deny\n    actions: [join]\n    jurisdiction: [CN]"
    reordered = BASE.replace("    actions: [join]\n", "").replace("effect: deny\n    jurisdiction: [CN]", moved)
    new = write(tmp_path, "new.yaml", "# a comment changes nothing\n" + reordered)
    result = pdp("snapshot", "diff", str(old), str(new))
    assert (result.returncode, result.stdout.splitlines()[-1]) == (0, "rules and defaults are identical")


def test_only_the_version_differs(tmp_path: Path) -> None:
    old = write(tmp_path, "old.yaml", BASE)
    new = write(tmp_path, "new.yaml", BASE.replace("version: 41", "version: 42"))
    code, report = diff_json(old, new)
    assert (code, report["equal"], report["rules_equal"]) == (1, False, True)


def test_added_removed_and_widened_rules_name_what_they_now_reach(tmp_path: Path) -> None:
    old = write(tmp_path, "old.yaml", BASE)
    new_text = (
        BASE.replace("version: 41", "version: 42")
        .replace("jurisdiction: [CN]", "jurisdiction: [CN, HK]")
        .replace("actions: [join]", "actions: [join, host]")
        .replace("    meetings: {tags: [memorial]}\n", "")
        .replace("  - id: us-wa\n    effect: deny\n    jurisdiction: [US-WA]\n    legal_basis: WA statute\n",
                 "  - id: hk-order\n    effect: deny\n    jurisdiction: [HK]\n    legal_basis: HK order\n")
    )  # fmt: skip
    new = write(tmp_path, "new.yaml", new_text)
    code, report = diff_json(old, new)
    assert code == 1
    changes: list[dict[str, Any]] = report["changed"]
    assert [rule["id"] for rule in report["added"]] == ["hk-order"]
    assert [rule["id"] for rule in report["removed"]] == ["us-wa"]
    [changed] = changes
    fields = {f["field"]: f for f in changed["fields"]}
    assert fields["jurisdiction"]["reaches"] == ["HK"]
    assert fields["actions"]["reaches"] == ["host"]
    assert fields["tags"]["reaches"] == ["every meeting (no tag selector)"]
    assert changed["jurisdictions"] == ["CN", "HK"]
    assert report["jurisdictions"] == ["CN", "HK", "US-WA"]
    text = pdp("snapshot", "diff", str(old), str(new)).stdout
    assert "~ changed  cn-memorial  (jurisdiction CN, HK)" in text
    assert "now reaches: HK" in text
    assert "+ added    hk-order" in text
    assert "- removed  us-wa" in text


def test_a_narrowed_window_says_which_interval_it_no_longer_reaches(tmp_path: Path) -> None:
    old = write(tmp_path, "old.yaml", BASE)
    new = write(tmp_path, "new.yaml", BASE.replace("2020-06-05T00:00:00Z", "2020-06-03T12:00:00Z"))
    _, report = diff_json(old, new)
    [window] = report["changed"][0]["fields"]
    assert window["field"] == "window"
    assert window["reaches"] == []
    assert window["stops_reaching"] == ["2020-06-03T12:00:00Z .. 2020-06-05T00:00:00Z"]


def test_defaults_and_mode_changes(tmp_path: Path) -> None:
    old = write(
        tmp_path, "old.yaml", BASE.replace("legal_basis: WA statute", "legal_basis: WA statute\n    mode: shadow")
    )
    new = write(tmp_path, "new.yaml", BASE.replace("unknown_location: allow", "unknown_location: deny"))
    _, report = diff_json(old, new)
    assert report["defaults"][0]["reaches"] == ["participants with no located country"]
    [mode] = report["changed"][0]["fields"]
    assert (mode["field"], mode["before"], mode["after"]) == ("mode", "shadow", "enforce")


def test_signed_envelopes_are_read_through_their_signature(tmp_path: Path) -> None:
    assert pdp("keygen", "--out", str(tmp_path / "k")).returncode == 0
    assert pdp("keygen", "--out", str(tmp_path / "other")).returncode == 0
    rules = write(tmp_path, "rules.yaml", BASE)
    signed = tmp_path / "signed.json"
    assert pdp("snapshot", "sign", str(rules), "--key", str(tmp_path / "k.key"), "--out", str(signed)).returncode == 0
    verified = pdp("snapshot", "diff", str(rules), str(signed), "--pubkey", str(tmp_path / "k.pub"))
    assert verified.returncode == 0, verified.stderr
    assert "not checked" not in verified.stdout
    unverified = pdp("snapshot", "diff", str(rules), str(signed))
    assert f"note: {signed} is signed, but no --pubkey was given" in unverified.stdout
    wrong_key = pdp("snapshot", "diff", str(rules), str(signed), "--pubkey", str(tmp_path / "other.pub"))
    assert wrong_key.returncode == 2
    assert "unknown key" in wrong_key.stderr
    tampered = tmp_path / "tampered.json"
    envelope = json.loads(signed.read_bytes())
    payload = base64.b64decode(envelope["payload"]).replace(b"Order 17/2020", b"Order 17/2021")
    tampered.write_text(json.dumps(envelope | {"payload": base64.b64encode(payload).decode()}))
    bad = pdp("snapshot", "diff", str(rules), str(tampered), "--pubkey", str(tmp_path / "k.pub"))
    assert (bad.returncode, "bad signature" in bad.stderr) == (2, True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "version: 42\nrules:\n  - id: x\n    effect: deny\n    legal_basis: L\n",
            "new.yaml:3: rules[0] (x).jurisdiction: required",
        ),
        ("version: [", "new.yaml"),
    ],
)
def test_an_invalid_side_is_exit_2_naming_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    old = write(tmp_path, "old.yaml", BASE)
    new = tmp_path / "new.yaml"
    new.write_text(text)
    result = pdp("snapshot", "diff", str(old), str(new))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    missing = pdp("snapshot", "diff", str(old), str(tmp_path / "absent.yaml"))
    assert (missing.returncode, "cannot read" in missing.stderr) == (2, True)
