"""`pdp report` on audit logs written by a real `pdp serve` under scripted traffic.

The server writes its records within a second or two. The one-hour, one-day,
one-month and one-year logs are copies of that real log in which only each
record's ``time`` was rewritten (``tests/auditlogs.py``'s ``spread``): every other
field is as the server wrote it. Records that break the jurisdiction boundary
are real records with one field rewritten, standing in for a faulty or
tampered sidecar; each test says which field.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from matplotlib import dates as mdates
from matplotlib.figure import Figure

from pdp.cli import main
from pdp.report import ReportError, Snapshots, build_report, load, render
from pdp.report.aggregate import Report
from pdp.report.charts import figure
from pdp.report.html import CSP, SECTIONS, render_html
from pdp.report.text import COLUMNS

from .auditlogs import PDP, SNAPSHOT, Traffic, serve_and_log, spread
from .chromium import Chromium, Visit

UTC = dt.UTC
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
# name: (start, length, major tick locator, bar width)
SPANS: dict[str, tuple[dt.datetime, dt.timedelta, type, dt.timedelta]] = {
    "hour": (dt.datetime(2026, 6, 1, 10, tzinfo=UTC), dt.timedelta(hours=1), mdates.MinuteLocator,
             dt.timedelta(minutes=5)),
    "day": (dt.datetime(2026, 6, 1, tzinfo=UTC), dt.timedelta(days=1), mdates.HourLocator, dt.timedelta(hours=1)),
    "month": (dt.datetime(2026, 6, 1, tzinfo=UTC), dt.timedelta(days=30), mdates.DayLocator, dt.timedelta(days=1)),
    "year": (dt.datetime(2026, 1, 1, tzinfo=UTC), dt.timedelta(days=365), mdates.WeekdayLocator, dt.timedelta(weeks=1)),
}  # fmt: skip
LABELS = {"hour": r"\d\d:\d\d", "day": r"\d\d:\d\d|\d\d [A-Z][a-z]{2}", "month": r"\d\d [A-Z][a-z]{2}"}
LABELS["year"] = LABELS["month"]
PER = {"hour": "5 minutes", "day": "hour", "month": "day", "year": "week"}
HOSTILE = "'</table><script>alert(1)</script><img src=\"http://127.0.0.1:9/x.png\"> & Notice'"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Traffic]:
    """(audit log, snapshot, what the traffic was answered) from one real server run."""
    return serve_and_log(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def hostile_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real server's log under a snapshot whose legal basis is markup that would fetch an image."""
    snapshot = SNAPSHOT.replace("legal_basis: Notice 4/2025 on live broadcasting", f"legal_basis: {HOSTILE}")
    return serve_and_log(tmp_path_factory.mktemp("hostile"), snapshot)[0]


def span_log(served: tuple[Path, Path, Traffic], folder: Path, name: str) -> tuple[Path, dt.datetime, dt.datetime]:
    start, length, _, _ = SPANS[name]
    return spread(served[0], folder / f"{name}.jsonl", start, length, seed=len(name)), start, start + length


def num(when: dt.datetime) -> float:
    """Matplotlib's number for a moment (its axes limits are in these)."""
    return float(mdates.date2num(when))  # type: ignore[no-untyped-call]


def pdp(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The `pdp` command in a process of its own."""
    return subprocess.run([*PDP, *map(str, args)], capture_output=True, text=True, timeout=120, check=False)


def report_command(capsys: pytest.CaptureFixture[str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`pdp report` through the command's own entry point, in this process (matplotlib loads once)."""
    capsys.readouterr()
    code = main(["report", *map(str, args)])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["pdp", "report"], code, out, err)


def rewritten(source: Path, target: Path, index: int, **fields: Any) -> Path:
    """``source`` with the fields of its ``index``-th record replaced (the rest byte for byte)."""
    lines = source.read_text().splitlines()
    record = json.loads(lines[index])
    record.update(fields)
    lines[index] = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
    target.write_text("\n".join(lines) + "\n")
    return target


def first_index(log: Path, **wanted: Any) -> int:
    for index, line in enumerate(log.read_text().splitlines()):
        record = json.loads(line)
        if all(record.get(key) == value for key, value in wanted.items()):
            return index
    raise AssertionError(f"no record with {wanted} in {log}")


# --------------------------------------------------------------------------- counting


def test_counts_match_what_the_server_answered(served: tuple[Path, Path, Traffic]) -> None:
    log, snapshot, traffic = served
    report = build_report(load([log]), snapshots=Snapshots([snapshot]), files=1)
    denials = {rule.rule_id: rule.tally.count for rule in report.rules}
    assert denials == {
        "cn-broadcast-4": traffic.cn_broadcast,
        "cn-memorial-17": traffic.cn_memorial,
        "se-e-court": traffic.se_e,
        "us-wa-host": traffic.us_wa,
    }
    assert all(count > 0 for count in denials.values())
    assert [(rule.rule_id, rule.tally.count) for rule in report.shadow] == [("gb-eng-draft", traffic.gb_shadow)]
    assert report.default.count == traffic.unknown > 0
    assert report.boundary.holds
    assert report.boundary.denials == sum(denials.values())
    assert report.boundary.shadow == traffic.gb_shadow
    assert {rule.rule_id: sorted(rule.tally.located_in) for rule in report.rules} == {
        "cn-broadcast-4": ["CN", "CN-22"],
        "cn-memorial-17": ["CN", "CN-22"],
        "se-e-court": ["SE", "SE-E"],
        "us-wa-host": ["US", "US-WA"],
    }
    windows = {rule.rule_id: rule.window for rule in report.rules}
    assert windows["us-wa-host"] == "from 2026-01-01T00:00:00Z until 2036-01-01T00:00:00Z"
    assert windows["cn-memorial-17"] == "from 2026-01-01T00:00:00Z, no end"
    assert windows["se-e-court"] == "none: applies while published"
    assert report.versions() == [42]


def test_markdown_csv_and_json_keep_their_columns_to_the_second(served: tuple[Path, Path, Traffic]) -> None:
    report = build_report(load([served[0]]))
    rows = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    assert tuple(rows[0]) == COLUMNS == (
        "jurisdiction", "rule_id", "legal_basis", "denials", "distinct_meetings", "distinct_participants",
        "located_in", "first_seen", "last_seen", "shadow_matches",
    )  # fmt: skip
    by_rule = {row["rule_id"]: row for row in rows}
    assert by_rule["cn-memorial-17"]["jurisdiction"] == "CN"
    assert by_rule["cn-memorial-17"]["located_in"] == "CN CN-22"
    assert by_rule["gb-eng-draft"]["denials"] == "0"
    assert int(by_rule["gb-eng-draft"]["shadow_matches"]) == served[2].gb_shadow
    assert by_rule[""]["jurisdiction"] == "(default)"
    for row in rows:
        for column in ("first_seen", "last_seen"):
            assert row[column] == "" or STAMP.match(row[column]), row
    markdown = render(report, "md").splitlines()
    header = next(line for line in markdown if line.startswith("| jurisdiction"))
    assert header == "| " + " | ".join(COLUMNS) + " |"
    assert any(
        line.startswith("| CN | cn-memorial-17 | Order 17/2026 of the national network authority |")
        for line in markdown
    )
    assert all(not re.search(r"\d\d:\d\d:\d\d[.+]", line) for line in markdown)  # no microseconds, no +00:00
    assert markdown[-1].startswith("Boundary check: No participant located outside a rule's jurisdiction was denied")
    documents = json.loads(render(report, "json"))
    assert [tuple(document) for document in documents] == [COLUMNS] * len(documents)


def test_records_are_read_tolerantly_but_not_blindly(served: tuple[Path, Path, Traffic], tmp_path: Path) -> None:
    log = served[0]
    lines = log.read_text().splitlines()
    trimmed = []
    for line in lines:  # a later format: a field added; optional fields dropped
        record = json.loads(line)
        record["impact"] = {"replayed": True}
        for optional in ("mode", "user", "geoip_build", "decision_id", "policy_version"):
            record.pop(optional, None)
        trimmed.append(json.dumps(record))
    tolerant = tmp_path / "tolerant.jsonl"
    tolerant.write_text("\n\n".join(trimmed) + "\n")
    before, after = build_report(load([log])), build_report(load([tolerant]))
    assert [row.as_dict() for row in after.rows if row.rule_id != "gb-eng-draft"] == [
        row.as_dict() for row in before.rows if row.rule_id != "gb-eng-draft"
    ]  # without "mode", shadow records count as enforced: only that row may differ
    broken = {
        "time": ("not a time", "time: 'not a time' is not a time"),
        "verdict": ("MAYBE", "verdict 'MAYBE' is not ALLOW or DENY"),
        "jurisdiction": ("CN", "jurisdiction must be a list of codes"),
        "location": ([], "location must be an object"),
        "policy_version": ("42", "policy_version must be an integer"),
    }
    for field, (value, message) in broken.items():
        bad = rewritten(log, tmp_path / f"bad-{field}.jsonl", 3, **{field: value})
        with pytest.raises(ReportError, match=re.escape(f"bad-{field}.jsonl:4: {message}")):
            load([bad])
    (tmp_path / "half.jsonl").write_text(lines[0] + "\n" + '{"time": "2026-06-01T00:00:00Z"}\n')
    with pytest.raises(ReportError, match=r"half\.jsonl:2: not an audit record"):
        load([tmp_path / "half.jsonl"])


# --------------------------------------------------------------------------- charts


def panels(fig: Figure) -> dict[str, Any]:
    return {axes.get_title(loc="left").split(":")[0]: axes for axes in fig.axes}


@pytest.mark.parametrize("name", list(SPANS))
def test_chart_fits_the_span(served: tuple[Path, Path, Traffic], tmp_path: Path, name: str) -> None:
    log, start, end = span_log(served, tmp_path, name)
    _, _, locator, width = SPANS[name]
    report = build_report(load([log]), start, end)
    fig = figure(report)
    fig.draw_without_rendering()
    traffic = served[2]
    expected = {
        "CN": traffic.cn_memorial + traffic.cn_broadcast,
        "SE-E": traffic.se_e,
        "US-WA": traffic.us_wa,
        "Location unknown": traffic.unknown,
    }
    assert list(panels(fig)) == list(expected)  # one panel per jurisdiction, the policy default last
    for title, axes in panels(fig).items():
        assert axes.get_xlim() == pytest.approx((num(start), num(end)))
        assert type(axes.xaxis.get_major_locator()) is locator
        assert isinstance(axes.xaxis.get_major_formatter(), mdates.ConciseDateFormatter)
        ticks = [t for t in axes.get_xticks() if num(start) <= t <= num(end)]
        assert 4 <= len(ticks) <= 13, ticks
        bars = [bar for container in axes.containers for bar in container]
        assert {round(bar.get_width(), 9) for bar in bars} == {round(width / dt.timedelta(days=1), 9)}
        assert bars[0].get_x() <= num(start)
        assert bars[-1].get_x() + bars[-1].get_width() >= axes.get_xlim()[1]
        assert sum(bar.get_height() for bar in bars) == expected[title]  # every denial drawn once
        bottom, top = axes.get_ylim()
        assert bottom == 0
        assert float(top).is_integer()
        assert top >= max(sum(b.get_height() for b in bars if b.get_x() == x) for x in {b.get_x() for b in bars})
        assert all(float(tick).is_integer() for tick in axes.get_yticks()), axes.get_yticks()
        assert axes.get_ylabel() == f"denials per {PER[name]}"
    labels = [label.get_text() for label in fig.axes[-1].get_xticklabels()]  # panels share the bottom one's
    assert labels, labels
    assert all(re.fullmatch(LABELS[name], label) for label in labels), labels
    legend = "\n".join(t.get_text().replace("\n", " ") for t in panels(fig)["CN"].get_legend().get_texts())
    assert "cn-memorial-17 (Order 17/2026 of the national network authority)" in legend
    assert "cn-broadcast-4 (Notice 4/2025 on live broadcasting)" in legend


def test_chart_of_the_raw_log_spans_its_seconds(served: tuple[Path, Path, Traffic]) -> None:
    report = build_report(load([served[0]]))
    assert report.period is not None
    first, last = report.records[0].time, report.records[-1].time
    assert report.period.start == first.replace(microsecond=0)
    assert report.period.end == last.replace(microsecond=0) + dt.timedelta(seconds=1)
    axes = figure(report).axes[0]
    assert axes.get_xlim() == pytest.approx((num(report.period.start), num(report.period.end)))
    assert type(axes.xaxis.get_major_locator()) is mdates.SecondLocator  # a log of a few seconds
    assert axes.get_ylabel() == "denials per second"


def test_chart_of_an_empty_period_still_spans_it(served: tuple[Path, Path, Traffic]) -> None:
    start, end = dt.datetime(2020, 1, 1, tzinfo=UTC), dt.datetime(2020, 1, 2, tzinfo=UTC)
    report = build_report(load([served[0]]), start, end)
    assert report.records == []
    assert report.boundary.holds
    (axes,) = figure(report).axes
    assert axes.get_title(loc="left") == "No denials in this period"
    assert axes.get_xlim() == pytest.approx((num(start), num(end)))
    assert axes.get_ylim() == (0, 1)
    assert type(axes.xaxis.get_major_locator()) is mdates.HourLocator
    assert "no boundary to cross" in render_html(report)


# --------------------------------------------------------------------------- the command and the boundary


def test_command_writes_every_format_and_the_chart(
    served: tuple[Path, Path, Traffic], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log, snapshot, _ = served
    month, start, end = span_log(served, tmp_path, "month")
    since, until = start.isoformat(), end.isoformat()
    for fmt in ("md", "csv", "json", "html"):
        result = report_command(capsys, month, "--since", since, "--until", until, "--rules", snapshot, "--format", fmt)
        assert result.returncode == 0, result.stderr
        assert result.stdout
    written = report_command(
        capsys, month, "--format", "html", "-o", tmp_path / "r.html", "--chart", tmp_path / "c.svg"
    )
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")
    assert (tmp_path / "r.html").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")
    assert report_command(capsys, log, "--chart", tmp_path / "c.png").returncode == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    failures: list[tuple[list[str | Path], str]] = [
        (["--since", until, "--until", since], "is not before --until"),
        (["--since", "yesterday"], "--since: 'yesterday' is not a time"),
        (["--rules", tmp_path / "absent.yaml"], "absent.yaml"),
        (["--rules", month], "snapshot rejected"),
        (["--rules", snapshot, "--rules", snapshot], "a second snapshot of version 42"),
    ]
    for args, message in failures:
        failed = report_command(capsys, month, *args)
        assert failed.returncode == 2, (args, failed.stderr)
        assert message in failed.stderr, (args, failed.stderr)
    missing = pdp("report", tmp_path / "no-such.jsonl")
    assert missing.returncode == 2
    assert "no-such.jsonl: No such file" in missing.stderr


def html_report(report: Report) -> str:
    return render_html(report, generated=dt.datetime(2026, 7, 1, 8, 0, tzinfo=UTC))


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        # The participant's recorded location rewritten: a CN rule that denied someone in Hong Kong.
        ({"location": {"country": "HK", "subdivisions": []}}, "located in HK was denied by rule cn-memorial-17"),
        # The rule's jurisdiction rewritten away: the record can no longer be checked.
        ({"jurisdiction": []}, "names no jurisdiction in this record: the boundary cannot be checked"),
        # Location and jurisdiction both rewritten to agree: only the published snapshot shows the lie.
        (
            {"location": {"country": "HK", "subdivisions": []}, "jurisdiction": ["HK"]},
            "snapshot version 42 publishes it for CN",
        ),
    ],
)
def test_a_record_across_the_boundary_fails_the_report_loudly(
    served: tuple[Path, Path, Traffic],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fields: dict[str, Any],
    problem: str,
) -> None:
    log, snapshot, _ = served
    index = first_index(log, rule_id="cn-memorial-17", mode="enforce")
    decision = json.loads(log.read_text().splitlines()[index])["decision_id"]
    bad = rewritten(log, tmp_path / "tampered.jsonl", index, **fields)
    for fmt in ("html", "md", "csv", "json"):
        result = report_command(capsys, bad, "--rules", snapshot, "--format", fmt)
        assert result.returncode == 1, (fmt, result.stderr)
        assert "BOUNDARY VIOLATED: 1 record of the" in result.stderr
        assert f"tampered.jsonl:{index + 1}: " in result.stderr
        assert problem in result.stderr
    report = build_report(load([bad]), snapshots=Snapshots([snapshot]))
    page = html_report(report)
    alert = page[page.index('<section id="boundary"') : page.index('<section id="summary"')]
    assert 'role="alert"' in alert
    assert "Jurisdiction boundary: VIOLATED" in alert
    assert decision in alert
    assert problem in alert
    assert "No participant located outside" not in page
    assert "BOUNDARY VIOLATED" in render(report, "md")
    unchecked = build_report(load([bad]))  # without the snapshot, a self-consistent lie passes the log's own check
    assert unchecked.boundary.holds == ("jurisdiction" in fields and "location" in fields)


def test_legal_basis_markup_is_text_not_html(hostile_log: Path) -> None:
    page = html_report(build_report(load([hostile_log])))
    assert "<script>" not in page
    assert "<img" not in page
    escaped = (
        "&lt;/table&gt;&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=&quot;http://127.0.0.1:9/x.png&quot;&gt; &amp;"
    )
    assert escaped in page


def test_a_legal_basis_a_spreadsheet_would_run_is_text_in_the_csv(
    served: tuple[Path, Path, Traffic], tmp_path: Path
) -> None:
    log, _, _ = served
    formula = '=HYPERLINK("http://127.0.0.1:9/x","Order 17")'
    index = first_index(log, rule_id="cn-memorial-17", mode="enforce")
    report = build_report(load([rewritten(log, tmp_path / "formula.jsonl", index, legal_basis=formula)]))
    rows = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    bases = {row["legal_basis"] for row in rows}
    assert "'" + formula in bases
    assert not any(basis.startswith(("=", "+", "-", "@")) for basis in bases)
    assert formula in {row["legal_basis"] for row in json.loads(render(report, "json"))}  # JSON keeps the text


# --------------------------------------------------------------------------- in a real browser

PROBE = r"""
(() => {
  const all = (selector, root = document) => Array.from(root.querySelectorAll(selector));
  const text = (id) => {
    const element = document.getElementById(id);
    return element ? element.textContent.trim() : null;
  };
  const parse = (colour) => colour.match(/[\d.]+/g).map(Number);
  const luminance = ([r, g, b]) => {
    const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (element) => {
    for (let e = element; e; e = e.parentElement) {
      const c = parse(getComputedStyle(e).backgroundColor);
      if (c.length < 4 || c[3] > 0) return c;
    }
    return [255, 255, 255];
  };
  const contrast = [];
  for (const element of all("body *")) {
    if (element.closest("svg")) continue;
    const own = Array.from(element.childNodes).some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own) continue;
    const [a, b] = [luminance(parse(getComputedStyle(element).color)), luminance(background(element))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    contrast.push([ratio, element.tagName, element.textContent.slice(0, 40)]);
  }
  contrast.sort((x, y) => x[0] - y[0]);
  const svg = document.querySelector("#chart figure svg");
  return {
    title: document.title,
    lang: document.documentElement.lang,
    csp: document.querySelector('meta[http-equiv="Content-Security-Policy"]').content,
    sections: all("main > section").map((s) => [s.id, text(s.getAttribute("aria-labelledby"))]),
    tables: all("table").map((t) => ({
      caption: t.caption ? t.caption.textContent : null,
      columns: all("thead th", t).map((th) => th.getAttribute("scope")),
      rows: all("tbody th", t).map((th) => th.getAttribute("scope")),
      cells: all("tbody tr", t).map((tr) => Array.from(tr.cells).map((c) => c.textContent.trim())),
    })),
    chart: svg && {
      role: svg.getAttribute("role"),
      labels: svg.getAttribute("aria-labelledby").split(" ")
        .map((id) => [document.getElementById(id).tagName, text(id)]),
      width: svg.getBoundingClientRect().width,
      height: svg.getBoundingClientRect().height,
      texts: all("text", svg).map((t) => t.textContent),
      caption: document.querySelector("#chart figcaption").textContent,
    },
    references: all("*").flatMap((e) => Array.from(e.attributes))
      .filter((a) => ["src", "href", "srcset", "poster", "action", "data", "xlink:href"].includes(a.name))
      .map((a) => a.value),
    styles: all('link, script, iframe, object, embed, img').length,
    times: all("time").map((t) => [t.getAttribute("datetime"), t.textContent]),
    verdict: document.querySelector("#boundary .verdict").className,
    contrast: contrast.slice(0, 3),
    overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
  };
})()
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    chromium = Chromium(tmp_path_factory.mktemp("chromium"))
    yield chromium
    chromium.close()


def assert_self_contained(visit: Visit) -> None:
    assert visit.requests == [visit.url], visit.requests  # the page itself, and nothing else
    assert not [entry for entry in visit.console if "Content Security Policy" in entry], visit.console
    assert visit.probe["csp"] == CSP
    assert visit.probe["styles"] == 0
    assert all(reference.startswith("#") for reference in visit.probe["references"]), visit.probe["references"]


def test_html_report_in_headless_chromium(
    served: tuple[Path, Path, Traffic], tmp_path: Path, browser: Chromium
) -> None:
    """The screenshot is written next to the report (report.png); PDP_REPORT_SCREENSHOT=PATH copies it there too."""
    month, start, end = span_log(served, tmp_path, "month")
    page = tmp_path / "report.html"
    result = pdp(
        "report", month, "--since", start.isoformat(), "--until", end.isoformat(),
        "--rules", served[1], "--format", "html", "-o", page,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    visit = browser.visit(page, PROBE)
    screenshot = tmp_path / "report.png"
    screenshot.write_bytes(visit.screenshot)
    print(f"screenshot: {screenshot}")  # shown with -s, for people to look at
    if os.environ.get("PDP_REPORT_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["PDP_REPORT_SCREENSHOT"])
    assert visit.screenshot[:8] == b"\x89PNG\r\n\x1a\n"
    assert_self_contained(visit)
    probe = visit.probe
    assert probe["lang"] == "en"
    assert probe["title"] == "Transparency report: geo-admission denials, 2026-06-01T00:00:00Z to 2026-07-01T00:00:00Z"
    assert [section for section, _ in probe["sections"]] == list(SECTIONS)
    assert all(heading for _, heading in probe["sections"]), probe["sections"]
    assert probe["verdict"] == "verdict holds"
    assert len(probe["tables"]) == 3  # summary, orders, shadow rules
    for table in probe["tables"]:
        assert table["caption"]
        assert set(table["columns"]) == {"col"}
        assert set(table["rows"]) == {"row"}
    summary, orders, shadow = probe["tables"]
    traffic = served[2]
    assert [row[0] for row in summary["cells"]] == ["CN", "GB-ENG", "SE-E", "US-WA"]
    assert summary["cells"][0][2] == str(traffic.cn_memorial + traffic.cn_broadcast)
    assert [row[0] for row in orders["cells"]] == ["cn-broadcast-4", "cn-memorial-17", "se-e-court", "us-wa-host"]
    assert orders["cells"][3][2:4] == [
        "Wash. Rev. Code 19.999 (injunction, case 26-2-0001)",
        "from 2026-01-01T00:00:00Z until 2036-01-01T00:00:00Z",
    ]
    assert shadow["cells"][0][:2] == ["gb-eng-draft", "GB-ENG"]
    assert shadow["cells"][0][4] == str(traffic.gb_shadow)
    chart = probe["chart"]
    assert chart["role"] == "img"
    assert [tag for tag, _ in chart["labels"]] == ["title", "desc"]
    assert all(label for _, label in chart["labels"])
    assert chart["width"] > 1000
    assert chart["height"] > 600
    for title in ("CN: ", "SE-E: ", "US-WA: ", "Location unknown: "):
        assert any(text.startswith(title) for text in chart["texts"]), title
    assert probe["times"]
    assert all(STAMP.match(when) and when == shown for when, shown in probe["times"])
    assert probe["contrast"][0][0] >= 4.5, probe["contrast"]  # WCAG AA for body text
    assert probe["overflow"] == 0  # nothing wider than a 1280-pixel window


def test_browser_watch_sees_a_request_when_there_is_one(
    served: tuple[Path, Path, Traffic], tmp_path: Path, browser: Chromium
) -> None:
    """The no-request check can fail: an image planted in a copy of a report is seen, though the CSP blocks it."""
    page = tmp_path / "planted.html"
    report = html_report(build_report(load([served[0]])))
    page.write_text(report.replace("</main>", '<img src="http://127.0.0.1:9/pixel.png" alt=""></main>'))
    visit = browser.visit(page, PROBE)
    assert "http://127.0.0.1:9/pixel.png" in visit.requests
    assert any("Content Security Policy" in entry for entry in visit.console)


def test_violation_and_hostile_pages_in_headless_chromium(
    served: tuple[Path, Path, Traffic], hostile_log: Path, tmp_path: Path, browser: Chromium
) -> None:
    log, snapshot, _ = served
    index = first_index(log, rule_id="cn-memorial-17", mode="enforce")
    bad = rewritten(log, tmp_path / "tampered.jsonl", index, location={"country": "HK", "subdivisions": []})
    page = tmp_path / "violated.html"
    page.write_text(html_report(build_report(load([bad]), snapshots=Snapshots([snapshot]))))
    visit = browser.visit(page, PROBE)
    (tmp_path / "violated.png").write_bytes(visit.screenshot)
    assert_self_contained(visit)
    assert visit.probe["verdict"] == "verdict broken"
    assert visit.probe["tables"][0]["caption"] == "Records that break the boundary"
    assert visit.probe["contrast"][0][0] >= 4.5, visit.probe["contrast"]
    page = tmp_path / "hostile.html"
    page.write_text(html_report(build_report(load([hostile_log]))))
    visit = browser.visit(page, PROBE)
    assert_self_contained(visit)
    legal_bases = [row[2] for row in visit.probe["tables"][1]["cells"]]
    assert '</table><script>alert(1)</script><img src="http://127.0.0.1:9/x.png"> & Notice' in legal_bases
