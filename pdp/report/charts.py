"""Denials over time, drawn to fit the data: whole counts, the report's period on the time axis.

One panel per jurisdiction (as the rules name it), bars stacked per rule and
labelled with the rule and its legal basis. The bin and the ticks follow the
period's length (:data:`SCALES`): seconds for a minute, minutes for an hour, hours for a day, days for
a month, weeks beyond. Needs matplotlib (the ``report`` extra); the figure is
built without pyplot, so nothing global is touched.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

from pdp.report.aggregate import Period, Report, RuleStats
from pdp.report.records import Record, ReportError, rfc3339

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["SCALES", "Scale", "figure", "save", "scale_for", "svg"]

# From Okabe and Ito's palette, told apart with the common colour-vision deficiencies, the
# colours at least 3:1 against white (WCAG's bar for graphics); its orange, sky blue and
# yellow are not, so a dark gold stands in. Grey is kept for the policy default: no rule.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#8C6D00", "#000000")
NO_RULE = "#5A5A5A"
_ANCHOR = dt.datetime(1970, 1, 5, tzinfo=dt.UTC)  # a Monday at midnight: bins of any size line up on it


@dataclass(frozen=True, slots=True)
class Scale:
    """How to draw a period up to ``longest``: bars of ``width``, ticks every ``step`` units."""

    longest: dt.timedelta
    width: dt.timedelta
    unit: str  # second | minute | hour | day | week
    steps: tuple[int, ...]  # tick intervals to choose from, in units
    per: str  # what one bar counts, for titles

    def step(self, span: dt.timedelta) -> int:
        """The smallest tick interval that leaves at most 13 ticks over ``span``."""
        unit = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800}[self.unit]
        return next((s for s in self.steps if span.total_seconds() / (s * unit) <= 13), self.steps[-1])


SCALES = (
    Scale(dt.timedelta(minutes=2), dt.timedelta(seconds=1), "second", (1, 2, 5, 10, 15, 30), "second"),
    Scale(dt.timedelta(minutes=20), dt.timedelta(minutes=1), "minute", (1, 2, 5, 10), "minute"),
    Scale(dt.timedelta(hours=3), dt.timedelta(minutes=5), "minute", (5, 10, 15, 20, 30, 60), "5 minutes"),
    Scale(dt.timedelta(days=3), dt.timedelta(hours=1), "hour", (1, 2, 3, 4, 6, 12, 24), "hour"),
    Scale(dt.timedelta(days=92), dt.timedelta(days=1), "day", (1, 2, 3, 4, 7, 14), "day"),
    Scale(dt.timedelta.max, dt.timedelta(weeks=1), "week", (1, 2, 4, 8, 13, 26, 52), "week"),
)


def scale_for(period: Period) -> Scale:
    return next(scale for scale in SCALES if period.span <= scale.longest)


def _matplotlib() -> Any:
    try:
        import matplotlib
        import matplotlib.dates
        import matplotlib.figure
        import matplotlib.ticker
    except ImportError:
        raise ReportError("charts need matplotlib: pip install 'pdp[report]'") from None
    return matplotlib


def _bins(records: list[Record], width: dt.timedelta) -> dict[int, int]:
    counts: dict[int, int] = {}
    for record in records:
        index = (record.time - _ANCHOR) // width
        counts[index] = counts.get(index, 0) + 1
    return counts


def _panels(report: Report) -> Iterator[tuple[str, list[tuple[RuleStats | None, list[Record]]]]]:
    """(title, [(rule, its denials)]) per jurisdiction; the policy default's denials last."""
    by_rule: dict[str, list[Record]] = {}
    defaulted: list[Record] = []
    for record in report.records:
        if record.verdict == "DENY" and record.mode == "enforce":
            (by_rule.setdefault(record.rule_id, []) if record.rule_id else defaulted).append(record)
    for jurisdiction in sorted({rule.jurisdiction_text for rule in report.rules}):
        rules = [rule for rule in report.rules if rule.jurisdiction_text == jurisdiction]
        denials = sum(rule.tally.count for rule in rules)
        orders = f"{len(rules)} order{'s' * (len(rules) != 1)}"
        yield (
            f"{jurisdiction}: {denials:,} denial{'s' * (denials != 1)} by {orders}",
            [(rule, by_rule.get(rule.rule_id, [])) for rule in rules],
        )
    if defaulted:
        yield f"Location unknown: {len(defaulted):,} denied by the policy default", [(None, defaulted)]


def _label(rule: RuleStats | None) -> str:
    if rule is None:
        return "policy default for unknown locations"
    return textwrap.fill(f"{rule.rule_id} ({rule.legal_basis or 'no legal basis recorded'})", 38)


def _draw_panel(mpl: Any, axes: Axes, period: Period, scale: Scale, stacks: list[Any], colours: Iterator[str]) -> int:
    """Stacked bars of each rule's denials per bin; returns the tallest stack."""
    dates = mpl.dates
    first = (period.start - _ANCHOR) // scale.width
    last = (period.end - dt.timedelta(microseconds=1) - _ANCHOR) // scale.width
    indexes = range(first, last + 1)
    lefts = [dates.date2num(_ANCHOR + i * scale.width) for i in indexes]
    width = scale.width / dt.timedelta(days=1)
    bottoms = [0] * len(indexes)
    for rule, records in stacks:
        counts = _bins(records, scale.width)
        heights = [counts.get(i, 0) for i in indexes]
        colour = next(colours) if rule is not None else NO_RULE
        # A hairline of the background around each bar keeps adjacent bins apart.
        axes.bar(
            lefts, heights, width, bottoms, align="edge", color=colour, edgecolor="white", lw=0.6, label=_label(rule)
        )
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    return max(bottoms, default=0)


def _axes_style(mpl: Any, axes: Axes, period: Period, scale: Scale, peak: int) -> None:
    dates, ticker = mpl.dates, mpl.ticker
    axes.set_xlim(dates.date2num(period.start), dates.date2num(period.end))
    integers = ticker.MaxNLocator(nbins=5, integer=True, min_n_ticks=2)
    axes.set_ylim(0, int(integers.tick_values(0, max(1, peak))[-1]))  # the first whole tick at or above the peak
    axes.yaxis.set_major_locator(integers)
    axes.yaxis.set_major_formatter(ticker.StrMethodFormatter("{x:,.0f}"))
    step = scale.step(period.span)
    locator = {
        "second": lambda: dates.SecondLocator(bysecond=range(0, 60, step), tz=dt.UTC),
        "minute": lambda: dates.MinuteLocator(byminute=range(0, 60, step) if step < 60 else [0], tz=dt.UTC),
        "hour": lambda: dates.HourLocator(byhour=range(0, 24, step), tz=dt.UTC),
        "day": lambda: dates.DayLocator(interval=step, tz=dt.UTC),
        "week": lambda: dates.WeekdayLocator(byweekday=dates.MO, interval=step, tz=dt.UTC),
    }[scale.unit]()
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(
        dates.ConciseDateFormatter(
            locator,
            tz=dt.UTC,
            formats=["%Y", "%b", "%d %b", "%H:%M", "%H:%M", "%H:%M:%S"],
            zero_formats=["", "%Y", "%d %b", "%d %b", "%H:%M", "%H:%M:%S"],
            offset_formats=["", "%Y", "%b %Y", "%d %b %Y", "%d %b %Y", "%d %b %Y %H:%M"],
        )
    )
    axes.set_ylabel(f"denials per {scale.per}")
    axes.grid(axis="y", color="#d0d0d0", linewidth=0.8)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)


def figure(report: Report) -> Figure:
    """The chart of ``report``'s enforced denials.

    :raises ReportError: matplotlib is missing, or the report has no period (no records, no --since/--until).
    """
    mpl = _matplotlib()
    if report.period is None:
        raise ReportError("no records and no --since/--until: there is no period to chart")
    period, scale = report.period, scale_for(report.period)
    panels = list(_panels(report)) or [("No denials in this period", [])]
    fig: Figure = mpl.figure.Figure(figsize=(11, 1.0 + 2.1 * len(panels)), dpi=100, layout="constrained")
    grid = fig.subplots(len(panels), 1, sharex=True, squeeze=False)
    colours = iter(PALETTE * (1 + len(report.rules) // len(PALETTE)))
    for axes, (title, stacks) in zip(grid[:, 0], panels, strict=True):
        peak = _draw_panel(mpl, axes, period, scale, stacks, colours)
        _axes_style(mpl, axes, period, scale, peak)
        axes.set_title(title, loc="left", fontsize=12, fontweight="bold")
        if stacks:
            axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=10)
    grid[-1, 0].set_xlabel(f"time (UTC), {rfc3339(period.start)} to {rfc3339(period.end)}")
    fig.suptitle(f"Enforced denials per {scale.per}", x=0.01, ha="left", fontsize=14)
    return fig


def _rendered(fig: Figure, fmt: str) -> bytes:
    mpl = _matplotlib()
    out = io.BytesIO()
    with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": "pdp-report"}):
        fig.savefig(out, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    return out.getvalue()


def save(report: Report, path: str | Path) -> None:
    """The chart as a PNG, or an SVG when ``path`` ends in .svg.

    :raises ReportError: as :func:`figure`, or the file cannot be written.
    """
    path = Path(path)
    data = _rendered(figure(report), "svg" if path.suffix.lower() == ".svg" else "png")
    try:
        path.write_bytes(data)
    except OSError as error:
        raise ReportError(f"--chart {path}: {error.strerror or error}") from None


def svg(report: Report, title: str, description: str, ident: str = "chart") -> str:
    """The chart as an inline ``<svg>`` element titled and described for screen readers.

    :raises ReportError: as :func:`figure`.
    """
    text = _rendered(figure(report), "svg").decode()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL)
    head_end = text.index(">") + 1
    labelled = f' role="img" aria-labelledby="{ident}-title {ident}-desc"'
    head = text[: head_end - 1] + labelled + ">"
    return (
        f'{head}\n<title id="{ident}-title">{escape(title)}</title>\n'
        f'<desc id="{ident}-desc">{escape(description)}</desc>{text[head_end:]}'
    )
