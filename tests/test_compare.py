"""benchmarks.compare tells a regression from noise on real result files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.compare import compare, figures, mann_whitney_p

from .conftest import ROOT

DATA = ROOT / "tests" / "data" / "bench"


def _compare(before: str, after: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "benchmarks.compare", str(DATA / before), str(DATA / after), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


def test_two_runs_of_one_server_differ_by_noise_only() -> None:
    result = _compare("baseline-a.json", "baseline-b.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "regression" not in result.stdout
    p99 = next(line for line in result.stdout.splitlines() if line.startswith("latency_us.p99 "))
    assert "noise (n=6/6)" in p99  # a 70 % larger median p99, yet within what repeats scatter


def test_a_slower_server_is_a_regression_with_its_p_value() -> None:
    result = _compare("baseline-a.json", "slower-server.json", "--json")
    assert result.returncode == 1
    verdicts = {row["figure"]: row for row in json.loads(result.stdout)}
    assert verdicts["latency_us.p99"]["verdict"] == "regression"
    assert verdicts["latency_us.p99"]["p_value"] < 0.01
    assert verdicts["latency_us.p50"]["verdict"] == "noise"  # the median call was not slower
    assert verdicts["achieved_rate"]["verdict"] == "noise"  # open loop: the rate is the one asked for


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        # Exact two-sided p-values, as scipy.stats.mannwhitneyu(method="exact") gives them.
        ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10], 0.007937),
        ([1, 3, 5, 7, 9], [2, 4, 6, 8, 10], 0.690476),
        ([1, 2, 3], [4, 5, 6], 0.1),
    ],
)
def test_exact_p_values(before: list[float], after: list[float], expected: float) -> None:
    assert mann_whitney_p(before, after) == pytest.approx(expected, abs=1e-6)


def test_identical_samples_are_never_a_difference() -> None:
    assert mann_whitney_p([5, 5, 5, 5], [5, 5, 5, 5]) == 1.0
    document = {"runs": [{"latency_us": {"p50": 300}}] * 5}
    assert [c.verdict for c in compare(document, document)] == ["noise"]


def test_figures_of_suite_results_and_repeats() -> None:
    document = {"inprocess": {"rows": [{"warm_runs_us": [1.0, 2.0]}]}, "runs": [{"a": 1}, {"a": 2}], "x": 3}
    assert figures(document) == {"inprocess.rows[0].warm_runs_us": [1.0, 2.0], "a": [1.0, 2.0], "x": [3.0]}
    [single] = [c for c in compare(document, document) if c.figure == "x"]
    assert single.verdict == "too few repeats"


def test_unreadable_input_is_exit_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    result = _compare("baseline-a.json", str(broken))
    assert result.returncode == 2
    assert "broken.json" in result.stderr
