"""Transparency report from the decision audit log.

Per jurisdiction, rule and legal basis: how many denials, in how many distinct
meetings, for how many distinct (pseudonymous) participants, where they were
located, first and last seen, and each rule's shadow matches apart; a check,
record by record, that no rule applied to anyone outside its jurisdiction; and
a chart over the report's period. Stages: :mod:`records` (reading),
:mod:`aggregate` (counting, checking), :mod:`charts`, :mod:`text` (Markdown,
CSV, JSON) and :mod:`html`.
"""

from __future__ import annotations

from pdp.report.aggregate import Boundary, Period, Report, Row, RuleStats, Violation, build_report
from pdp.report.records import Record, ReportError, load, moment, read_records, rfc3339
from pdp.report.snapshots import Snapshots
from pdp.report.text import render

__all__ = [
    "Boundary",
    "Period",
    "Record",
    "Report",
    "ReportError",
    "Row",
    "RuleStats",
    "Snapshots",
    "Violation",
    "build_report",
    "load",
    "moment",
    "read_records",
    "render",
    "rfc3339",
]
