"""Tell a regression from run-to-run noise: compare two benchmark result files.

    python -m benchmarks.compare before.json after.json [--alpha 0.05] [--min-change 0.03]

Each file is the JSON of ``pdp loadtest --repeat N --json`` or of the suite
(``benchmarks/results/*.json``). A *figure* is a numeric value at one path in
the file; its samples are the repeats: the values at that path in every entry of
a ``runs`` list, or the numbers of a list (``warm_runs_us``). For every figure
with at least two samples on both sides, a two-sided Mann-Whitney U test (exact
for small samples without ties, normal approximation with tie correction
otherwise) asks whether the two sets could come from one distribution. A
difference is reported as beyond noise only when p < alpha *and* the medians
differ by at least --min-change (a statistically certain 0.5 % is not worth a
bisect). Whether up is worse is read from the figure's name: latencies (``_us``,
``_ms``, ``latency``) are better lower, rates (``rate``, ``per_s``) higher.

With five repeats a side the smallest possible p is 0.008; with three it is 0.1,
so fewer than four repeats can never show a difference at alpha 0.05, and the
report says so. Exit 0 when nothing got worse beyond noise, 1 when something
did, 2 on unreadable input.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

EXIT_SAME, EXIT_REGRESSED, EXIT_ERROR = 0, 1, 2
_LOWER_IS_BETTER = ("_us", "_ms", "latency", "p50", "p90", "p99", "max", "cpu")
_HIGHER_IS_BETTER = ("rate", "per_s", "per_cpu_s", "decisions", "closed_loop_max", "ok")
# Settings of a run, not results; and curves, whose points are not repeats of one figure.
_IGNORED = frozenset(
    ("seconds", "calls", "requested_rate", "in_flight", "batch", "repeats", "curve_us", "curves", "client_cpu_seconds")
)


@dataclass(frozen=True, slots=True)
class Comparison:
    figure: str
    before: tuple[float, ...]
    after: tuple[float, ...]
    p_value: float
    change: float  # relative change of the medians, after vs before
    verdict: str  # noise | regression | improvement | differs | too few repeats


def figures(document: Any) -> dict[str, list[float]]:
    """Every numeric figure of a result file with its samples (see the module docstring)."""
    found: dict[str, list[float]] = {}
    for path, value in _leaves(document, ""):
        found.setdefault(path, []).append(value)
    return found


def _leaves(node: Any, path: str) -> Iterator[tuple[str, float]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in _IGNORED:
                yield from _leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        if node and all(_number(item) for item in node):
            yield from ((path, float(item)) for item in node)
        elif path == "runs" or path.endswith(".runs"):
            # Entries of a "runs" list repeat one another: they share their paths.
            parent = path.removesuffix("runs").removesuffix(".")
            for item in node:
                yield from _leaves(item, parent)
        else:
            for index, item in enumerate(node):
                yield from _leaves(item, f"{path}[{index}]")
    elif _number(node):
        yield path, float(node)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def mann_whitney_p(before: Sequence[float], after: Sequence[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test."""
    pooled = sorted((value, side) for side, values in enumerate((before, after)) for value in values)
    ranks: list[float] = [0.0] * len(pooled)
    ties: list[int] = []
    start = 0
    while start < len(pooled):
        end = start
        while end + 1 < len(pooled) and pooled[end + 1][0] == pooled[start][0]:
            end += 1
        for index in range(start, end + 1):
            ranks[index] = (start + end) / 2 + 1
        ties.append(end - start + 1)
        start = end + 1
    n1, n2 = len(before), len(after)
    rank_sum = sum(rank for rank, (_, side) in zip(ranks, pooled, strict=True) if side == 0)
    u = rank_sum - n1 * (n1 + 1) / 2
    u_low = min(u, n1 * n2 - u)
    if all(count == 1 for count in ties) and n1 * n2 <= 400:
        total = math.comb(n1 + n2, n1)
        at_most = sum(_u_count(n1, n2, k) for k in range(int(u_low) + 1))
        return min(1.0, 2 * at_most / total)
    mean = n1 * n2 / 2
    n = n1 + n2
    tie_term = sum(count**3 - count for count in ties) / (n * (n - 1))
    deviation = math.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term))
    if deviation == 0:
        return 1.0
    z = (abs(u - mean) - 0.5) / deviation  # continuity correction
    return min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2)))


@cache
def _u_count(n1: int, n2: int, u: int) -> int:
    """How many arrangements of n1 and n2 distinct values give U statistic ``u``."""
    if u < 0 or u > n1 * n2:
        return 0
    if n1 == 0 or n2 == 0:
        return 1 if u == 0 else 0
    return _u_count(n1 - 1, n2, u - n2) + _u_count(n1, n2 - 1, u)


def direction(figure: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when the name does not say."""
    name = figure.lower()
    if any(word in name for word in _HIGHER_IS_BETTER):
        return 1
    if any(word in name for word in _LOWER_IS_BETTER):
        return -1
    return 0


def compare(before: Any, after: Any, alpha: float = 0.05, min_change: float = 0.03) -> list[Comparison]:
    """Compare the figures present in both documents, in the order of ``before``."""
    old, new = figures(before), figures(after)
    results = []
    for figure, old_samples in old.items():
        new_samples = new.get(figure)
        if new_samples is None:
            continue
        old_median, new_median = statistics.median(old_samples), statistics.median(new_samples)
        change = (new_median - old_median) / abs(old_median) if old_median else (0.0 if new_median == 0 else math.inf)
        if min(len(old_samples), len(new_samples)) < 2:
            results.append(Comparison(figure, tuple(old_samples), tuple(new_samples), 1.0, change, "too few repeats"))
            continue
        p_value = mann_whitney_p(old_samples, new_samples)
        if p_value >= alpha or abs(change) < min_change:
            verdict = "noise"
        else:
            better = direction(figure)
            verdict = "differs" if better == 0 else ("improvement" if change * better > 0 else "regression")
        results.append(Comparison(figure, tuple(old_samples), tuple(new_samples), p_value, change, verdict))
    return results


def _load(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"compare: {path}: {error}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="result file of the baseline")
    parser.add_argument("after", help="result file of the candidate")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    parser.add_argument("--min-change", type=float, default=0.03, help="smallest relative change (default 0.03)")
    parser.add_argument("--all", action="store_true", help="also list figures without repeats")
    parser.add_argument("--json", action="store_true", help="print JSON")
    options = parser.parse_args(argv)
    try:
        results = compare(_load(options.before), _load(options.after), options.alpha, options.min_change)
    except SystemExit as error:
        print(error, file=sys.stderr)
        return EXIT_ERROR
    shown = [r for r in results if options.all or r.verdict != "too few repeats"]
    if options.json:
        print(json.dumps([_as_json(r) for r in shown], indent=2))
    else:
        print("\n".join(_table(shown, len(results) - len(shown))))
    return EXIT_REGRESSED if any(r.verdict == "regression" for r in results) else EXIT_SAME


def _as_json(result: Comparison) -> dict[str, Any]:
    return {
        "figure": result.figure,
        "before": list(result.before),
        "after": list(result.after),
        "median_before": statistics.median(result.before),
        "median_after": statistics.median(result.after),
        "change": round(result.change, 4) if math.isfinite(result.change) else None,
        "p_value": round(result.p_value, 4),
        "verdict": result.verdict,
    }


def _table(results: Sequence[Comparison], hidden: int) -> list[str]:
    width = max([len(r.figure) for r in results] + [6])
    lines = [f"{'figure':<{width}}  {'before':>10}  {'after':>10}  {'change':>8}  {'p':>6}  verdict"]
    for r in results:
        change = f"{r.change:+.1%}" if math.isfinite(r.change) else "n/a"
        lines.append(
            f"{r.figure:<{width}}  {statistics.median(r.before):>10,.6g}  {statistics.median(r.after):>10,.6g}"
            f"  {change:>8}  {r.p_value:>6.3f}  {r.verdict} (n={len(r.before)}/{len(r.after)})"
        )
    if hidden:
        lines.append(f"({hidden} figures without repeats not shown; --all lists them)")
    if any(min(len(r.before), len(r.after)) < 4 for r in results if r.verdict != "too few repeats"):
        lines.append("note: with fewer than 4 repeats a side no difference can reach p < 0.05")
    return lines


if __name__ == "__main__":
    sys.exit(main())
