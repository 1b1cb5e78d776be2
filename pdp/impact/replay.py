"""Replaying recorded decisions against a candidate snapshot, and what flips.

The baseline of a record is the decision it recorded; with ``--against OLD``,
OLD's decision for the same participant, meeting, action and moment. When the
policy a record names is found (:mod:`pdp.impact.snapshots`), it is decided
again, and a record it does not reproduce is counted as a disagreement: the
replay checks itself on every record it can.

Counts are kept both as records and as the decisions they stand for (a sampled
ALLOW stands for ``1 / allow_sample_rate``, see :attr:`Recorded.weight`).
Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pdp.audit import pseudonym
from pdp.impact.flips import Decider, Flip, decider, flip
from pdp.impact.records import Recorded
from pdp.model import Verdict
from pdp.rules import Policy

__all__ = ["GroupKey", "Replay", "RuleProof", "Sample", "pseudonymised"]

SAMPLES = 20


def pseudonymised(policy: Policy, key: bytes) -> Policy:
    """``policy`` with every ``host_accounts`` entry replaced by its audit-log
    pseudonym under ``key``, so that it selects the hosts the log names."""
    rules = [
        dataclasses.replace(rule, host_accounts=frozenset(pseudonym(key, host) for host in rule.host_accounts))
        if rule.host_accounts
        else rule
        for rule in policy.rules
    ]
    return Policy(policy.version, rules, policy.unknown_location, policy.sha256)


@dataclass(frozen=True, slots=True)
class GroupKey:
    """The finest grouping of flips; every table of the report sums these."""

    jurisdiction: str
    rule_id: str
    legal_basis: str
    meeting_id: str
    action: str
    direction: str


@dataclass
class Group:
    records: int = 0
    decisions: float = 0.0
    participants: set[str] = field(default_factory=set)


@dataclass
class RuleProof:
    """Every flip a rule decided a side of, and where those participants were."""

    rule_id: str
    jurisdiction: tuple[str, ...]
    flips: int = 0
    decisions: float = 0.0
    located_in: set[str] = field(default_factory=set)
    outside: int = 0


@dataclass(frozen=True, slots=True)
class Sample:
    record: Recorded
    flip: Flip


@dataclass
class Replay:
    """Accumulates the replay of records, one :meth:`add` at a time."""

    candidate: Policy
    baseline_policy: Callable[[Recorded], Policy | None]  # the policy to decide the baseline with, if any
    against: bool = False  # the baseline is that policy's decision, not the recorded one
    samples_wanted: int = SAMPLES
    records: int = 0
    decisions: float = 0.0
    deny_records: int = 0
    allow_rates: Counter[float] = field(default_factory=Counter)
    baselines: Counter[tuple[int, str, bool]] = field(default_factory=Counter)  # (version, sha, found)
    disagreements: int = 0
    disagreement_examples: list[str] = field(default_factory=list)
    same_verdict_other_rule: int = 0
    groups: dict[GroupKey, Group] = field(default_factory=dict)
    proofs: dict[str, RuleProof] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    violations: list[Sample] = field(default_factory=list)
    timeline: dict[tuple[int, str], float] = field(default_factory=dict)  # (minute, rule) -> decisions

    def add(self, record: Recorded) -> None:
        """Replay one record."""
        self.records += 1
        weight = record.weight
        self.decisions += weight
        if record.verdict == Verdict.DENY:
            self.deny_records += 1
        else:
            self.allow_rates[record.allow_sample_rate] += 1
        before, before_by = self._baseline(record)
        decision = self.candidate.decide(record.location, record.action, record.meeting, record.time)
        after_by = decider(self.candidate, decision)
        found = flip(record.location, before, before_by, decision.verdict, after_by)
        if found is None:
            if before_by.rule_id != after_by.rule_id:
                self.same_verdict_other_rule += 1
            return
        self._count(record, found, before_by, after_by, weight)

    def _baseline(self, record: Recorded) -> tuple[Verdict, Decider]:
        policy = self.baseline_policy(record)
        if not self.against:
            self.baselines[(record.policy_version, record.policy_sha256, policy is not None)] += 1
        recorded = Decider(record.rule_id, record.jurisdiction, record.legal_basis)
        if policy is None:
            return record.verdict, recorded
        decision = policy.decide(record.location, record.action, record.meeting, record.time)
        if self.against:
            return decision.verdict, decider(policy, decision)
        if (decision.verdict, decision.rule_id) != (record.verdict, record.rule_id):
            self.disagreements += 1
            if len(self.disagreement_examples) < 10:
                self.disagreement_examples.append(
                    f"{record.where}: recorded {record.verdict.name} {record.rule_id or '(no rule)'}, "
                    f"version {policy.version} decides {decision.verdict.name} {decision.rule_id or '(no rule)'}"
                )
        return record.verdict, recorded

    def _count(self, record: Recorded, found: Flip, before_by: Decider, after_by: Decider, weight: float) -> None:
        action = "join" if record.action == 1 else "host"
        key = GroupKey(
            found.jurisdiction, found.rule_id, found.legal_basis, record.meeting.meeting_id, action, found.direction
        )
        group = self.groups.setdefault(key, Group())
        group.records += 1
        group.decisions += weight
        if record.participant:
            group.participants.add(record.participant)
        place = " ".join(record.location.codes) or "unknown"
        for side in {before_by, after_by}:
            if not side.rule_id:
                continue
            proof = self.proofs.setdefault(side.rule_id, RuleProof(side.rule_id, side.jurisdiction))
            proof.jurisdiction = tuple(sorted(set(proof.jurisdiction) | set(side.jurisdiction)))
            proof.flips += 1
            proof.decisions += weight
            proof.located_in.add(place)
            proof.outside += side.rule_id in found.outside
        minute = (int(record.time // 60), found.rule_id)
        self.timeline[minute] = self.timeline.get(minute, 0.0) + weight
        sample = Sample(record, found)
        if found.outside:
            self.violations.append(sample)
        if len(self.samples) < self.samples_wanted:
            self.samples.append(sample)

    @property
    def flips(self) -> int:
        return sum(group.records for group in self.groups.values())

    @property
    def flipped_decisions(self) -> float:
        return sum(group.decisions for group in self.groups.values())
