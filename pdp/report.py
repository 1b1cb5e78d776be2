"""Transparency report from the decision audit log.

Aggregates denials per jurisdiction, rule and legal basis: how many, in how
many distinct meetings, for how many distinct (pseudonymous) participants,
first and last seen, where the denied participants were located, and how many
shadow matches each rule had. This is what a platform publishes to show that
an order was applied only inside its jurisdiction.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdp.errors import PdpError

__all__ = ["ReportError", "Row", "build", "chart", "read_records", "render"]


class ReportError(PdpError):
    """An audit log cannot be read (the message names the file and line)."""


@dataclass
class Row:
    jurisdiction: str
    rule_id: str
    legal_basis: str
    denials: int = 0
    shadow_matches: int = 0
    meetings: set[str] = field(default_factory=set)
    participants: set[str] = field(default_factory=set)
    located_in: set[str] = field(default_factory=set)
    first_seen: str = ""
    last_seen: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "jurisdiction": self.jurisdiction,
            "rule_id": self.rule_id,
            "legal_basis": self.legal_basis,
            "denials": self.denials,
            "distinct_meetings": len(self.meetings),
            "distinct_participants": len(self.participants),
            "located_in": sorted(self.located_in),
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "shadow_matches": self.shadow_matches,
        }


def _moment(text: str, what: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ReportError(f"{what}: {text!r} is not a time like 2026-11-01T00:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def read_records(paths: Iterable[str | Path]) -> Iterator[dict[str, Any]]:
    """Every JSON line of every file.

    :raises ReportError: a file is unreadable or a line is not a JSON object.
    """
    for path in paths:
        try:
            handle = Path(path).open(encoding="utf-8")  # noqa: SIM115  # closed by the with below; open errors named first
        except OSError as error:
            raise ReportError(f"{path}: {error.strerror or error}") from None
        with handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ReportError(f"{path}:{number}: not a JSON line ({error.msg})") from None
                if not isinstance(record, dict) or "time" not in record or "rule_id" not in record:
                    raise ReportError(f"{path}:{number}: not an audit record")
                yield record


def build(records: Iterable[dict[str, Any]], since: str | None = None, until: str | None = None) -> list[Row]:
    """Aggregate records in [since, until) into rows, sorted by jurisdiction then rule."""
    start = _moment(since, "--since") if since else None
    end = _moment(until, "--until") if until else None
    rows: dict[tuple[str, str, str], Row] = {}
    for record in records:
        moment = _moment(record["time"], "time")
        if (start and moment < start) or (end and moment >= end):
            continue
        if record.get("verdict") != "DENY":
            continue  # sampled ALLOWs and allow-shadow matches are not denials
        jurisdiction = ",".join(record.get("jurisdiction") or []) or "(default)"
        key = (jurisdiction, record.get("rule_id", ""), record.get("legal_basis", ""))
        row = rows.setdefault(key, Row(*key))
        if record.get("mode") == "shadow":
            row.shadow_matches += 1
            continue
        row.denials += 1
        row.meetings.add(record.get("meeting_id", ""))
        if record.get("participant"):
            row.participants.add(record["participant"])
        location = record.get("location") or {}
        row.located_in.update([location.get("country") or "unknown", *location.get("subdivisions", [])])
        stamp = moment.isoformat()
        row.first_seen = min(row.first_seen or stamp, stamp)
        row.last_seen = max(row.last_seen, stamp)
    return [rows[key] for key in sorted(rows)]


def render(rows: list[Row], fmt: str) -> str:
    """The report as Markdown (md), CSV or JSON."""
    documents = [row.as_dict() for row in rows]
    if fmt == "json":
        return json.dumps(documents, indent=2) + "\n"
    columns = list(documents[0]) if documents else list(Row("", "", "").as_dict())
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for document in documents:
            writer.writerow({**document, "located_in": " ".join(document["located_in"])})
        return out.getvalue()
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for document in documents:
        cells = [" ".join(v) if isinstance(v, list) else str(v) for v in document.values()]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    if not documents:
        lines.append("| (no denials in this period) |" + " |" * (len(columns) - 1))
    return "\n".join(lines) + "\n"


def chart(records: Iterable[dict[str, Any]], rows: list[Row], path: str | Path) -> None:
    """A PNG of denials per day for each (jurisdiction, rule) of the report.

    :raises ReportError: matplotlib (the ``report`` extra) is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("the chart needs matplotlib: pip install 'pdp[report]'") from None
    wanted = {(row.jurisdiction, row.rule_id) for row in rows}
    per_day: dict[tuple[str, str], dict[dt.date, int]] = {key: {} for key in sorted(wanted)}
    for record in records:
        key = (",".join(record.get("jurisdiction") or []) or "(default)", record.get("rule_id", ""))
        if key in wanted and record.get("verdict") == "DENY" and record.get("mode") != "shadow":
            day = _moment(record["time"], "time").date()
            per_day[key][day] = per_day[key].get(day, 0) + 1
    figure, axes = plt.subplots(figsize=(9, 4.5), dpi=100)
    for (jurisdiction, rule_id), counts in per_day.items():
        days = sorted(counts)
        axes.plot(days, [counts[day] for day in days], marker="o", label=f"{jurisdiction}: {rule_id}")  # type: ignore[arg-type]  # matplotlib plots dates
    axes.set_title("Denials per day, by jurisdiction and rule")
    axes.set_ylabel("denials")
    axes.grid(alpha=0.3)
    if per_day:
        axes.legend(fontsize="small")
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
