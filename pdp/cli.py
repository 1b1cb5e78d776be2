"""The `pdp` command: serve, check, explain, geo lookup, snapshot validate.

Exit codes: 0 success (ALLOW for check/explain), 3 DENY, 1 invalid snapshot
(validate), 2 usage, configuration, input or transport error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import grpc

from pdp import __version__
from pdp.config import ConfigError, ServeConfig, add_serve_arguments, describe, resolve
from pdp.geo import DEMO, DEMO_NOTICE, GeoDatabase, GeoIPError, InvalidAddressError, demo_database_path
from pdp.model import UNKNOWN_LOCATION, Action, Decision, Location, Meeting, Verdict
from pdp.rules import Policy, SnapshotError, load_policy, policy_summary

log = logging.getLogger("pdp")

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_DENY = 0, 1, 2, 3


class UsageError(Exception):
    """A problem the user can fix; printed without a traceback, exit code 2."""


# --------------------------------------------------------------------------- shared helpers


def open_geo(name: str, cache_size: int = 100_000) -> GeoDatabase:
    """Open a database by path, or the demo one for ``demo`` (with its notice)."""
    if not name:
        raise UsageError("no GeoIP database: pass --geoip-db PATH or set PDP_GEOIP_DB (or use --geoip-db demo)")
    if name == DEMO:
        log.warning(DEMO_NOTICE)
        return GeoDatabase(demo_database_path(), cache_size)
    return GeoDatabase(name, cache_size)


def snapshot_path(url: str) -> Path:
    """The file behind a ``file://`` URL (or a plain path)."""
    if not url:
        raise UsageError("no snapshot: pass --snapshot file:///path/rules.yaml or set PDP_SNAPSHOT_URL")
    if "://" not in url:
        return Path(url)
    parsed = urlparse(url)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        raise UsageError(f"{url}: only file:// snapshot URLs are supported so far")
    return Path(unquote(parsed.path))


def _format_build(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d")


def _location_text(location: Location) -> str:
    if not location.found:
        return "unknown (no country for this address)"
    return location.country + (f" ({', '.join(location.subdivisions)})" if location.subdivisions else "")


def _decision_lines(decision: Decision, location: Location, version: int, build: int) -> list[str]:
    head = f"{decision.verdict.name}  {decision.rule_id or '(no rule)'}"
    lines = [head, f"  reason       {decision.reason}"]
    if decision.legal_basis:
        lines.append(f"  legal basis  {decision.legal_basis}")
    lines.append(f"  location     {_location_text(location)}")
    lines.append(f"  policy       version {version}, GeoIP build {_format_build(build)}")
    if decision.shadow_rule_ids:
        lines.append(f"  shadow       {', '.join(decision.shadow_rule_ids)} (matched, not enforced)")
    return lines


def _decision_json(decision: Decision, location: Location, version: int, build: int) -> dict[str, Any]:
    return {
        "verdict": decision.verdict.name,
        "rule_id": decision.rule_id,
        "reason": decision.reason,
        "legal_basis": decision.legal_basis,
        "location": {"found": location.found, "country": location.country, "subdivisions": list(location.subdivisions)},
        "policy_version": version,
        "geoip_build": build,
        "shadow_rule_ids": list(decision.shadow_rule_ids),
    }


def _verdict_exit(verdict: Verdict) -> int:
    return EXIT_DENY if verdict == Verdict.DENY else EXIT_OK


def _add_meeting_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meeting", required=True, metavar="ID", help="meeting id")
    parser.add_argument("--tag", action="append", default=[], metavar="TAG", help="meeting tag (repeatable)")
    parser.add_argument("--host-account", default="", metavar="ACCOUNT", help="account hosting the meeting")
    parser.add_argument("--action", choices=("join", "host"), default="join", help="what is asked (default join)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


# --------------------------------------------------------------------------- commands


def cmd_serve(options: argparse.Namespace) -> int:
    from pdp.policy import PolicyHolder
    from pdp.server import start_server, wait_for_signal

    config = resolve(vars(options))
    logging.getLogger().setLevel(config.log_level.upper())
    log.info("starting pdp %s with %s", __version__, json.dumps(describe(config)))
    geo, policy = _load_inputs(config)
    holder = PolicyHolder()
    try:
        running = start_server(config, holder)
    except OSError as error:
        raise UsageError(str(error)) from None
    holder.activate(policy, geo, config.snapshot)
    # Everything loaded so far lives as long as the process: keep the collector off it.
    gc.collect()
    gc.freeze()
    counts = policy_summary(policy)
    print(
        f"pdp {__version__} listening on {running.address}: policy version {policy.version} "
        f"({counts['rules']} rules), {geo.database_type} built {_format_build(geo.build_epoch)}",
        flush=True,
    )
    print(f"try: pdp check --target {running.address} --ip 175.16.199.1 --meeting m-1 --tag memorial", flush=True)
    wait_for_signal(running)
    return EXIT_OK


def _load_inputs(config: ServeConfig) -> tuple[GeoDatabase, Policy]:
    path = snapshot_path(config.snapshot)
    geo = open_geo(config.geoip_db, config.cache_size)
    policy = load_policy(path)
    return geo, policy


def cmd_check(options: argparse.Namespace) -> int:
    from pdp.client import Client

    with Client(options.target, timeout=options.timeout) as client:
        try:
            result = client.check(
                options.ip,
                options.meeting,
                tags=options.tag,
                host_account_id=options.host_account,
                action=Action[options.action.upper()],
            )
        except grpc.RpcError as error:
            code = error.code().name if hasattr(error, "code") else "UNKNOWN"
            details = error.details() if hasattr(error, "details") else str(error)
            raise UsageError(f"{options.target}: {code}: {details}") from None
    decision = Decision(result.verdict, result.rule_id, result.reason, result.legal_basis, result.shadow_rule_ids)
    _print_decision(decision, result.location, result.policy_version, result.geoip_build, options.json)
    return _verdict_exit(result.verdict)


def cmd_explain(options: argparse.Namespace) -> int:
    policy = load_policy(options.rules)
    build = 0
    if options.ip:
        geo = open_geo(options.geoip_db or os.environ.get("PDP_GEOIP_DB", ""))
        try:
            location = geo.locate(options.ip)
        except InvalidAddressError as error:
            raise UsageError(f"--ip: {error}") from None
        build = geo.build_epoch
    elif options.country:
        location = Location(options.country.upper(), tuple(options.subdivision))
    else:
        location = UNKNOWN_LOCATION
    now = options.at.timestamp() if options.at else time.time()
    meeting = Meeting(options.meeting, options.host_account, frozenset(options.tag))
    action = Action[options.action.upper()]
    decision = policy.decide(location, action, meeting, now)
    traces = policy.explain(location, action, meeting, now)
    if options.json:
        payload = _decision_json(decision, location, policy.version, build)
        payload["rules"] = [{"id": t.rule.id, "outcome": t.outcome} for t in traces]
        print(json.dumps(payload, indent=2))
    else:
        print("\n".join(_decision_lines(decision, location, policy.version, build)))
        if traces:
            print(f"\nrules whose jurisdiction covers {', '.join(location.codes)}:")
            for trace in traces:
                rule = trace.rule
                kind = f"{'shadow ' if rule.shadow else ''}{rule.effect.name.lower()}, priority {rule.priority}"
                print(f"  {trace.outcome:<40} {rule.id} ({kind})")
        elif location.found:
            print(f"\nno rule's jurisdiction covers {', '.join(location.codes)}")
    return _verdict_exit(decision.verdict)


def cmd_geo_lookup(options: argparse.Namespace) -> int:
    geo = open_geo(options.geoip_db or os.environ.get("PDP_GEOIP_DB", ""))
    rows = []
    failed = False
    for address in options.ip:
        try:
            location = geo.lookup_uncached(address)
        except InvalidAddressError as error:
            print(f"pdp: {address}: {error}", file=sys.stderr)
            failed = True
            continue
        rows.append((address, location))
    if options.json:
        print(
            json.dumps(
                [
                    {"ip": address, "found": loc.found, "country": loc.country, "subdivisions": list(loc.subdivisions)}
                    for address, loc in rows
                ],
                indent=2,
            )
        )
    else:
        print(f"# {geo.database_type} built {_format_build(geo.build_epoch)} ({geo.path})")
        for address, location in rows:
            print(f"{address:<40} {_location_text(location)}")
    return EXIT_USAGE if failed else EXIT_OK


def cmd_snapshot_validate(options: argparse.Namespace) -> int:
    status = EXIT_OK
    for name in options.file:
        try:
            policy = load_policy(name)
        except SnapshotError as error:
            print(str(error), file=sys.stderr)
            status = max(status, EXIT_INVALID)
            continue
        except OSError as error:
            print(f"pdp: {name}: cannot read: {error.strerror or error}", file=sys.stderr)
            status = EXIT_USAGE
            continue
        counts = policy_summary(policy)
        print(
            f"{name}: valid, version {policy.version}: {counts['rules']} rules ({counts['deny']} deny, "
            f"{counts['allow']} allow, {counts['shadow']} shadow) over {counts['jurisdictions']} jurisdictions; "
            f"unknown locations {policy.unknown_location.name.lower()}; sha256 {policy.sha256}"
        )
    return status


def _print_decision(decision: Decision, location: Location, version: int, build: int, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_decision_json(decision, location, version, build), indent=2))
    else:
        print("\n".join(_decision_lines(decision, location, version, build)))


# --------------------------------------------------------------------------- parser


def _timestamp(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time like 2020-06-02T12:00:00Z") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a UTC offset, like 2020-06-02T12:00:00Z")
    return moment


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdp",
        description="Geo-admission policy decision point for meeting platforms.",
        epilog="Exit codes: 0 ok/ALLOW, 3 DENY, 1 invalid snapshot, 2 usage, configuration or transport error.",
    )
    parser.add_argument("--version", action="version", version=f"pdp {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the gRPC sidecar",
        description="Serve AdmissionService, grpc.health.v1.Health and reflection. Settings come from flags, "
        "then PDP_* variables, then the --config file. SIGTERM drains in-flight calls and stops.",
    )
    add_serve_arguments(serve)
    serve.set_defaults(handler=cmd_serve)

    check = commands.add_parser(
        "check",
        help="ask a running sidecar about one participant",
        description="Ask a running sidecar. Exit 0 on ALLOW, 3 on DENY, 2 on usage or transport errors.",
    )
    check.add_argument(
        "--target",
        default=os.environ.get("PDP_LISTEN", "127.0.0.1:50051"),
        help="sidecar address, HOST:PORT or unix:/path (default $PDP_LISTEN or 127.0.0.1:50051)",
    )
    check.add_argument("--ip", required=True, help="participant's IP address")
    check.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS", help="deadline (default 2)")
    _add_meeting_arguments(check)
    check.set_defaults(handler=cmd_check)

    explain = commands.add_parser(
        "explain",
        help="evaluate a rules file locally, showing every rule that covers the location",
        description="Evaluate a rules file for a hypothetical participant without a server. Give --ip (with a "
        "GeoIP database) or --country/--subdivision. Exit 0 on ALLOW, 3 on DENY.",
    )
    explain.add_argument("--rules", required=True, metavar="FILE", help="rules snapshot (YAML or JSON)")
    where = explain.add_mutually_exclusive_group()
    where.add_argument("--ip", help="participant's IP address (needs --geoip-db or PDP_GEOIP_DB)")
    where.add_argument("--country", help="participant's ISO 3166-1 country, instead of --ip")
    explain.add_argument(
        "--subdivision",
        action="append",
        default=[],
        metavar="CODE",
        help="with --country: ISO 3166-2 subdivision like US-WA (repeatable)",
    )
    explain.add_argument("--geoip-db", metavar="PATH", help="MaxMind database, or 'demo' [env PDP_GEOIP_DB]")
    explain.add_argument("--at", type=_timestamp, metavar="TIME", help="evaluate at this time (default now)")
    _add_meeting_arguments(explain)
    explain.set_defaults(handler=cmd_explain)

    geo = commands.add_parser("geo", help="GeoIP database tools").add_subparsers(
        dest="geo_command", metavar="COMMAND", required=True
    )
    lookup = geo.add_parser(
        "lookup",
        help="show where addresses are located",
        description="Locate addresses exactly as the server does (country, not registered "
        "country; ISO 3166-2 subdivisions).",
    )
    lookup.add_argument("ip", nargs="+", help="IPv4 or IPv6 addresses")
    lookup.add_argument("--geoip-db", metavar="PATH", help="MaxMind database, or 'demo' [env PDP_GEOIP_DB]")
    lookup.add_argument("--json", action="store_true", help="print JSON instead of text")
    lookup.set_defaults(handler=cmd_geo_lookup)

    snapshot = commands.add_parser("snapshot", help="rules snapshot tools").add_subparsers(
        dest="snapshot_command", metavar="COMMAND", required=True
    )
    validate = snapshot.add_parser(
        "validate",
        help="check rules files completely",
        description="Validate snapshots; every problem is listed with file and line. "
        "Exit 0 when all are valid, 1 when one is invalid, 2 when one is unreadable.",
    )
    validate.add_argument("file", nargs="+", help="YAML or JSON snapshot")
    validate.set_defaults(handler=cmd_snapshot_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = build_parser().parse_args(argv)
    try:
        result: int = options.handler(options)
    except SnapshotError as error:
        print(f"pdp: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, ConfigError, GeoIPError) as error:
        print(f"pdp: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        print(f"pdp: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
