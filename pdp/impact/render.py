"""The impact report printed: Markdown for people, CSV for spreadsheets, a PNG chart.

Every function here reads the document :func:`pdp.impact.report.document`
built (JSON is that document as it is), so the formats cannot disagree.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["RenderError", "chart", "csv_text", "markdown"]

_GROUP_COLUMNS = (
    "jurisdiction", "rule_id", "legal_basis", "meeting_id", "action", "direction",
    "flips", "decisions", "distinct_participants",
)  # fmt: skip


_ROWS = 15  # rows of a Markdown table; CSV and JSON have them all


class RenderError(Exception):
    """A format cannot be produced (matplotlib missing for the chart)."""


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _cell(value: object) -> str:
    text = " ".join(map(str, value)) if isinstance(value, list) else str(value)
    return (text or "(none)").replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def markdown(doc: dict[str, Any]) -> str:
    """The report as Markdown."""
    lines = _head(doc)
    lines += _flip_tables(doc)
    lines += _boundary_lines(doc["boundary"])
    lines += _sample_lines(doc)
    lines += _skipped_lines(doc["logs"])
    if doc["notes"]:
        lines += ["## Notes", "", *[f"- {note}" for note in doc["notes"]], ""]
    return "\n".join(lines)


def _head(doc: dict[str, Any]) -> list[str]:
    candidate, logs, sampling = doc["candidate"], doc["logs"], doc["sampling"]
    lines = [
        f"# Impact of {candidate['file']} (version {candidate['version']}, sha256 {candidate['sha256'][:12]})",
        "",
        f"Replayed {sampling['records']:,} recorded decisions ({logs['lines']:,} lines in "
        f"{len(logs['files'])} files) standing for {_number(sampling['decisions'])} decisions.",
        "",
        "## Sampling",
        "",
        f"- DENY: every one is recorded (scale 1): {sampling['deny_records']:,} records",
    ]
    for allow in sampling["allow"]:
        lines.append(
            f"- ALLOW: sampled at {allow['rate']:g} (scale {allow['scale']:g}): {allow['records']:,} records "
            f"stand for {_number(allow['decisions'])} decisions"
        )
    if not sampling["allow"]:
        lines.append(
            "- ALLOW: none recorded (`--audit-allow-sample-rate` 0): decisions the candidate would newly deny "
            "cannot be seen in this log; DENY->ALLOW flips are exact"
        )
    lines += ["", "## Baseline", ""]
    baselines = doc["baselines"]
    if doc["against"]:
        lines.append(f"- every record decided again by {doc['against']}")
    for row in baselines["by_policy"]:
        where = row["decided_again_from"]
        how = f"confirmed by deciding again with {where}" if where else "snapshot not found: the recorded verdict"
        lines.append(f"- version {row['version']} (sha256 {row['sha256'][:12]}): {row['records']:,} records; {how}")
    if not doc["against"]:
        lines.append(f"- records the named policy decides differently: {baselines['disagreements']}")
        lines += [f"  - {example}" for example in baselines["disagreement_examples"]]
    changed = doc["changed_rules"]
    lines += ["", "Rules the candidate changes: " + (", ".join(f"{r} ({c})" for r, c in changed.items()) or "none")]
    if doc["changed_defaults"]:
        lines.append("Defaults the candidate changes: " + ", ".join(doc["changed_defaults"]))
    return [*lines, ""]


def _flip_tables(doc: dict[str, Any]) -> list[str]:
    flips = doc["flips"]
    lines = [
        "## What flips",
        "",
        f"**{flips['records']:,} recorded decisions flip, standing for {_number(flips['decisions'])} decisions**"
        f" (and {doc['same_verdict_other_rule']:,} keep their verdict under another rule).",
        "",
    ]
    tables = (
        ("By direction", ["direction"], "by_direction"),
        ("By jurisdiction", ["jurisdiction"], "by_jurisdiction"),
        ("By rule", ["rule", "legal basis"], "by_rule"),
        ("By legal basis", ["legal basis"], "by_legal_basis"),
        ("By meeting", ["meeting"], "by_meeting"),
        ("By action", ["action"], "by_action"),
    )
    for title, header, name in tables:
        rows = [[*r["key"], r["flips"], _number(r["decisions"]), r["distinct_participants"]] for r in flips[name]]
        if rows:
            lines += [f"### {title}", ""]
            lines += _table([*header, "flips (records)", "decisions (scaled)", "distinct participants"], rows[:_ROWS])
        if len(rows) > _ROWS:
            lines += [f"... and {len(rows) - _ROWS} more (every row: --format csv or json)", ""]
    return lines


def _boundary_lines(boundary: dict[str, Any]) -> list[str]:
    lines = ["## Boundary", ""]
    if boundary["holds"]:
        lines += [
            "Every flipped participant lies inside the jurisdiction of each rule that decided it, before and after.",
            "",
        ]
    else:
        lines += [
            f"**BOUNDARY VIOLATED: {len(boundary['violations'])} flipped decisions were made by a rule whose "
            "jurisdiction does not cover the participant. This is a bug in pdp: report it.**",
            "",
        ]
    rows = [
        [r["rule_id"], r["change"], r["jurisdiction"], r["flips"], _number(r["decisions"]), r["located_in"],
         r["outside"]]
        for r in boundary["rules"]
    ]  # fmt: skip
    if rows:
        header = ["rule", "change", "jurisdiction", "flips", "decisions", "flipped participants located in", "outside"]
        lines += _table(header, rows)
    for violation in boundary["violations"][:20]:
        lines.append(f"- {violation['where']}: {violation['location']}, decided by {', '.join(violation['outside'])}")
    return lines + ([""] if boundary["violations"] else [])


def _sample_lines(doc: dict[str, Any]) -> list[str]:
    samples = doc["samples"]
    if not samples:
        return []
    header = ["where", "time", "participant", "meeting", "action", "location", "before", "after", "stands for"]
    rows = [
        [s["where"], s["time"], s["participant"] or "(none)", s["meeting_id"], s["action"], s["location"],
         s["before"], s["after"], f"{s['stands_for']:g}"]
        for s in samples
    ]  # fmt: skip
    return [f"## Sample records (first {len(samples)}; pseudonymous ids as in the log)", "", *_table(header, rows)]


def _skipped_lines(logs: dict[str, Any]) -> list[str]:
    lines = ["## Lines not replayed", ""]
    rows: list[list[object]] = [
        ["shadow match lines (repeat a decision, not one)", logs["shadow_lines"], ""],
        ["outside --since/--until", logs["outside_period"], ""],
        ["duplicates (same decision_id)", logs["duplicates"], ""],
    ]
    for kind, skipped in logs["skipped"].items():
        rows.append([f"{kind}: {skipped['meaning']}", skipped["lines"], "; ".join(skipped["first"][:3])])
    return lines + _table(["kind", "lines", "first"], rows)


def csv_text(doc: dict[str, Any]) -> str:
    """One row per (jurisdiction, rule, legal basis, meeting, action, direction)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=_GROUP_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(doc["flips"]["groups"])
    return out.getvalue()


def chart(doc: dict[str, Any], path: str | Path) -> None:
    """A PNG: flipped decisions per rule (by direction), and over time.

    :raises RenderError: matplotlib (the ``report`` extra) is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RenderError("the chart needs matplotlib: pip install 'pdp[report]'") from None
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    _bars(left, doc)
    _timeline(right, doc)
    figure.suptitle(f"Impact of {doc['candidate']['file']} (version {doc['candidate']['version']})")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


_COLOURS = {"ALLOW->DENY": "#c0392b", "DENY->ALLOW": "#27ae60"}


def _bars(axes: Any, doc: dict[str, Any]) -> None:
    per_rule: dict[str, dict[str, float]] = defaultdict(dict)
    for group in doc["flips"]["groups"]:
        label = f"{group['rule_id'] or '(default)'} [{group['jurisdiction']}]"
        per_rule[label][group["direction"]] = per_rule[label].get(group["direction"], 0) + group["decisions"]
    labels = sorted(per_rule, key=lambda label: sum(per_rule[label].values()))
    left = [0.0] * len(labels)
    for direction, colour in _COLOURS.items():
        values = [per_rule[label].get(direction, 0.0) for label in labels]
        if not any(values):
            continue
        axes.barh(labels, values, left=left, color=colour, label=direction)
        left = [a + b for a, b in zip(left, values, strict=True)]
    axes.set_title("Decisions that would flip, by rule [jurisdiction] (scaled)")
    axes.set_xlabel("decisions")
    if labels:
        axes.legend(fontsize="small")
    else:
        axes.text(0.5, 0.5, "nothing flips", ha="center", va="center", transform=axes.transAxes)


def _timeline(axes: Any, doc: dict[str, Any]) -> None:
    points = [
        (dt.datetime.fromisoformat(p["minute"]), p["rule_id"] or "(default)", p["decisions"]) for p in doc["timeline"]
    ]
    if not points:
        axes.set_title("Flipped decisions over time")
        axes.text(0.5, 0.5, "nothing flips", ha="center", va="center", transform=axes.transAxes)
        return
    span = max(p[0] for p in points) - min(p[0] for p in points)
    bucket, unit = (
        (dt.timedelta(minutes=1), "minute")
        if span <= dt.timedelta(hours=3)
        else (dt.timedelta(hours=1), "hour")
        if span <= dt.timedelta(days=7)
        else (dt.timedelta(days=1), "day")
    )
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    per_rule: dict[str, dict[dt.datetime, float]] = defaultdict(lambda: defaultdict(float))
    for moment, rule_id, decisions in points:
        per_rule[rule_id][epoch + ((moment - epoch) // bucket) * bucket] += decisions
    for rule_id, counts in sorted(per_rule.items()):
        times = sorted(counts)
        axes.plot(times, [counts[t] for t in times], marker="o", label=rule_id)
    first, last = min(p[0] for p in points), max(p[0] for p in points)
    axes.set_xlim(first - bucket, last + bucket)
    axes.set_ylim(bottom=0)
    axes.set_title(f"Flipped decisions per {unit} (scaled)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    for label in axes.get_xticklabels():
        label.set_rotation(30)
        label.set_horizontalalignment("right")
