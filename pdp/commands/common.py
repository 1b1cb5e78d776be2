"""What the `pdp` commands share: exit codes, the usage error, opening a GeoIP database,
and printing a decision the same way for `check`, `explain` and the other adapters.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from pdp.errors import PdpError
from pdp.geo import (
    GeoDatabase,
    format_build,
)
from pdp.model import Decision, Location, Verdict

if TYPE_CHECKING:
    from pdp.client import Client

log = logging.getLogger("pdp")

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_DENY = 0, 1, 2, 3


class UsageError(PdpError):
    """A problem the user can fix; printed without a traceback, exit code 2."""


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
    geoip = f"GeoIP build {format_build(build)}" if build else "no GeoIP database (location given)"
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


def _timestamp(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time like 2020-06-02T12:00:00Z") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a UTC offset, like 2020-06-02T12:00:00Z")
    return moment
