"""The commands that need no server: `pdp explain`, `pdp geo lookup` and `pdp report`."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from pdp.commands.common import (
    EXIT_INVALID,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    _build_fields,
    _decision_json,
    _decision_lines,
    _location_text,
    _open_geo_for,
    _verdict_exit,
)
from pdp.geo import (
    InvalidAddressError,
    Located,
    format_build,
)
from pdp.iso3166 import jurisdiction_problem
from pdp.model import UNKNOWN_LOCATION, Action, Location, Meeting
from pdp.rules import load_policy


def cmd_explain(options: argparse.Namespace) -> int:
    policy = load_policy(options.rules)
    location, build, located = _explain_location(options)
    now = options.at.timestamp() if options.at else time.time()
    meeting = Meeting(options.meeting, options.host_account, frozenset(options.tag))
    action = Action[options.action.upper()]
    decision = policy.decide(location, action, meeting, now)
    traces = policy.explain(location, action, meeting, now)
    if options.json:
        payload = _decision_json(decision, location, policy.version, build)
        if located is not None:
            payload["located"] = {"ip": options.ip, "address": located.address, "via": located.via}
        payload["rules"] = [{"id": t.rule.id, "outcome": t.outcome} for t in traces]
        print(json.dumps(payload, indent=2))
    else:
        print("\n".join(_decision_lines(decision, location, policy.version, build)))
        if located is not None and located.via:
            print(f"  located as   {located.address} (inside {options.ip}: {located.via})")
        if traces:
            print(f"\nrules whose jurisdiction covers {', '.join(location.codes)}:")
            for trace in traces:
                rule = trace.rule
                kind = f"{'shadow ' if rule.shadow else ''}{rule.effect.name.lower()}, priority {rule.priority}"
                print(f"  {trace.outcome:<40} {rule.id} ({kind})")
        elif location.found:
            print(f"\nno rule's jurisdiction covers {', '.join(location.codes)}")
    return _verdict_exit(decision.verdict)


def _explain_location(options: argparse.Namespace) -> tuple[Location, int, Located | None]:
    """The participant's location from --ip (with its database build and which address was
    located) or from --country/--subdivision.

    :raises UsageError: an option names a place GeoIP data could never return.
    """
    if options.ip:
        if options.subdivision:
            raise UsageError("--subdivision goes with --country, not --ip (the database locates the address)")
        geo = _open_geo_for(options)
        try:
            located = geo.trace(options.ip)
        except InvalidAddressError as error:
            raise UsageError(f"--ip: {error}") from None
        return located.location, geo.build_epoch, located
    country = _country_option(options.country) if options.country else ""
    subdivisions = tuple(dict.fromkeys(_subdivision_option(code, country) for code in options.subdivision))
    if not country and subdivisions:
        country = subdivisions[0][:2]  # US-WA alone says the country
    for code in subdivisions:
        if code[:2] != country:
            given = "--country" if options.country else f"--subdivision {subdivisions[0]}"
            raise UsageError(f"--subdivision: {code!r} is in {code[:2]}, not in {country} (from {given})")
    return (Location(country, subdivisions) if country else UNKNOWN_LOCATION), 0, None


def _country_option(text: str) -> str:
    code = text.upper() if len(text) == 2 else text
    if "-" in code:
        raise UsageError(f"--country: {code!r} is a subdivision: pass --subdivision {code} (it implies its country)")
    problem = jurisdiction_problem(code)
    if problem:
        raise UsageError(f"--country: {problem}")
    return code


def _subdivision_option(text: str, country: str) -> str:
    code = text.upper()
    if "-" not in code:
        example = f"{country or 'US'}-{code}" if re.fullmatch(r"[A-Z0-9]{1,3}", code) else "US-WA"
        raise UsageError(f"--subdivision: {text!r} needs its country, as in ISO 3166-2: like {example!r}")
    problem = jurisdiction_problem(code)
    if problem:
        raise UsageError(f"--subdivision: {problem}")
    return code


def cmd_geo_lookup(options: argparse.Namespace) -> int:
    geo = _open_geo_for(options)
    rows = []
    failed = False
    for address in options.ip:
        try:
            located = geo.trace(address)
        except InvalidAddressError as error:
            print(f"pdp: {address}: {error}", file=sys.stderr)
            failed = True
            continue
        rows.append((address, located))
    if options.json:
        print(json.dumps([_lookup_json(address, located, geo.build_epoch) for address, located in rows], indent=2))
    else:
        print(f"# {geo.database_type} built {format_build(geo.build_epoch)} ({geo.path})")
        for address, located in rows:
            via = f"  located as {located.address}: {located.via}" if located.via else ""
            print(f"{address:<40} {_location_text(located.location)}{via}")
    return EXIT_USAGE if failed else EXIT_OK


def _lookup_json(address: str, located: Located, build: int) -> dict[str, Any]:
    location = located.location
    return {
        "ip": address,
        "found": location.found,
        "country": location.country,
        "subdivisions": list(location.subdivisions),
        "located": located.address,
        "via": located.via,
        **_build_fields(build),
    }


def cmd_report(options: argparse.Namespace) -> int:
    """Exit 0; 1 when a record breaks the jurisdiction boundary (the report, written anyway, says so)."""
    from pdp.files import atomic_write
    from pdp.report import ReportError, Snapshots, build_report, load, moment, render
    from pdp.report.charts import save
    from pdp.report.html import render_html
    from pdp.report.text import boundary_statement

    try:
        since = moment(options.since, "--since") if options.since else None
        until = moment(options.until, "--until") if options.until else None
        if since and until and since >= until:
            raise ReportError(f"--since {options.since} is not before --until {options.until}")
        snapshots = Snapshots(options.rules)
        report = build_report(load(options.log), since, until, snapshots, files=len(options.log))
        text = render_html(report) if options.format == "html" else render(report, options.format)
        if options.chart:
            save(report, options.chart)
            print(f"chart written to {options.chart}", file=sys.stderr)
    except ReportError as error:
        raise UsageError(str(error)) from None
    if options.output:
        atomic_write(Path(options.output), text.encode())
        Path(options.output).chmod(0o644)  # a report is for publishing; the temporary file was private
        print(f"report written to {options.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if not report.boundary.holds:
        print(f"pdp: {boundary_statement(report.boundary)}", file=sys.stderr)
        for violation in report.boundary.violations[:20]:
            print(f"  {violation.record.where}: {violation.problem}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK
