"""benchmarks/threads.py end to end: real servers, one short repeat, the files it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_threads_loads_each_server_and_writes_its_pairs(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "benchmarks.threads", "--workers", "2,8", "--repeats", "2", "--seconds", "0.3",
            "--addresses", "500", "--out", str(tmp_path)]  # fmt: skip
    completed = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    (written,) = tmp_path.glob("*-threads.json")
    results = json.loads(written.read_text())
    summary = results["summary"]
    assert list(summary) == ["floor", "--workers 2", "--workers 8"]
    assert all(row["errors"] == 0 and row["rate"] > 0 for row in summary.values())
    assert summary["floor"]["rate_vs_floor"] == 1.0
    assert summary["--workers 8"]["first_faster"] in (0, 1, 2)  # of its 2 repeats against --workers 2
    assert all(len(runs) == 2 for runs in results["runs"].values())
    markdown = written.with_suffix(".md").read_text()
    assert markdown in completed.stdout
    assert "| --workers 8 |" in markdown
