"""Compiled rules and their evaluation: :class:`Rule`, the decision index, and
:class:`Policy` with :meth:`~Policy.decide` (the hot path) and
:meth:`~Policy.explain`.

Pure: no I/O, no clock of its own (the caller passes ``now``), no global state.
A :class:`Policy` is immutable once built and safe to share between threads.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from pdp.model import Action, Decision, Location, Meeting, Verdict

__all__ = ["Bucket", "Index", "Memory", "Policy", "Rule", "Trace", "build_index", "policy_summary"]

_ACTION_NAMES = {int(Action.JOIN): "join", int(Action.HOST): "host"}


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated rule. Empty selector sets mean "every meeting"."""

    id: str
    effect: Verdict
    jurisdiction: tuple[str, ...]
    actions: int  # Action bits; a plain int because IntFlag arithmetic is slow
    meeting_ids: frozenset[str]
    host_accounts: frozenset[str]
    tags: frozenset[str]
    priority: int
    shadow: bool
    legal_basis: str
    reason: str
    valid_from: float  # Unix seconds; -inf when open
    valid_until: float  # Unix seconds, exclusive; +inf when open
    position: int  # index in the snapshot, for stable reporting order
    # Lower is stronger: priority descending, then deny before allow, then file
    # order. Computed from the rule alone (see pdp.rules.compile.rank), so an
    # unchanged rule keeps its rank, and its compiled form, across snapshots.
    rank: int = 0
    decision: Decision = field(default=Decision(Verdict.ALLOW), compare=False)
    # True when being found in its index list proves the rule applies: every
    # action, no window, no selector besides the one it is filed under.
    settled: bool = False

    def applies(self, action: int, meeting: Meeting, now: float) -> bool:
        """True when the rule covers this action, meeting and moment (not location).

        The hot path; :meth:`why_not` is the same test spelled out for explain.
        """
        return (
            self.actions & action != 0
            and self.valid_from <= now < self.valid_until
            and (not self.meeting_ids or meeting.meeting_id in self.meeting_ids)
            and (not self.host_accounts or meeting.host_account_id in self.host_accounts)
            and (not self.tags or not self.tags.isdisjoint(meeting.tags))
        )

    def why_not(self, action: int, meeting: Meeting, now: float) -> str | None:
        """Why the rule does not cover this action, meeting and moment, or None."""
        if not self.actions & action:
            return f"action {_ACTION_NAMES.get(action, action)} not in the rule's actions"
        if now < self.valid_from:
            return "not yet valid"
        if now >= self.valid_until:
            return "no longer valid"
        if self.meeting_ids and meeting.meeting_id not in self.meeting_ids:
            return "meeting id not selected"
        if self.host_accounts and meeting.host_account_id not in self.host_accounts:
            return "host account not selected"
        if self.tags and self.tags.isdisjoint(meeting.tags):
            return "no selected tag on the meeting"
        return None


@dataclass(frozen=True, slots=True)
class Trace:
    """How one rule fared in :meth:`Policy.explain`."""

    rule: Rule
    outcome: str  # "decided", "matched", "shadow", or why it did not match


class Bucket:
    """The rules of one jurisdiction code, each filed under its most selective
    meeting selector, every list sorted strongest first (by rank)."""

    __slots__ = ("by_host", "by_meeting", "by_tag", "everyone")

    def __init__(self) -> None:
        self.everyone: list[Rule] = []
        self.by_meeting: dict[str, list[Rule]] = {}
        self.by_host: dict[str, list[Rule]] = {}
        self.by_tag: dict[str, list[Rule]] = {}

    def add(self, rule: Rule) -> None:
        if rule.meeting_ids:
            for key in rule.meeting_ids:
                self.by_meeting.setdefault(key, []).append(rule)
        elif rule.host_accounts:
            for key in rule.host_accounts:
                self.by_host.setdefault(key, []).append(rule)
        elif rule.tags:
            for key in rule.tags:
                self.by_tag.setdefault(key, []).append(rule)
        else:
            self.everyone.append(rule)

    def rules(self) -> Iterator[Rule]:
        """Every rule filed here, some more than once."""
        yield from self.everyone
        for lists in (self.by_meeting, self.by_host, self.by_tag):
            for rules in lists.values():
                yield from rules

    def candidate_lists(self, meeting: Meeting) -> list[list[Rule]]:
        """The lists that may hold rules covering ``meeting``."""
        found = [self.everyone] if self.everyone else []
        for rules in (self.by_meeting.get(meeting.meeting_id), self.by_host.get(meeting.host_account_id)):
            if rules:
                found.append(rules)
        if self.by_tag:
            for tag in meeting.tags:
                rules = self.by_tag.get(tag)
                if rules:
                    found.append(rules)
        return found


Index = dict[str, tuple[Bucket | None, Bucket | None]]  # code -> (enforced, shadow)
# What a compiled policy keeps so that the next compile can reuse its unchanged
# rules (see pdp.rules.compile); opaque here.
Memory = object


def build_index(rules: Iterable[Rule], codes: Collection[str] | None = None) -> Index:
    """One lookup per jurisdiction code finds both kinds of rule; with ``codes``,
    only those codes' buckets are built."""
    enforced: dict[str, Bucket] = {}
    shadow: dict[str, Bucket] = {}
    for rule in sorted(rules, key=lambda r: r.rank):
        for code in rule.jurisdiction:
            if codes is None or code in codes:
                (shadow if rule.shadow else enforced).setdefault(code, Bucket()).add(rule)
    return {code: (enforced.get(code), shadow.get(code)) for code in enforced.keys() | shadow.keys()}


class Policy:
    """A compiled, immutable snapshot.

    :meth:`decide` is the hot path: per jurisdiction code of the location, one
    dict lookup, then a walk down short rank-sorted candidate lists that stops
    at the first rule that applies. Shadow rules live in an index of their own,
    so that they never lengthen the enforced walk.
    """

    __slots__ = ("_allow", "_unknown", "by_id", "index", "memory", "rules", "sha256", "unknown_location", "version")

    def __init__(
        self,
        version: int,
        rules: Sequence[Rule],
        unknown_location: Verdict,
        sha256: str = "",
        *,
        by_id: dict[str, Rule] | None = None,
        index: Index | None = None,
        memory: Memory | None = None,
    ) -> None:
        """``rules`` in file order, already ranked. ``by_id`` and ``index``, when
        given, must be those of ``rules`` (pdp.rules.compile patches the previous
        policy's); ``memory`` is what the next compile may reuse."""
        self.version = version
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.unknown_location = unknown_location
        self.sha256 = sha256
        self.by_id = by_id if by_id is not None else {rule.id: rule for rule in self.rules}
        self.index = index if index is not None else build_index(self.rules)
        self.memory = memory
        self._allow = Decision(Verdict.ALLOW, reason="no rule applies")
        self._unknown = Decision(
            unknown_location,
            reason=f"participant location unknown; policy default is {unknown_location.name.lower()}",
        )

    def decide(self, location: Location, action: int, meeting: Meeting, now: float) -> Decision:
        """Decide for one participant at ``location``. Never raises on valid input."""
        codes = location.codes
        if not codes:
            return self._unknown
        action = int(action)
        best: Rule | None = None
        shadows: dict[int, str] | None = None  # by position: a rule reached twice counts once
        for code in codes:
            buckets = self.index.get(code)
            if buckets is None:
                continue
            enforced, shadow = buckets
            if enforced is not None:
                for rules in enforced.candidate_lists(meeting):
                    for rule in rules:
                        if best is not None and rule.rank >= best.rank:
                            break  # the rest of this list is weaker still
                        if rule.settled or rule.applies(action, meeting, now):
                            best = rule
                            break
            if shadow is not None:
                for rules in shadow.candidate_lists(meeting):
                    for rule in rules:
                        if rule.settled or rule.applies(action, meeting, now):
                            if shadows is None:
                                shadows = {}
                            shadows[rule.position] = rule.id
        decision = self._allow if best is None else best.decision
        if shadows is None:
            return decision
        shadow_ids = tuple(shadows[position] for position in sorted(shadows))
        return Decision(decision.verdict, decision.rule_id, decision.reason, decision.legal_basis, shadow_ids)

    def explain(self, location: Location, action: int, meeting: Meeting, now: float) -> list[Trace]:
        """Every rule whose jurisdiction covers ``location``, with how it fared.

        Slow and thorough, for ``pdp explain``; :meth:`decide` is the fast path
        and gives the same verdict.
        """
        decision = self.decide(location, action, meeting, now)
        traces = []
        codes = set(location.codes)
        for rule in self.rules:
            if codes.isdisjoint(rule.jurisdiction):
                continue
            why_not = rule.why_not(action, meeting, now)
            if why_not is not None:
                traces.append(Trace(rule, why_not))
            elif rule.shadow:
                traces.append(Trace(rule, "shadow"))
            elif rule.id == decision.rule_id:
                traces.append(Trace(rule, "decided"))
            else:
                traces.append(Trace(rule, "matched, outranked"))
        return traces

    def __repr__(self) -> str:
        return f"<Policy version={self.version} rules={len(self.rules)} sha256={self.sha256[:12]}>"


def policy_summary(policy: Policy) -> Mapping[str, int]:
    """Counts by kind, for ``pdp snapshot validate`` and the logs."""
    return {
        "rules": len(policy.rules),
        "deny": sum(1 for r in policy.rules if r.effect == Verdict.DENY and not r.shadow),
        "allow": sum(1 for r in policy.rules if r.effect == Verdict.ALLOW and not r.shadow),
        "shadow": sum(1 for r in policy.rules if r.shadow),
        "jurisdictions": len({code for r in policy.rules for code in r.jurisdiction}),
    }
