"""The report as one self-contained HTML page, to publish as it is.

Inline CSS and an inline SVG chart; a Content-Security-Policy of
``default-src 'none'`` so that the page cannot fetch anything even if a legal
basis smuggled markup past the escaping. Every text from the log is escaped.
Tables have captions and scoped headers, the chart a title and a description,
and the colours meet WCAG AA contrast against their backgrounds.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from html import escape

from pdp import __version__
from pdp.report import charts
from pdp.report.aggregate import Report, RuleStats, Tally
from pdp.report.records import rfc3339
from pdp.report.text import boundary_statement, period_text

__all__ = ["CSP", "SECTIONS", "render_html"]

_NONE = "\N{EN DASH}"  # an empty cell

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
# The sections every report has, in order (ids; the browser test looks for each).
SECTIONS = ("boundary", "summary", "chart", "rules", "shadow", "default", "method")

_CSS = """
:root { color: #1a1a1a; background: #ffffff; font: 16px/1.5 system-ui, "DejaVu Sans", sans-serif; }
body { margin: 0; }
header, main, footer { max-width: 78rem; margin: 0 auto; padding: 0 1.5rem; }
header { padding-top: 2rem; border-bottom: 1px solid #c8ccd2; }
h1 { font-size: 1.9rem; margin: 0 0 .25rem; }
h2 { font-size: 1.35rem; margin: 2.2rem 0 .6rem; }
.lede { font-size: 1.1rem; margin: 0 0 1rem; color: #3a3f45; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1.2rem; margin: 0 0 1.5rem; }
dl.facts dt { font-weight: 600; }
dl.facts dd { margin: 0; }
.verdict { border-left: .45rem solid; padding: .8rem 1rem; font-size: 1.08rem; margin: 0; }
.verdict.holds { border-color: #1b7f3b; background: #e9f6ec; color: #0b3d1a; }
.verdict.broken { border-color: #b00020; background: #fde8ea; color: #5c0011; font-weight: 600; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; margin: .4rem 0 1rem; font-size: .95rem; }
table { font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: 600; padding: .3rem 0; color: #3a3f45; }
th, td { border-bottom: 1px solid #d5d9de; padding: .45rem .4rem; text-align: left; vertical-align: top; }
thead th { background: #eef1f4; border-bottom: 2px solid #8a929c; }
tbody tr:nth-child(even) { background: #f8f9fa; }
td.n, th.n { text-align: right; white-space: nowrap; }
time, .code, .nw { white-space: nowrap; }
td.wide { min-width: 12rem; }
td.window { min-width: 10rem; }
.code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .92em; }
figure { margin: .5rem 0 1rem; }
figure svg { width: 100%; height: auto; }
figcaption { color: #3a3f45; font-size: .95rem; }
footer { border-top: 1px solid #c8ccd2; margin-top: 2.5rem; padding-top: 1rem; padding-bottom: 2rem; color: #3a3f45; }
"""


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _code(text: str) -> str:
    return f'<span class="code">{_e(text)}</span>'


def _time(when: dt.datetime | None) -> str:
    if when is None:
        return _NONE
    stamp = rfc3339(when)
    return f'<time datetime="{stamp}">{stamp}</time>'


def _codes(codes: Iterable[str]) -> str:
    return ", ".join(f'<span class="nw">{_e(code)}</span>' for code in sorted(codes)) or _NONE


def _table(caption: str, head: Sequence[str], rows: Iterable[Sequence[str]], classes: dict[int, str]) -> str:
    """A table whose first cell per row heads it; ``rows`` hold HTML already escaped;
    ``classes`` styles columns by index (``n``: a number, right-aligned; ``wide``: prose)."""
    cls = [f' class="{classes[i]}"' if i in classes else "" for i in range(len(head))]
    heads = "".join(f'<th scope="col"{cls[i]}>{_e(text)}</th>' for i, text in enumerate(head))
    body = []
    for row in rows:
        cells = [f'<th scope="row">{row[0]}</th>'] + [f"<td{cls[i]}>{cell}</td>" for i, cell in enumerate(row) if i]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<div class="scroll"><table><caption>{_e(caption)}</caption>'
        f"<thead><tr>{heads}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _merged(rules: list[RuleStats]) -> Tally:
    total = Tally()
    for rule in rules:
        tally = rule.tally
        total.count += tally.count
        total.meetings |= tally.meetings
        total.participants |= tally.participants
        total.located_in |= tally.located_in
    return total


def _boundary(report: Report) -> str:
    boundary = report.boundary
    state = "holds" if boundary.holds else "broken"
    role = "status" if boundary.holds else "alert"
    heading = "Jurisdiction boundary: holds" if boundary.holds else "Jurisdiction boundary: VIOLATED"
    parts = [f'<h2 id="boundary-h">{heading}</h2>', f'<p class="verdict {state}" role="{role}">']
    parts.append(f"{_e(boundary_statement(boundary))}</p>")
    if not boundary.holds:
        rows = [
            [_code(v.record.decision_id or _NONE), _time(v.record.time), _code(v.record.where), _e(v.problem)]
            for v in boundary.violations
        ]
        parts.append(
            _table("Records that break the boundary", ["Decision", "Time", "Record", "Problem"], rows, {3: "wide"})
        )
    return "".join(parts)


def _summary(report: Report) -> str:
    rows = []
    for jurisdiction in report.jurisdictions():
        enforced = [rule for rule in report.rules if rule.jurisdiction_text == jurisdiction]
        shadow = sum(rule.tally.count for rule in report.shadow if rule.jurisdiction_text == jurisdiction)
        total = _merged(enforced)
        counts = (len(enforced), total.count, len(total.meetings), len(total.participants))
        rows.append([_e(jurisdiction), *(f"{n:,}" for n in counts), _codes(total.located_in), f"{shadow:,}"])
    if not rows:
        return '<h2 id="summary-h">Summary per jurisdiction</h2><p>No rule denied anyone in this period.</p>'
    head = ["Jurisdiction", "Orders applied", "Denials", "Meetings", "Participants", "Located in", "Shadow matches"]
    caption = "Per jurisdiction: orders that denied someone, denials, distinct meetings and pseudonymous participants"
    return '<h2 id="summary-h">Summary per jurisdiction</h2>' + _table(
        caption, head, rows, dict.fromkeys((1, 2, 3, 4, 6), "n")
    )


_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def _stamped(text: str) -> str:
    """``text`` escaped, its RFC 3339 times marked up as <time> (kept on one line)."""
    return _STAMP.sub(lambda m: f'<time datetime="{m[0]}">{m[0]}</time>', _e(text))


def _rule_rows(rules: list[RuleStats]) -> list[list[str]]:
    rows = []
    for rule in rules:
        tally = rule.tally
        counts = (tally.count, len(tally.meetings), len(tally.participants))
        described = (_code(rule.rule_id), _e(rule.jurisdiction_text), _e(rule.legal_basis or _NONE))
        seen = f"{_time(tally.first)}<br>{_time(tally.last)}"
        rows.append([*described, _stamped(rule.window), *(f"{n:,}" for n in counts), _codes(tally.located_in), seen])
    return rows


def _rules(report: Report, shadow: bool) -> str:
    if shadow:
        title, ident = "Shadow rules: evaluated, never enforced", "shadow"
        intro = (
            "<p>A shadow rule is evaluated on every request it covers and logged, but it decides nothing:"
            " the participants below were not denied by it. Shown so that a rule can be reviewed before it is"
            " enforced.</p>"
        )
        count, empty = "Matches", "<p>No shadow rule matched anyone in this period.</p>"
        rules = report.shadow
    else:
        title, ident, intro, count = "Orders applied", "rules", "", "Denials"
        empty, rules = "<p>No rule denied anyone in this period.</p>", report.rules
    head = ["Rule", "Jurisdiction", "Legal basis", "Validity window", count, "Meetings", "Participants"]
    head += ["Located in", f"First and last {'match' if shadow else 'denial'}"]
    caption = (
        f"One row per {'shadow rule' if shadow else 'order'}: its legal basis, its validity window, and what it did"
    )
    classes = {2: "wide", 3: "window", 4: "n", 5: "n", 6: "n"}
    table = _table(caption, head, _rule_rows(rules), classes) if rules else empty
    return f'<h2 id="{ident}-h">{_e(title)}</h2>{intro}{table}'


def _default(report: Report) -> str:
    tally = report.default
    head = '<h2 id="default-h">Participants whose location is unknown</h2>'
    if not tally.count:
        return head + "<p>No participant was denied by the policy default for unknown locations.</p>"
    return head + (
        f"<p>{tally.count:,} denials in {len(tally.meetings):,} meetings, of"
        f" {len(tally.participants):,} participants whose address has no country in the GeoIP database,"
        " by the policy's default for unknown locations (no rule and no jurisdiction is involved)."
        f" First {_time(tally.first)}, last {_time(tally.last)}.</p>"
    )


def _chart(report: Report) -> str:
    head = '<h2 id="chart-h">Denials over time</h2>'
    if report.period is None:
        return head + "<p>No records: nothing to chart.</p>"
    scale = charts.scale_for(report.period)
    title = f"Enforced denials per {scale.per}, {period_text(report.period)}"
    lines = [
        f"{rule.rule_id} ({rule.legal_basis or 'no legal basis'}) in {rule.jurisdiction_text}: {rule.tally.count}"
        for rule in report.rules
    ]
    if report.default.count:
        lines.append(f"policy default for unknown locations: {report.default.count}")
    description = (
        f"Bar chart, one panel per jurisdiction, bars stacked per rule; each bar counts the denials of one {scale.per}."
        f" Denials in the period: {'; '.join(lines) or 'none'}."
    )
    svg = charts.svg(report, title, description)
    caption = (
        f"Enforced denials per {scale.per}, UTC, one panel per jurisdiction; shadow matches are not drawn."
        " The tables above and below give the same numbers."
    )
    return f"{head}<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>"


def _method() -> str:
    points = [
        "A denial is one participant refused entry to (or hosting of) one meeting by an enforced rule."
        " Participants are pseudonyms (HMAC-SHA256 of the account id under a key that never leaves the"
        " platform): they can be counted, not identified.",
        "A participant's location is the country and subdivision of their network address in the GeoIP"
        " database in force at the time, as recorded in the decision log; the boundary statement is checked"
        " against exactly that location.",
        "A rule only ever applies inside its jurisdiction (ISO 3166 codes; CN does not include HK, MO or TW).",
        "All times are UTC, written as RFC 3339 to the second. The period's end is not included.",
    ]
    items = "".join(f"<li>{_e(point)}</li>" for point in points)
    return f'<h2 id="method-h">How to read this report</h2><ul>{items}</ul>'


def _facts(report: Report, generated: dt.datetime) -> str:
    versions = report.versions()
    files = f"{report.files} file{'s' * (report.files != 1)}"
    facts = [
        ("Period", _e(period_text(report.period))),
        ("Generated", _time(generated)),
        ("Decision records", f"{len(report.records):,} in the period, of {report.read:,} read from {files}"),
        ("Policy versions", ", ".join(map(str, versions)) or _NONE),
    ]
    return '<dl class="facts">' + "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts) + "</dl>"


def render_html(report: Report, generated: dt.datetime | None = None) -> str:
    """The whole page.

    :raises ReportError: matplotlib is missing (the chart needs it).
    """
    generated = generated or dt.datetime.now(dt.UTC)
    period = "" if report.period is None else f", {rfc3339(report.period.start)} to {rfc3339(report.period.end)}"
    bodies = {
        "boundary": _boundary(report),
        "summary": _summary(report),
        "chart": _chart(report),
        "rules": _rules(report, shadow=False),
        "shadow": _rules(report, shadow=True),
        "default": _default(report),
        "method": _method(),
    }
    sections = "\n".join(
        f'<section id="{name}" aria-labelledby="{name}-h">{bodies[name]}</section>' for name in SECTIONS
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="referrer" content="no-referrer">
<title>Transparency report: geo-admission denials{_e(period)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>Transparency report: geo-admission denials</h1>
<p class="lede">Which orders this platform applied, where, to how many meetings and participants, and under which
legal basis.</p>
{_facts(report, generated)}
</header>
<main>
{sections}
</main>
<footer>Generated by pdp {_e(__version__)} from its decision audit log.</footer>
</body>
</html>
"""
