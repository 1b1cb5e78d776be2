"""The impact report as data: one JSON-ready document, the source of every format.

:func:`document` gathers what the replay found (:mod:`pdp.impact.replay`),
what the reader skipped (:mod:`pdp.impact.records`) and where baselines came
from (:mod:`pdp.impact.snapshots`); :mod:`pdp.impact.render` prints it as
Markdown or CSV and draws the chart. Ids are the log's pseudonyms only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdp.impact.records import SKIP_KINDS, LogReader
from pdp.impact.replay import Group, GroupKey, Replay, Sample
from pdp.impact.snapshots import SnapshotFinder
from pdp.rules import Policy

__all__ = ["Inputs", "document", "tally"]


@dataclass
class Inputs:
    """What the replay was run on, for the report's head."""

    candidate_name: str
    candidate: Policy
    against_name: str = ""
    changed_rules: dict[str, str] = field(default_factory=dict)  # rule id -> added | removed | changed
    changed_defaults: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def stamp(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def tally(replay: Replay, by: Callable[[GroupKey], tuple[str, ...]]) -> list[dict[str, Any]]:
    """Flips summed over the groups sharing ``by(key)``, most decisions first."""
    rows: dict[tuple[str, ...], Group] = {}
    for key, group in replay.groups.items():
        row = rows.setdefault(by(key), Group())
        row.records += group.records
        row.decisions += group.decisions
        row.participants |= group.participants
    ordered = sorted(rows.items(), key=lambda item: (-item[1].decisions, item[0]))
    return [
        {
            "key": list(key),
            "flips": group.records,
            "decisions": round(group.decisions, 2),
            "distinct_participants": len(group.participants),
        }
        for key, group in ordered
    ]


def document(inputs: Inputs, replay: Replay, reader: LogReader, finder: SnapshotFinder | None) -> dict[str, Any]:
    """Everything the report says, as one JSON-ready mapping."""
    candidate = inputs.candidate
    return {
        "candidate": {"file": inputs.candidate_name, "version": candidate.version, "sha256": candidate.sha256},
        "against": inputs.against_name or None,
        "logs": _logs(reader),
        "sampling": _sampling(replay),
        "baselines": _baselines(replay, finder),
        "changed_rules": inputs.changed_rules,
        "changed_defaults": inputs.changed_defaults,
        "flips": {
            "records": replay.flips,
            "decisions": round(replay.flipped_decisions, 2),
            "by_direction": tally(replay, lambda key: (key.direction,)),
            "by_jurisdiction": tally(replay, lambda key: (key.jurisdiction,)),
            "by_rule": tally(replay, lambda key: (key.rule_id, key.legal_basis)),
            "by_legal_basis": tally(replay, lambda key: (key.legal_basis,)),
            "by_meeting": tally(replay, lambda key: (key.meeting_id,)),
            "by_action": tally(replay, lambda key: (key.action,)),
            "groups": _groups(replay),
        },
        "same_verdict_other_rule": replay.same_verdict_other_rule,
        "boundary": _boundary(replay, inputs),
        "samples": [_sample(sample) for sample in replay.samples],
        "timeline": [
            {"minute": stamp(minute * 60), "rule_id": rule_id, "decisions": round(decisions, 2)}
            for (minute, rule_id), decisions in sorted(replay.timeline.items())
        ],
        "notes": inputs.notes + (finder.notes if finder is not None else []),
    }


def _logs(reader: LogReader) -> dict[str, Any]:
    return {
        "files": reader.files,
        "lines": reader.lines,
        "shadow_lines": reader.shadow_lines,
        "outside_period": reader.outside_period,
        "duplicates": reader.duplicates,
        "skipped": {
            kind: {"lines": reader.skipped[kind], "meaning": meaning, "first": reader.examples[kind]}
            for kind, meaning in SKIP_KINDS.items()
        },
    }


def _sampling(replay: Replay) -> dict[str, Any]:
    allows = [
        {"rate": rate, "scale": round(1 / rate, 4), "records": count, "decisions": round(count / rate, 2)}
        for rate, count in sorted(replay.allow_rates.items())
    ]
    return {
        "records": replay.records,
        "decisions": round(replay.decisions, 2),
        "deny_records": replay.deny_records,
        "allow": allows,
    }


def _baselines(replay: Replay, finder: SnapshotFinder | None) -> dict[str, Any]:
    where = finder.where if finder is not None else {}
    return {
        "by_policy": [
            {
                "version": version,
                "sha256": sha256,
                "records": count,
                "decided_again_from": where.get((version, sha256)) if found else None,
            }
            for (version, sha256, found), count in sorted(replay.baselines.items())
        ],
        "disagreements": replay.disagreements,
        "disagreement_examples": replay.disagreement_examples,
    }


def _groups(replay: Replay) -> list[dict[str, Any]]:
    rows = []
    for key, group in sorted(replay.groups.items(), key=lambda item: (-item[1].decisions, str(item[0]))):
        rows.append(
            {
                "jurisdiction": key.jurisdiction,
                "rule_id": key.rule_id,
                "legal_basis": key.legal_basis,
                "meeting_id": key.meeting_id,
                "action": key.action,
                "direction": key.direction,
                "flips": group.records,
                "decisions": round(group.decisions, 2),
                "distinct_participants": len(group.participants),
            }
        )
    return rows


def _boundary(replay: Replay, inputs: Inputs) -> dict[str, Any]:
    rules = []
    for rule_id in sorted(set(replay.proofs) | set(inputs.changed_rules)):
        proof = replay.proofs.get(rule_id)
        rule = inputs.candidate.by_id.get(rule_id)
        rules.append(
            {
                "rule_id": rule_id,
                "change": inputs.changed_rules.get(rule_id, "unchanged"),
                "jurisdiction": list(proof.jurisdiction if proof else rule.jurisdiction if rule else ()),
                "flips": proof.flips if proof else 0,
                "decisions": round(proof.decisions, 2) if proof else 0,
                "located_in": sorted(proof.located_in) if proof else [],
                "outside": proof.outside if proof else 0,
            }
        )
    return {
        "holds": not replay.violations,
        "rules": rules,
        "violations": [_sample(sample) for sample in replay.violations],
    }


def _sample(sample: Sample) -> dict[str, Any]:
    record, found = sample.record, sample.flip
    return {
        "where": record.where,
        "decision_id": record.decision_id,
        "time": stamp(record.time),
        "participant": record.participant,
        "meeting_id": record.meeting.meeting_id,
        "action": "join" if record.action == 1 else "host",
        "location": " ".join(record.location.codes) or "unknown",
        "before": f"{found.before.name} {found.before_rule or '(no rule)'}",
        "after": f"{found.after.name} {found.after_rule or '(no rule)'}",
        "stands_for": round(record.weight, 4),
        "outside": list(found.outside),
    }
