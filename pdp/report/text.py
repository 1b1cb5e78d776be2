"""The report as Markdown, CSV or JSON: one line per (jurisdiction, rule, legal basis).

The columns are those of pdp 0.1; times are RFC 3339 to the second, in UTC.
Markdown also states the period and the boundary check; CSV and JSON stay
tables, and the command says on stderr when the boundary check failed. A CSV cell
that a spreadsheet would run as a formula starts with ``'`` (JSON keeps the text).
"""

from __future__ import annotations

import csv
import io
import json

from pdp.report.aggregate import Boundary, Period, Report, Row
from pdp.report.records import rfc3339

__all__ = ["COLUMNS", "boundary_statement", "period_text", "render"]

COLUMNS = tuple(Row("", "", "").as_dict())


def period_text(period: Period | None) -> str:
    if period is None:
        return "no records and no --since/--until: the period is empty"
    return f"from {rfc3339(period.start)} to {rfc3339(period.end)} (UTC; the end is not included)"


def _count(number: int, what: str) -> str:
    plural = what + ("es" if what.endswith(("ch", "s")) else "s")
    return f"{number:,} {what if number == 1 else plural}"


def boundary_statement(boundary: Boundary) -> str:
    """The sentence the report stands on, in plain language, as the records bear it out."""
    other = f" and {_count(boundary.other, 'other record')}" if boundary.other else ""
    counted = f"{_count(boundary.denials, 'denial')} and {_count(boundary.shadow, 'shadow match')}{other}"
    checked = f"{counted} attributed to a rule"
    if boundary.holds and not boundary.denials + boundary.shadow + boundary.other:
        return "No rule denied or matched anyone in this period: there was no boundary to cross."
    if boundary.holds:
        return (
            f"No participant located outside a rule's jurisdiction was denied by it: each of the {checked}"
            " was checked against the participant's recorded location."
        )
    return (
        f"BOUNDARY VIOLATED: {_count(len(boundary.violations), 'record')} of the {checked}"
        f" {'shows' if len(boundary.violations) == 1 else 'show'} a rule"
        " applied to a participant it does not cover. This report must not be published as it is;"
        " investigate the records listed."
    )


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP, "CSV
# Injection"): a legal basis is free text from the snapshot, and the CSV is made to be opened.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cells(row: Row) -> dict[str, str | int]:
    document = row.as_dict()
    return {**document, "located_in": " ".join(document["located_in"])}


def _csv_cells(row: Row) -> dict[str, str | int]:
    """The cells, a text that a spreadsheet would run as a formula led by a ``'``, which shows it as text."""
    cells = _cells(row)
    for column, cell in cells.items():
        if isinstance(cell, str) and cell.startswith(_FORMULA_STARTS):
            cells[column] = "'" + cell
    return cells


def _markdown(report: Report) -> str:
    lines = [
        "# Transparency report: geo-admission denials",
        "",
        f"Period: {period_text(report.period)}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in report.rows:
        cells = [" ".join(str(cell).split()).replace("|", "\\|") for cell in _cells(row).values()]
        lines.append("| " + " | ".join(cells) + " |")
    if not report.rows:
        lines.append("| (no denials in this period) |" + " |" * (len(COLUMNS) - 1))
    lines += ["", f"Boundary check: {boundary_statement(report.boundary)}"]
    for violation in report.boundary.violations:
        record = violation.record
        lines.append(f"- {record.where} ({record.decision_id or 'no decision id'}): {violation.problem}")
    return "\n".join(lines) + "\n"


def render(report: Report, fmt: str) -> str:
    """The report as ``md``, ``csv`` or ``json``."""
    if fmt == "json":
        return json.dumps([row.as_dict() for row in report.rows], indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(_csv_cells(row) for row in report.rows)
        return out.getvalue()
    if fmt == "md":
        return _markdown(report)
    raise ValueError(f"unknown report format {fmt!r}")
