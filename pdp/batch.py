"""Decisions a batch remembers: per kind of meeting and place, for as long as they hold.

A CheckBatch is one meeting, one action and one moment for many participants, so
the policy's decision for each depends on the participant's location alone (see
:meth:`pdp.rules.Policy.decide`). Two meetings that no rule can tell apart (the same
meeting id, host account and tags as far as any rule of the policy selects on them)
get the same decision at every place, and so do two moments between which no rule's
window opens or closes. So one *table* per such kind of meeting, action and window
maps each place (an interned :class:`~pdp.model.Location`, by identity) to its
decision and the adapter's answer, for the life of one active state; it is filled as
places are first seen, and a batch from a meeting of a known kind decides nothing.

Exact by construction: a table is keyed on everything a decision reads (the meeting's
selector values that some rule selects on, the action, the presenter) and consulted
only for moments inside its window, between two consecutive rule boundaries.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pdp.model import Decision, Location, Meeting
from pdp.rules import Policy

if TYPE_CHECKING:
    from pdp.bounds import ParticipantFields
    from pdp.state import Active

__all__ = ["MAX_TABLES", "MEMO_LIMIT", "BatchMemo", "ReadParticipants", "Selectors", "decide_place", "decide_places"]

T = TypeVar("T")

# Places remembered per active state, over all its tables; a state that has seen
# more starts again empty (each table holds at most the database's distinct places).
MEMO_LIMIT = 50_000
# Tables per active state (kinds of meeting, actions, presenters, windows); past it, all
# are forgotten. A safety net: a presenter made per call is never remembered (see decide_place).
MAX_TABLES = 4096
Entry = tuple[Decision, Any, Location]  # the decision, the presenter's answer, the place (held: ids stay its)
Table = dict[int, Entry]


class ReadParticipants(Sequence["ParticipantFields"]):
    """Participants whose addresses an adapter has read already, in order, and whose
    ids it knows to be within :data:`pdp.bounds.MAX_ID_LENGTH` (see
    :func:`pdp.wire.batch_addresses`): the decision path reads neither again.

    :raises ValueError: not one address per participant.
    """

    __slots__ = ("_people", "addresses")

    def __init__(self, people: Sequence[ParticipantFields], addresses: Sequence[str]) -> None:
        if len(people) != len(addresses):
            raise ValueError(f"{len(addresses)} addresses for {len(people)} participants")
        self._people, self.addresses = people, addresses

    def __len__(self) -> int:
        return len(self._people)

    def __getitem__(self, position: Any) -> Any:
        return self._people[position]

    def __iter__(self) -> Iterator[ParticipantFields]:
        return iter(self._people)


@dataclass(frozen=True, slots=True)
class Selectors:
    """What a policy's rules select meetings on, and the moments any rule's window opens or closes."""

    meeting_ids: frozenset[str]
    host_accounts: frozenset[str]
    tags: frozenset[str]
    moments: tuple[float, ...]  # sorted, finite

    @classmethod
    def of(cls, policy: Policy) -> Selectors:
        """Every rule's selectors (shadow rules' too: their matches are in the answer),
        whatever index list the rule is filed under. About 6 ms for 10,000 rules, once
        per policy: when it is activated (pdp.state), or by the first call of a state made otherwise."""
        meeting_ids: set[str] = set()
        host_accounts: set[str] = set()
        tags: set[str] = set()
        moments: set[float] = set()
        for rule in policy.rules:
            meeting_ids |= rule.meeting_ids
            host_accounts |= rule.host_accounts
            tags |= rule.tags
            moments.update(moment for moment in (rule.valid_from, rule.valid_until) if math.isfinite(moment))
        return cls(frozenset(meeting_ids), frozenset(host_accounts), frozenset(tags), tuple(sorted(moments)))

    def kind(self, meeting: Meeting, action: int) -> tuple[object, ...]:
        """What of ``meeting`` and ``action`` a decision can depend on. A value no
        rule selects becomes None (a meeting id or host account) or is left out (a
        tag): no rule's test nor index lookup can tell it from another such value."""
        meeting_id, host = meeting.meeting_id, meeting.host_account_id
        return (
            action,
            meeting_id if meeting_id in self.meeting_ids else None,
            host if host in self.host_accounts else None,
            self.tags.intersection(meeting.tags) if self.tags and meeting.tags else frozenset(),
        )

    def window(self, now: float) -> tuple[float, float]:
        """``[low, high)`` around ``now`` holding no rule boundary but ``low``: every
        ``valid_from <= t < valid_until`` test has one answer for all ``t`` in it."""
        moments = self.moments
        after = bisect.bisect_right(moments, now)
        return (moments[after - 1] if after else -math.inf, moments[after] if after < len(moments) else math.inf)


class BatchMemo:
    """The tables of one active state (see the module's docstring). Shared by the
    request threads without a lock: each dict operation is atomic, and two threads
    filling the same entry compute the same value."""

    __slots__ = ("_entries", "_selectors", "_tables")

    def __init__(self, selectors: Selectors | None = None) -> None:
        """``selectors``: the policy's, when the activation computed them (off the
        request path); otherwise the first call computes them."""
        self._selectors = selectors
        self._tables: dict[tuple[object, ...], tuple[float, float, Table]] = {}
        self._entries = 0

    @property
    def selectors(self) -> Selectors | None:
        """The policy's selectors, once computed (None before, for a state made without them)."""
        return self._selectors

    def table(self, policy: Policy, meeting: Meeting, action: int, now: float, present: Callable[..., Any]) -> Table:
        """The table for this kind of meeting, ``action``, presenter and ``now``.

        ``policy`` must be the active state's own (the memo lives on that state).
        """
        selectors = self._selectors
        if selectors is None:  # a state not made by PolicyHolder: once, on its first call
            selectors = self._selectors = Selectors.of(policy)
        if self._entries > MEMO_LIMIT or len(self._tables) > MAX_TABLES:  # at most one batch's places past it
            self._tables, self._entries = {}, 0
        key = (present, *selectors.kind(meeting, action))
        try:
            found = self._tables.get(key)
        except TypeError:  # an unhashable presenter: nothing is remembered for it
            return {}
        if found is not None and found[0] <= now < found[1]:
            return found[2]
        low, high = selectors.window(now)
        table: Table = {}
        self._tables[key] = (low, high, table)
        return table

    def remember(self, table: Table, location: Location, entry: Entry) -> None:
        """Keep ``entry`` for ``location`` in ``table``; once past :data:`MEMO_LIMIT`
        places, the next batch finds every table forgotten."""
        self._entries += 1
        table[id(location)] = entry


def decide_place(
    active: Active,
    location: Location,
    meeting: Meeting,
    action: int,
    now: float,
    present: Callable[[Decision, Location, Active], T],
    remember: bool = True,
) -> tuple[Decision, T, Location]:
    """:func:`decide_places` for one place: a Check, which the same tables serve, since
    its decision too depends on nothing but the kind of meeting, the action, the window
    and the place. ``remember=False``: neither read nor fill the memo (a presenter made
    for one call would fill a table per call). Never raises on valid input."""
    if remember:
        memo = active.batch_memo
        table = memo.table(active.policy, meeting, action, now, present)
        entry = table.get(id(location))
        if entry is not None:
            return cast(tuple[Decision, T, Location], entry)
    decision = active.policy.decide(location, action, meeting, now)
    answer = present(decision, location, active)
    if remember and type(answer) is bytes:
        memo.remember(table, location, (decision, answer, location))
    return decision, answer, location


def decide_places(
    active: Active,
    locations: Sequence[Location],
    meeting: Meeting,
    action: int,
    now: float,
    present: Callable[[Decision, Location, Active], T],
) -> list[tuple[Decision, T, Location]]:
    """``(decision, present(decision, location, active), location)`` for each of
    ``locations``, all for ``meeting``, ``action`` and ``now``: from ``active``'s memo,
    or decided and presented once per place. Never raises on valid input.

    Only answers that are bytes are remembered past the batch: any other value
    might refer to ``active`` (an :class:`~pdp.decisions.Outcome` does), and a
    cycle through the memo would keep a replaced state and its database alive
    until the cyclic collector ran.
    """
    memo = active.batch_memo
    table = memo.table(active.policy, meeting, action, now, present)
    entries: list[Entry | None] = list(map(table.get, map(id, locations)))
    if all(entries):  # every place known (an entry is a non-empty tuple)
        return cast(list[tuple[Decision, T, Location]], entries)
    batch_only: Table = {}
    for position, entry in enumerate(entries):
        if entry is None:
            location = locations[position]
            place = id(location)
            entry = table.get(place) or batch_only.get(place)  # someone at the same place, earlier in this batch
            if entry is None:
                decision = active.policy.decide(location, action, meeting, now)
                answer = present(decision, location, active)
                entry = (decision, answer, location)
                if type(answer) is bytes:
                    memo.remember(table, location, entry)
                else:
                    batch_only[place] = entry
            entries[position] = entry
    return cast(list[tuple[Decision, T, Location]], entries)  # every None was filled above
