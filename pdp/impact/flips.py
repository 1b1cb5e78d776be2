"""What one decision flipping means: which rule it is owed to, where, and the boundary check.

Shared by the offline replay (:mod:`pdp.impact.replay`) and the live
candidate (:mod:`pdp.candidate`), so that both count the same thing the same
way. Pure: no I/O.

A flip is a decision whose verdict differs between a baseline and a candidate.
It is attributed to one rule: the candidate's deciding rule when it now
denies; when it now allows, the candidate's allow exception if one decided,
else the baseline's deny that no longer applies. ``rule_id`` is empty when the
policy default decided (``defaults.unknown_location``, or no rule applying).
Every rule that decided either side must cover the participant's location:
:attr:`Flip.outside` lists those that did not, which would be a bug in pdp,
never a property of a snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdp.model import Decision, Location, Verdict
from pdp.rules import Policy

__all__ = ["DEFAULT", "UNKNOWN", "Decider", "Flip", "decider", "flip"]

UNKNOWN = "unknown"  # the jurisdiction of a flip at a location without a country


@dataclass(frozen=True, slots=True)
class Decider:
    """The rule that decided one side of a flip, as far as the flip needs it."""

    rule_id: str  # "" for the policy default
    jurisdiction: tuple[str, ...]
    legal_basis: str


DEFAULT = Decider("", (), "")


def decider(policy: Policy, decision: Decision) -> Decider:
    """The rule of ``policy`` that made ``decision`` (the default when none did)."""
    rule = policy.by_id.get(decision.rule_id) if decision.rule_id else None
    return DEFAULT if rule is None else Decider(rule.id, rule.jurisdiction, rule.legal_basis)


@dataclass(frozen=True, slots=True)
class Flip:
    """One decision whose verdict the candidate changes."""

    before: Verdict
    after: Verdict
    before_rule: str
    after_rule: str
    rule_id: str  # the rule the flip is owed to; "" for the policy default
    legal_basis: str  # of the deny involved: the candidate's, or the lifted one's
    jurisdiction: str  # the location's code through which that rule reaches it, or UNKNOWN
    outside: tuple[str, ...]  # deciding rules that do not cover the location: must stay empty

    @property
    def direction(self) -> str:
        return f"{self.before.name}->{self.after.name}"


def flip(location: Location, before: Verdict, before_by: Decider, after: Verdict, after_by: Decider) -> Flip | None:
    """The flip between two decisions at ``location``, or None when the verdict is the same."""
    if before == after:
        return None
    if after == Verdict.DENY:
        owed, legal_basis = after_by, after_by.legal_basis
    else:
        owed, legal_basis = (after_by if after_by.rule_id else before_by), before_by.legal_basis
    codes = location.codes
    outside = tuple(
        side.rule_id
        for side, verdict in ((before_by, before), (after_by, after))
        if (side.rule_id and codes_outside(codes, side.jurisdiction))
        or (not side.rule_id and verdict == Verdict.DENY and codes)  # only an unknown location is denied by default
    )
    return Flip(
        before,
        after,
        before_by.rule_id,
        after_by.rule_id,
        owed.rule_id,
        legal_basis,
        _reached_through(codes, owed.jurisdiction),
        outside,
    )


def codes_outside(codes: tuple[str, ...], jurisdiction: tuple[str, ...]) -> bool:
    """True when none of a location's codes is in ``jurisdiction``."""
    return not any(code in jurisdiction for code in codes)


def _reached_through(codes: tuple[str, ...], jurisdiction: tuple[str, ...]) -> str:
    """The most specific of the location's codes that the jurisdiction names
    (US-WA rather than US); the country when no rule is involved."""
    for code in reversed(codes):
        if code in jurisdiction:
            return code
    return codes[0] if codes else UNKNOWN
