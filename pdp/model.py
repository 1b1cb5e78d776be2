"""Value types shared by the rules engine, the GeoIP resolver and the server.

They mirror the wire messages but carry no protobuf: ``rules`` and ``geo`` are
usable and testable without gRPC.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field


class Action(enum.IntFlag):
    """What a participant asks to do. Values equal the proto enum's, and are bits
    so that a rule's set of actions is one integer mask."""

    JOIN = 1
    HOST = 2


class Verdict(enum.IntEnum):
    """The answer; values equal the proto enum's."""

    ALLOW = 1
    DENY = 2


def verdict_label(verdicts: Iterable[Verdict]) -> str:
    """ALLOW or DENY when all agree (always, for one decision), else MIXED."""
    seen = set(verdicts)
    return next(iter(seen)).name if len(seen) == 1 else "MIXED"


@dataclass(frozen=True, slots=True)
class Location:
    """Where an address was geolocated.

    ``country`` is ISO 3166-1 alpha-2 (empty when unknown); ``subdivisions`` are
    ISO 3166-2 codes such as ``US-CA``, most general first.
    """

    country: str = ""
    subdivisions: tuple[str, ...] = ()
    # The codes a rule's jurisdiction is matched against, derived once here
    # because a location lives in the cache and is matched on every call.
    codes: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "codes", (self.country, *self.subdivisions) if self.country else ())

    @property
    def found(self) -> bool:
        """True when the address has a country."""
        return bool(self.country)


UNKNOWN_LOCATION = Location()


@dataclass(frozen=True, slots=True)
class Meeting:
    """The meeting a participant asks to join or host."""

    meeting_id: str
    host_account_id: str = ""
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of evaluating a policy for one participant.

    ``rule_id`` is empty when no enforced rule matched (the policy default
    applied). ``shadow_rule_ids`` lists matching shadow-mode rules, in file order.
    """

    verdict: Verdict
    rule_id: str = ""
    reason: str = ""
    legal_basis: str = ""
    shadow_rule_ids: tuple[str, ...] = ()
