"""The `pdp` command: serve, check, explain, geo lookup, snapshot validate.

Exit codes: 0 success (ALLOW for check/explain), 3 DENY, 1 invalid snapshot
(validate), 2 usage, configuration, input or transport error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from pdp import __version__
from pdp.config import add_serve_arguments, describe, resolve
from pdp.errors import PdpError
from pdp.geo import (
    GeoDatabase,
    InvalidAddressError,
    Located,
)
from pdp.iso3166 import jurisdiction_problem
from pdp.model import UNKNOWN_LOCATION, Action, Decision, Location, Meeting, Verdict
from pdp.rules import Policy, SnapshotError, load_policy, policy_summary

if TYPE_CHECKING:
    from pdp.app import Sidecar
    from pdp.client import Client

log = logging.getLogger("pdp")

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_DENY = 0, 1, 2, 3


class UsageError(PdpError):
    """A problem the user can fix; printed without a traceback, exit code 2."""


# --------------------------------------------------------------------------- shared helpers


def open_geo(
    name: str, cache_size: int = 100_000, sha256_file: str = "", nat64_prefixes: Sequence[str] = ()
) -> GeoDatabase:
    """:func:`pdp.app.open_geo`, imported when used: commands other than serve start quicker."""
    from pdp import app
    from pdp.addresses import InvalidPrefixError

    try:
        return app.open_geo(name, cache_size, sha256_file, nat64_prefixes)
    except InvalidPrefixError as error:
        raise UsageError(f"--nat64-prefix: {error}") from None


def _open_geo_for(options: argparse.Namespace) -> GeoDatabase:
    """The database `explain` and `geo lookup` use, with the server's NAT64 prefixes."""
    prefixes = options.nat64_prefix or os.environ.get("PDP_NAT64_PREFIX", "").split(",")
    return open_geo(
        options.geoip_db or os.environ.get("PDP_GEOIP_DB", ""), 1, nat64_prefixes=[p for p in prefixes if p]
    )


def _format_build(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d")


def _build_fields(epoch: int) -> dict[str, Any]:
    """The database build for JSON output: Unix seconds and RFC 3339 (both null without a database)."""
    if not epoch:
        return {"geoip_build": None, "geoip_build_time": None}
    moment = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return {"geoip_build": epoch, "geoip_build_time": moment.isoformat().replace("+00:00", "Z")}


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
    geoip = f"GeoIP build {_format_build(build)}" if build else "no GeoIP database (location given)"
    lines.append(f"  policy       version {version}, {geoip}")
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
        **_build_fields(build),
        "shadow_rule_ids": list(decision.shadow_rule_ids),
    }


def _verdict_exit(verdict: Verdict) -> int:
    return EXIT_DENY if verdict == Verdict.DENY else EXIT_OK


def _add_nat64_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nat64-prefix",
        action="append",
        default=[],
        metavar="PREFIX",
        help="the network's NAT64 prefix, as given to pdp serve (repeatable) [env PDP_NAT64_PREFIX]",
    )


def _add_meeting_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meeting", required=True, metavar="ID", help="meeting id")
    parser.add_argument("--tag", action="append", default=[], metavar="TAG", help="meeting tag (repeatable)")
    parser.add_argument("--host-account", default="", metavar="ACCOUNT", help="account hosting the meeting")
    parser.add_argument("--action", choices=("join", "host"), default="join", help="what is asked (default join)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


# --------------------------------------------------------------------------- commands


def cmd_serve(options: argparse.Namespace) -> int:
    from pdp import logs
    from pdp.app import Sidecar

    config = resolve(vars(options))
    logs.setup(config.log_format, config.log_level)
    log.info("starting pdp %s with %s", __version__, json.dumps(describe(config)))
    sidecar = Sidecar(config)
    sidecar.start()
    for exporter in sidecar.exporters:
        log.info("telemetry %s", exporter)
    sidecar.run_until_signal(ready=lambda: print("\n".join(_serving_lines(sidecar)), flush=True))
    log.info("shutdown complete")
    return EXIT_OK


def _serving_lines(sidecar: Sidecar) -> list[str]:
    """What `pdp serve` prints once it listens: the first line says whether it
    serves; only a serving sidecar suggests a check, in a form that runs when pasted."""
    policy, geo, status = sidecar.holder.policy, sidecar.geo, sidecar.holder.status
    assert geo is not None  # started
    database = f"{geo.database_type} built {_format_build(geo.build_epoch)}"
    if policy is None:
        return [
            f"pdp {__version__} NOT SERVING on {sidecar.address}: no policy: {status.last_error or 'none fetched yet'}",
            f"  it retries every {sidecar.config.poll_seconds:g} s and serves once {status.source} holds a valid "
            f"snapshot; until then Check answers UNAVAILABLE and health NOT_SERVING ({database})",
        ]
    stale = " (stale: the store is unreachable or its snapshot was refused)" if status.stale else ""
    candidate = sidecar.candidate.holder.policy if sidecar.candidate is not None else None
    shadow = f", candidate version {candidate.version} in shadow" if candidate is not None else ""
    return [
        f"pdp {__version__} listening on {sidecar.address}: policy version {policy.version} "
        f"({len(policy.rules)} rules){stale}{shadow}, {database}",
        f"try: {pdp_command()} check --target {shlex.quote(sidecar.address)} --ip 175.16.199.1 --meeting m-1 "
        "--tag memorial",
    ]


def pdp_command() -> str:
    """This pdp as a shell command that runs when pasted: ``pdp`` when that name
    on PATH is this very program, else its absolute path (``.venv/bin/pdp``
    is not on a new user's PATH), or ``python -m pdp`` when started that way."""
    started_as = sys.argv[0]
    if Path(started_as).name == "__main__.py":
        return f"{shlex.quote(sys.executable)} -m pdp"
    path = Path((shutil.which(started_as) if os.sep not in started_as else None) or started_as).absolute()
    on_path = shutil.which("pdp")
    if on_path is not None and path.exists() and path.samefile(on_path):
        return "pdp"
    return shlex.quote(str(path))


def cmd_check(options: argparse.Namespace) -> int:
    with _client(options) as client:
        try:
            result = client.check(
                options.ip,
                options.meeting,
                tags=options.tag,
                host_account_id=options.host_account,
                action=Action[options.action.upper()],
            )
        except grpc.RpcError as error:
            raise UsageError(f"{options.target}: {_rpc_error_text(error)}") from None
    decision = Decision(result.verdict, result.rule_id, result.reason, result.legal_basis, result.shadow_rule_ids)
    _print_decision(decision, result.location, result.policy_version, result.geoip_build, options.json)
    return _verdict_exit(result.verdict)


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
        print(f"# {geo.database_type} built {_format_build(geo.build_epoch)} ({geo.path})")
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


def cmd_keygen(options: argparse.Namespace) -> int:
    from pdp.signing import generate_keypair

    base = Path(options.out)
    private_path, public_path = base.with_name(base.name + ".key"), base.with_name(base.name + ".pub")
    try:
        kid = generate_keypair(private_path, public_path)
    except FileExistsError as error:
        raise UsageError(str(error)) from None
    print(f"key id {kid}\n  private {private_path} (mode 0600: sign with it, keep it off the sidecars)")
    print(f"  public  {public_path} (give it to the sidecars: PDP_SNAPSHOT_PUBKEY)")
    return EXIT_OK


def _signed(path: str, key_file: str | None, as_json: bool = False) -> tuple[bytes, Policy]:
    """A validated rules file's bytes (as JSON if asked), in a signed envelope when a key is given."""
    from pdp.rules import snapshot_as_json
    from pdp.signing import SignatureError, load_private_key, sign

    policy = load_policy(path)
    data = Path(path).read_bytes()
    if as_json:
        data = snapshot_as_json(data, path)
    if not key_file:
        return data, policy
    try:
        return sign(data, policy.version, load_private_key(key_file)), policy
    except SignatureError as error:
        raise UsageError(f"--key: {error}") from None


def cmd_snapshot_sign(options: argparse.Namespace) -> int:
    data, policy = _signed(options.file, options.key, options.json)
    if options.out == "-":
        sys.stdout.write(data.decode())
    else:
        Path(options.out).write_bytes(data)
        print(f"signed version {policy.version} into {options.out}")
    return EXIT_OK


def cmd_snapshot_publish(options: argparse.Namespace) -> int:
    from pdp.publish import PublishError, publish

    data, policy = _signed(options.file, options.key, options.json)
    try:
        outcome = publish(data, options.to, policy.version, notify=not options.no_notify)
    except (PublishError, ValueError) as error:
        raise UsageError(str(error)) from None
    signed = "signed" if options.key else "unsigned"
    print(f"published version {policy.version} ({signed}) to {options.to}: {outcome}")
    return EXIT_OK


def cmd_status(options: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(options) as client:
        try:
            status = client.status()
        except grpc.RpcError as error:
            raise UsageError(f"{options.target}: {_rpc_error_text(error)}") from None
    document = MessageToDict(status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    # proto3 JSON writes int64 as a string; the build is a number and a time, as in pdp check --json.
    fields = _build_fields(status.geoip_build)
    document = {key: value for key, value in document.items() if key != "geoip_build"}
    position = list(document).index("geoip_type") + 1 if "geoip_type" in document else len(document)
    document = dict([*list(document.items())[:position], *fields.items(), *list(document.items())[position:]])
    if options.json:
        print(json.dumps(document, indent=2))
    else:
        document["geoip_build"] = _format_build(status.geoip_build) if status.geoip_build else "none"
        del document["geoip_build_time"]
        candidate = document.pop("candidate", None)
        width = max(len(key) for key in document)
        for key, value in document.items():
            print(f"{key:<{width}}  {value}")
        if candidate is not None:
            print("\n".join(_candidate_lines(status.candidate)))
    if not status.serving:
        print(f"pdp: {options.target} is not serving (exit 2)", file=sys.stderr)
    return EXIT_OK if status.serving else EXIT_USAGE


def _candidate_lines(candidate: Any) -> list[str]:
    """GetStatus's candidate, for people: what it is, then its would-be flips by rule."""
    if not candidate.policy_version:
        why = candidate.last_error or "not fetched yet"
        return [f"candidate            none loaded from {candidate.source}: {why}"]
    loaded = dt.datetime.fromtimestamp(candidate.loaded_at.seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [
        f"candidate            version {candidate.policy_version} from {candidate.source}, in shadow since {loaded}",
        f"  decisions          {candidate.decisions} evaluated, {candidate.flips} would flip, "
        f"{candidate.dropped} not evaluated (queue full)",
    ]
    if candidate.last_error:
        lines.append(f"  last error         {candidate.last_error}")
    names = {Verdict.ALLOW: "ALLOW", Verdict.DENY: "DENY"}
    for row in candidate.flips_by_rule:
        change = f"{names[Verdict(row.verdict)]} -> {names[Verdict(row.candidate_verdict)]}"
        lines.append(f"  {row.rule_id or '(default)':<24} {row.jurisdiction:<8} {change:<14} {row.count:>8}")
    return lines


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


def _client(options: argparse.Namespace) -> Client:
    from pdp.client import Client

    return Client(
        options.target,
        timeout=options.timeout,
        tls_ca=options.tls_ca,
        tls_cert=options.tls_cert,
        tls_key=options.tls_key,
        server_name=options.tls_server_name,
    )


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=os.environ.get("PDP_LISTEN", "127.0.0.1:50051"),
        help="sidecar address, HOST:PORT or unix:/path (default $PDP_LISTEN or 127.0.0.1:50051)",
    )
    parser.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS", help="deadline (default 2)")
    parser.add_argument("--tls-ca", metavar="FILE", help="use TLS, trusting this CA bundle (PEM)")
    parser.add_argument("--tls-cert", metavar="FILE", help="client certificate, for a sidecar that requires one")
    parser.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert")
    parser.add_argument("--tls-server-name", metavar="NAME", help="name to check in the server's certificate")


def _rpc_error_text(error: grpc.RpcError) -> str:
    if isinstance(error, grpc.Call):
        return f"{error.code().name}: {error.details()}"
    return str(error)


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
    _add_client_arguments(check)
    check.add_argument("--ip", required=True, help="participant's IP address")
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
        help="ISO 3166-2 subdivision like US-WA (repeatable); alone, it implies its --country",
    )
    explain.add_argument("--geoip-db", metavar="PATH", help="MaxMind database, or 'demo' [env PDP_GEOIP_DB]")
    _add_nat64_argument(explain)
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
        "country; ISO 3166-2 subdivisions). An IPv6 address carrying an IPv4 one (NAT64, SIIT, "
        "6to4, Teredo, or a --nat64-prefix) is located by that IPv4 address, and the line says so.",
    )
    lookup.add_argument("ip", nargs="+", help="IPv4 or IPv6 addresses")
    lookup.add_argument("--geoip-db", metavar="PATH", help="MaxMind database, or 'demo' [env PDP_GEOIP_DB]")
    _add_nat64_argument(lookup)
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

    sign = snapshot.add_parser(
        "sign",
        help="wrap a rules file in a signed envelope",
        description="Validate FILE, then sign it with an Ed25519 private key (pdp keygen). "
        "The envelope binds the payload, the key id and the version.",
    )
    sign.add_argument("file", help="YAML or JSON snapshot")
    sign.add_argument("--key", required=True, metavar="PRIVATE_KEY", help="PEM private key from pdp keygen")
    sign.add_argument("--out", required=True, metavar="FILE", help="where to write the envelope ('-' for stdout)")
    sign.add_argument("--json", action="store_true", help="convert to compact JSON first (compiles faster)")
    sign.set_defaults(handler=cmd_snapshot_sign)

    publish = snapshot.add_parser(
        "publish",
        help="validate, sign and publish a snapshot to a store",
        description="Validate FILE, sign it when --key is given, and publish it: "
        "file:// by atomic rename, redis://host:port/db?key=K&channel=C by SET and "
        "PUBLISH in one MULTI/EXEC. For HTTP stores, upload the signed file with the "
        "store's own tools (see README).",
    )
    publish.add_argument("file", help="YAML or JSON snapshot")
    publish.add_argument("--to", required=True, metavar="URL", help="file:///path or redis://host:port/db?key=K")
    publish.add_argument("--key", metavar="PRIVATE_KEY", help="sign with this PEM private key")
    publish.add_argument(
        "--no-notify",
        action="store_true",
        help="redis: store without the pub/sub notice (sidecars see it at their next poll)",
    )
    publish.add_argument(
        "--json",
        action="store_true",
        help="publish as compact JSON (sidecars compile it several times faster than YAML)",
    )
    publish.set_defaults(handler=cmd_snapshot_publish)

    from pdp.diff_command import add_parser as add_diff

    add_diff(snapshot)
    from pdp.impact.command import add_parser as add_impact

    add_impact(snapshot)
    from pdp.promote import add_parser as add_promote

    add_promote(snapshot)

    keygen = commands.add_parser(
        "keygen",
        help="create an Ed25519 key pair for signing snapshots",
        description="Write NAME.key (private, mode 0600) and NAME.pub (public, for "
        "PDP_SNAPSHOT_PUBKEY). Existing files are never overwritten.",
    )
    keygen.add_argument("--out", required=True, metavar="NAME", help="path prefix, like keys/pdp-2026")
    keygen.set_defaults(handler=cmd_keygen)

    status = commands.add_parser(
        "status",
        help="show a running sidecar's status",
        description="Print GetStatus: policy version and source, last fetch, stale flag, "
        "last error, GeoIP database and cache. Exit 0 when the sidecar is serving; exit 2 when it is "
        "not serving (no policy or GeoIP database loaded yet, or draining on SIGTERM) or cannot be reached.",
    )
    _add_client_arguments(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.set_defaults(handler=cmd_status)

    report = commands.add_parser(
        "report",
        help="transparency report from decision audit logs",
        description="Aggregate audit logs per jurisdiction, rule and legal basis: denials, distinct meetings, "
        "distinct pseudonymous participants, where they were located, first and last seen, shadow matches; "
        "and check every record against its rule's jurisdiction. Times are RFC 3339 in UTC, to the second. "
        "Exit 0; 1 when a record shows a rule applied to a participant located outside its jurisdiction "
        "(the report is still written, and says so); 2 when a log, snapshot or option cannot be used.",
    )
    report.add_argument("log", nargs="+", help="audit log files (JSON lines; rotated files too)")
    report.add_argument(
        "--since", metavar="TIME", help="period start, included (RFC 3339 or a date; UTC unless an offset is given)"
    )
    report.add_argument(
        "--until", metavar="TIME", help="period end, not included (default: just after the last record)"
    )
    report.add_argument(
        "--format",
        choices=("md", "csv", "json", "html"),
        default="md",
        help="md, csv, json, or html: one self-contained page with the chart, to publish (default md)",
    )
    report.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE (whole or not at all)")
    report.add_argument("--chart", metavar="FILE", help="also draw the chart as PNG, or SVG for a .svg name")
    report.add_argument(
        "--rules",
        action="append",
        default=[],
        metavar="SNAPSHOT",
        help="snapshot file of a policy version in the logs (repeatable): adds validity windows, "
        "and checks the logged jurisdictions against the published ones",
    )
    report.set_defaults(handler=cmd_report)

    from pdp.loadtest.command import add_parser as add_loadtest

    add_loadtest(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = build_parser().parse_args(argv)
    try:
        result: int = options.handler(options)
    except PdpError as error:  # anything else is a bug, and keeps its traceback
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
