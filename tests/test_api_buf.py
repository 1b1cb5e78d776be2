"""The buf step of `make lint` (scripts/check_proto.py) on real git repositories with real buf.

Each test copies proto/ into a fresh repository, makes the change a contributor would,
and runs the script exactly as the Makefile does, only with ``--root`` pointing there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

SCRIPT = ROOT / "scripts" / "check_proto.py"
PROTO = Path("proto") / "pdp" / "v1" / "admission.proto"
# Not the user's git configuration: no signing hooks, no templates, a fixed identity.
GIT_ENV = {
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}

# Field 3 of Participant was account_id; giving the number to a new field is the classic
# break: an old client's account_id arrives as the new field.
REUSED_NUMBER = ("  string account_id = 3;\n", "  int64 region_id = 3;\n")


def git(root: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, env={**os.environ, **GIT_ENV}
    )
    return result.stdout


def check(root: Path, *args: str, ci: bool = False) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )


def edit(root: Path, old: str, new: str) -> None:
    path = root / PROTO
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def commit(root: Path, message: str) -> None:
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository whose main holds a copy of this checkout's proto/ (buf.yaml included)."""
    if shutil.which("git") is None:
        pytest.fail("git not found: apt-get install -y git")
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", root / "proto")
    git(tmp_path, "init", "-q", "-b", "main", str(root))
    commit(root, "pdp.v1")
    return root


def test_this_checkout_passes_lint_format_and_breaking() -> None:
    result = check(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[:2] == ["buf lint: ok", "buf format: ok"]
    assert "buf breaking against " in result.stdout


def test_reused_field_number_on_a_branch_fails(repo: Path) -> None:
    git(repo, "checkout", "-q", "-b", "feature")
    edit(repo, *REUSED_NUMBER)
    commit(repo, "reuse field 3")
    result = check(repo)
    assert result.returncode == 1, result.stdout
    assert "buf breaking against the merge base with main" in result.stdout
    assert 'Field "3" with name "region_id" on message "Participant" changed type from "string" to "int64"' in (
        result.stdout
    )


def test_uncommitted_reuse_on_main_fails(repo: Path) -> None:
    edit(repo, *REUSED_NUMBER)
    result = check(repo)
    assert result.returncode == 1, result.stdout
    assert "buf breaking against HEAD, which is main's tip" in result.stdout
    assert 'on message "Participant"' in result.stdout


def test_what_v1_allows_passes(repo: Path) -> None:
    # New fields, messages, enum values and RPCs: the README's promise of what may change in v1.
    git(repo, "checkout", "-q", "-b", "feature")
    edit(repo, "  int64 geoip_lookup_errors = 23;\n", "  int64 geoip_lookup_errors = 23;\n  string region = 1000;\n")
    edit(repo, "  ACTION_HOST = 2;\n", "  ACTION_HOST = 2;\n  // Share a screen.\n  ACTION_PRESENT = 3;\n")
    edit(
        repo,
        "  rpc GetStatus(GetStatusRequest) returns (GetStatusResponse);\n",
        "  rpc GetStatus(GetStatusRequest) returns (GetStatusResponse);\n\n"
        "  // Explain without a participant.\n"
        "  rpc Explain(ExplainRequest) returns (ExplainResponse);\n",
    )
    with (repo / PROTO).open("a") as proto:
        proto.write("\nmessage ExplainRequest {}\n\nmessage ExplainResponse {}\n")
    commit(repo, "additions")
    result = check(repo)
    assert result.returncode == 0, result.stdout


def test_release_tag_is_the_baseline_and_a_trailer_does_not_excuse_a_break(repo: Path) -> None:
    git(repo, "tag", "v1.0.0")
    edit(repo, "  string meeting_id = 1;\n", "  string meeting = 1;\n")
    commit(repo, "rename a field\n\nProto-Breaking-Change: too late, v1.0.0 is out")
    result = check(repo)
    assert result.returncode == 1, result.stdout
    assert "buf breaking against release tag v1.0.0" in result.stdout
    assert 'Field "1" on message "Meeting" changed name from "meeting_id" to "meeting"' in result.stdout


def test_a_trailer_acknowledges_one_pre_release_break_and_only_that(repo: Path) -> None:
    git(repo, "checkout", "-q", "-b", "feature")
    edit(repo, "  string meeting_id = 1;\n", "  string meeting = 1;\n")
    commit(repo, "rename a field\n\nProto-Breaking-Change: no release yet, STANDARD naming")
    acknowledged = check(repo)
    assert acknowledged.returncode == 0, acknowledged.stdout
    assert "which says Proto-Breaking-Change: no release yet, STANDARD naming" in acknowledged.stdout

    edit(repo, *REUSED_NUMBER)
    commit(repo, "reuse field 3")
    later = check(repo)
    assert later.returncode == 1, later.stdout
    assert 'on message "Participant"' in later.stdout
    assert '"Meeting"' not in later.stdout  # the acknowledged rename is the baseline now


def test_given_baseline_is_used(repo: Path) -> None:
    first = git(repo, "rev-parse", "HEAD").strip()
    edit(repo, "  string meeting_id = 1;\n", "  string meeting = 1;\n")
    commit(repo, "rename a field\n\nProto-Breaking-Change: no release yet")
    assert check(repo).returncode == 0
    result = check(repo, "--against", first)
    assert result.returncode == 1, result.stdout
    assert f"buf breaking against {first} (given)" in result.stdout
    missing = check(repo, "--against", "v9.9.9")
    assert missing.returncode == 1
    assert "--against v9.9.9: no such commit" in missing.stdout


def test_standard_lint_finding_fails(repo: Path) -> None:
    # The name this module had before buf: STANDARD wants <Rpc>Response.
    text = (repo / PROTO).read_text().replace("WatchPolicyResponse", "PolicyEvent")
    (repo / PROTO).write_text(text)
    result = check(repo)
    assert result.returncode == 1, result.stdout
    assert 'RPC response type "PolicyEvent" should be named "WatchPolicyResponse"' in result.stdout
    assert "buf lint: FAILED" in result.stdout


def test_unformatted_proto_fails(repo: Path) -> None:
    edit(repo, "message WatchPolicyRequest {}\n", "message   WatchPolicyRequest {\n}\n")
    result = check(repo)
    assert result.returncode == 1, result.stdout
    assert "buf format: FAILED (run `buf format -w proto`)" in result.stdout
    assert "+message WatchPolicyRequest {}" in result.stdout  # the diff buf would apply


def test_without_git_history_breaking_is_skipped_but_fails_under_ci(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "proto", tmp_path / "proto")  # a source tarball: no .git
    relaxed = check(tmp_path)
    assert relaxed.returncode == 0, relaxed.stdout
    assert "buf breaking: skipped (" in relaxed.stdout
    strict = check(tmp_path, ci=True)
    assert strict.returncode == 1
    assert "is not a git checkout" in strict.stdout


def test_baseline_from_before_the_buf_module_still_compares(repo: Path) -> None:
    # main's proto/ before this change had no buf.yaml: the baseline still builds.
    (repo / "proto" / "buf.yaml").rename(repo / "buf.yaml.kept")
    commit(repo, "no buf.yaml yet")
    git(repo, "checkout", "-q", "-b", "feature")
    (repo / "buf.yaml.kept").rename(repo / "proto" / "buf.yaml")
    edit(repo, *REUSED_NUMBER)
    commit(repo, "buf module, and a break")
    result = check(repo)
    assert result.returncode == 1, result.stdout
    assert 'on message "Participant"' in result.stdout
