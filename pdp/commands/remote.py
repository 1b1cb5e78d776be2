"""The commands that ask a running sidecar: `pdp check` and `pdp status`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

import grpc

from pdp.commands.common import (
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    _build_fields,
    _client,
    _print_decision,
    _rpc_error_text,
    _verdict_exit,
)
from pdp.geo import format_build
from pdp.model import Action, Decision, Verdict


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
        document["geoip_build"] = format_build(status.geoip_build) if status.geoip_build else "none"
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
