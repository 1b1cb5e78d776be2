"""The `pdp` command's parser and entry point; the handlers are in ``pdp/commands/``.

Exit codes: 0 success (ALLOW for check/explain), 3 DENY, 1 invalid snapshot
(validate), 2 usage, configuration, input or transport error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pdp import __version__
from pdp.commands.common import (
    EXIT_USAGE,
    UsageError,
    _add_client_arguments,
    _add_meeting_arguments,
    _add_nat64_argument,
    _timestamp,
)
from pdp.commands.local import cmd_explain, cmd_geo_lookup, cmd_report
from pdp.commands.remote import cmd_check, cmd_status
from pdp.commands.serve import cmd_serve, pdp_command
from pdp.commands.snapshot import cmd_keygen, cmd_snapshot_publish, cmd_snapshot_sign, cmd_snapshot_validate
from pdp.config import add_serve_arguments
from pdp.errors import PdpError

# The handlers live in pdp/commands/; UsageError and pdp_command are re-exported for callers of pdp.cli.
__all__ = ["UsageError", "build_parser", "main", "pdp_command"]

# --------------------------------------------------------------------------- parser


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
    sign.add_argument("--json", action="store_true", help="convert to canonical compact JSON first (compiles faster)")
    sign.add_argument(
        "--compress", choices=("none", "gzip"), default="none", help="compress the envelope (sources detect gzip)"
    )
    sign.set_defaults(handler=cmd_snapshot_sign)

    publish = snapshot.add_parser(
        "publish",
        help="validate, sign and publish a snapshot to a store",
        description="Validate FILE, sign it when --key is given, and publish it: "
        "file:// by atomic rename; redis://host:port/db?key=K&channel=C (or "
        "redis+sentinel://h1:26379,h2:26379/SERVICE?key=K) as canonical JSON, writing the "
        "snapshot, its head, a signed delta against the stored one and the notice in one "
        "MULTI/EXEC. For HTTP stores, upload the signed file with the store's own tools (see README).",
    )
    publish.add_argument("file", help="YAML or JSON snapshot")
    publish.add_argument(
        "--to", required=True, metavar="URL", help="file:///path, redis://host:port/db?key=K or redis+sentinel://..."
    )
    publish.add_argument("--key", metavar="PRIVATE_KEY", help="sign with this PEM private key")
    publish.add_argument(
        "--no-notify",
        action="store_true",
        help="redis: store without the pub/sub notice (sidecars see it at their next poll)",
    )
    publish.add_argument(
        "--json",
        action="store_true",
        help="publish as canonical compact JSON (sidecars compile it several times faster than YAML; "
        "always so for redis)",
    )
    publish.add_argument(
        "--compress",
        choices=("none", "gzip"),
        default="none",
        help="store the snapshot gzip-compressed (about 10x smaller; sidecars before 0.2 cannot read it)",
    )
    publish.add_argument(
        "--no-delta", action="store_true", help="redis: write no delta (sidecars fetch this change whole)"
    )
    publish.add_argument(
        "--stream-maxlen",
        type=int,
        default=1000,
        metavar="N",
        help="redis: keep about N deltas in the stream (XADD MAXLEN ~ N; default 1000)",
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
