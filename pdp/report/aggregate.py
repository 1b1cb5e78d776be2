"""From records to a report: the period, counts per rule and per jurisdiction, the boundary check.

A denial is an enforced DENY record; a shadow match is a record of a shadow
rule (counted apart, never as a denial); sampled ALLOWs are not counted. The
boundary check looks at every record a rule is named in and asks whether the
participant's recorded location lies inside that rule's jurisdiction: the
report states the boundary only when every such record says so.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pdp.report.records import Record, rfc3339
from pdp.report.snapshots import Snapshots

__all__ = ["DEFAULT", "Boundary", "Period", "Report", "Row", "RuleStats", "Tally", "Violation", "build_report"]

DEFAULT = "(default)"  # the jurisdiction column of denials by the policy default (location unknown)


@dataclass(frozen=True, slots=True)
class Period:
    """The report's period: ``start`` inclusive, ``end`` exclusive, both UTC."""

    start: dt.datetime
    end: dt.datetime

    @property
    def span(self) -> dt.timedelta:
        return self.end - self.start

    def __contains__(self, when: dt.datetime) -> bool:
        return self.start <= when < self.end


@dataclass
class Tally:
    """Counts over a set of records."""

    count: int = 0
    meetings: set[str] = field(default_factory=set)
    participants: set[str] = field(default_factory=set)
    located_in: set[str] = field(default_factory=set)
    versions: set[int] = field(default_factory=set)
    first: dt.datetime | None = None
    last: dt.datetime | None = None

    def add(self, record: Record) -> None:
        self.count += 1
        if record.meeting_id:
            self.meetings.add(record.meeting_id)
        if record.participant:
            self.participants.add(record.participant)
        self.located_in.update(record.codes or {"unknown"})
        if record.policy_version is not None:
            self.versions.add(record.policy_version)
        self.first = min(self.first or record.time, record.time)
        self.last = max(self.last or record.time, record.time)


@dataclass
class Row:
    """One line of the Markdown, CSV and JSON reports: a (jurisdiction, rule, legal basis)."""

    jurisdiction: str
    rule_id: str
    legal_basis: str
    denials: Tally = field(default_factory=Tally)
    shadow_matches: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The columns, in order; times RFC 3339 to the second (empty when there was no denial)."""
        tally = self.denials
        return {
            "jurisdiction": self.jurisdiction,
            "rule_id": self.rule_id,
            "legal_basis": self.legal_basis,
            "denials": tally.count,
            "distinct_meetings": len(tally.meetings),
            "distinct_participants": len(tally.participants),
            "located_in": sorted(tally.located_in),
            "first_seen": rfc3339(tally.first) if tally.first else "",
            "last_seen": rfc3339(tally.last) if tally.last else "",
            "shadow_matches": self.shadow_matches,
        }


@dataclass
class RuleStats:
    """One rule's records in the period: enforced denials, or (``shadow``) its shadow matches."""

    rule_id: str
    jurisdiction: tuple[str, ...]
    legal_basis: str
    effect: str  # the verdict the rule gives (ALLOW or DENY)
    shadow: bool
    tally: Tally = field(default_factory=Tally)
    window: str = ""

    @property
    def jurisdiction_text(self) -> str:
        return ", ".join(self.jurisdiction) or DEFAULT


@dataclass(frozen=True, slots=True)
class Violation:
    record: Record
    problem: str


@dataclass
class Boundary:
    """The check behind the report's boundary statement."""

    denials: int = 0  # enforced denials by a rule, checked
    shadow: int = 0  # shadow matches, checked
    other: int = 0  # other records naming a rule (sampled ALLOWs by an allow rule), checked
    violations: list[Violation] = field(default_factory=list)

    @property
    def holds(self) -> bool:
        return not self.violations


@dataclass
class Report:
    period: Period | None  # None: no record and no --since/--until
    records: list[Record]  # those inside the period
    rows: list[Row]
    rules: list[RuleStats]  # enforced rules with at least one denial
    shadow: list[RuleStats]
    default: Tally  # denials by the policy default: location unknown
    boundary: Boundary
    files: int = 0
    read: int = 0  # records read, inside the period or not

    def jurisdictions(self) -> list[str]:
        """The jurisdictions (as the rules name them) with denials or shadow matches, sorted."""
        return sorted({stats.jurisdiction_text for stats in self.rules + self.shadow})

    def versions(self) -> list[int]:
        return sorted({r.policy_version for r in self.records if r.policy_version is not None})


def period_of(records: list[Record], since: dt.datetime | None, until: dt.datetime | None) -> Period | None:
    """[since, until), or else from the first record's second to just after the last record's."""
    times = [record.time for record in records]
    start = since or (min(times).replace(microsecond=0) if times else None)
    end = until or (max(times).replace(microsecond=0) + dt.timedelta(seconds=1) if times else None)
    if start is None or end is None:
        return None
    return Period(start, end)


def check(record: Record, snapshots: Snapshots) -> str | None:
    """Why ``record`` breaks the boundary, or None when its location lies inside its rule's jurisdiction."""
    if not record.jurisdiction:
        return f"rule {record.rule_id} names no jurisdiction in this record: the boundary cannot be checked"
    published = snapshots.rule(record.policy_version, record.rule_id)
    if published is not None and set(published.jurisdiction) != set(record.jurisdiction):
        return (
            f"the log says rule {record.rule_id} covers {', '.join(record.jurisdiction)}, but snapshot"
            f" version {record.policy_version} publishes it for {', '.join(published.jurisdiction)}"
        )
    if record.codes.isdisjoint(record.jurisdiction):
        where = ", ".join(sorted(record.codes)) or "an unknown location"
        what = "denied" if record.verdict == "DENY" and record.mode == "enforce" else f"{record.mode} {record.verdict}"
        return (
            f"a participant located in {where} was {what} by rule {record.rule_id},"
            f" whose jurisdiction is {', '.join(record.jurisdiction)}"
        )
    return None


def build_report(
    records: Iterable[Record],
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    snapshots: Snapshots | None = None,
    files: int | None = None,
) -> Report:
    """Aggregate the records inside [since, until) (or all of them); ``files``: how many were read
    (default: how many files the records come from)."""
    snapshots = snapshots or Snapshots()
    everything = list(records)
    period = period_of(everything, since, until)
    inside = sorted((r for r in everything if period is not None and r.time in period), key=lambda r: r.time)
    rows: dict[tuple[str, str, str], Row] = {}
    stats: dict[tuple[str, bool], RuleStats] = {}
    default, boundary = Tally(), Boundary()
    for record in inside:
        if record.rule_id:
            _check_into(boundary, record, snapshots)
        elif record.verdict == "DENY" and record.mode == "enforce":
            default.add(record)
        if record.verdict == "DENY":
            _add_row(rows, record)
        shadow = record.mode == "shadow"
        if record.rule_id and (shadow or record.verdict == "DENY"):
            key = (record.rule_id, shadow)
            if key not in stats:
                stats[key] = RuleStats(record.rule_id, record.jurisdiction, record.legal_basis, record.verdict, shadow)
            stats[key].tally.add(record)
    for item in stats.values():
        item.window = snapshots.window(item.rule_id, item.tally.versions)
    order = sorted(stats.values(), key=lambda s: (s.jurisdiction_text, s.rule_id))
    return Report(
        period=period,
        records=inside,
        rows=[rows[key] for key in sorted(rows)],
        rules=[s for s in order if not s.shadow],
        shadow=[s for s in order if s.shadow],
        default=default,
        boundary=boundary,
        files=len({r.where.rsplit(":", 1)[0] for r in everything}) if files is None else files,
        read=len(everything),
    )


def _check_into(boundary: Boundary, record: Record, snapshots: Snapshots) -> None:
    if record.mode == "shadow":
        boundary.shadow += 1
    elif record.verdict == "DENY":
        boundary.denials += 1
    else:
        boundary.other += 1
    problem = check(record, snapshots)
    if problem is not None:
        boundary.violations.append(Violation(record, problem))


def _add_row(rows: dict[tuple[str, str, str], Row], record: Record) -> None:
    key = (",".join(record.jurisdiction) or DEFAULT, record.rule_id, record.legal_basis)
    row = rows.setdefault(key, Row(*key))
    if record.mode == "shadow":
        row.shadow_matches += 1
    else:
        row.denials.add(record)
