"""A candidate snapshot in shadow: evaluated next to the active policy for every
decision, never changing an answer, counting what it would change.

``pdp serve --candidate-snapshot URL`` follows a second snapshot with the same
sources, signing keys and checks as the active one (a :class:`pdp.reload.Reloader`
on a holder of its own that never serves). The decision path hands each call's
decisions to :meth:`CandidateShadow.offer`, one deque append; a thread of its own
decides them again with the candidate, at the moment they were made, and counts
every flip by the rule it is owed to, the jurisdiction, the legal basis and the
direction, exactly as ``pdp snapshot impact`` does offline
(:mod:`pdp.impact.flips`). The counts describe one candidate: they start again
when another is loaded. They are read by ``GetStatus`` (``candidate``), by the
``pdp.candidate.flips`` metric, and the audit log writes the candidate's verdict
into each record (:meth:`CandidateShadow.annotate`). Each reader first decides
what is still queued, so it sees every decision made before it asked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from pdp.impact.flips import decider, flip
from pdp.model import Decision, Location, Meeting, Verdict
from pdp.rules import Policy

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation

    from pdp.state import Active, PolicyHolder

__all__ = ["CandidateShadow", "CandidateState", "FlipCount"]

log = logging.getLogger("pdp.candidate")


class MeetingFields(Protocol):
    @property
    def meeting_id(self) -> str: ...

    @property
    def host_account_id(self) -> str: ...

    @property
    def tags(self) -> Collection[str]: ...


class _Offered(NamedTuple):
    """One call's decisions, as the request path hands them over: references only."""

    time: float
    decisions: Sequence[Decision]
    locations: Sequence[Location]
    active: Active
    action: int
    meeting: MeetingFields


@dataclass(frozen=True, slots=True)
class FlipCount:
    """Would-be flips owed to one rule in one jurisdiction, in one direction."""

    rule_id: str
    jurisdiction: str
    legal_basis: str
    verdict: Verdict  # the answer given
    candidate_verdict: Verdict
    count: int


@dataclass(frozen=True, slots=True)
class CandidateState:
    """What GetStatus says about the candidate."""

    source: str
    version: int  # 0 while none is loaded
    sha256: str
    loaded_at: float  # Unix seconds; 0 while none is loaded
    last_error: str
    decisions: int
    flips: int
    dropped: int
    by_rule: tuple[FlipCount, ...]  # most flips first


class CandidateShadow:
    """Decides every offered decision again with the candidate in ``holder``."""

    def __init__(self, holder: PolicyHolder, queue_size: int = 100_000) -> None:
        self.holder = holder
        self.queue_size = queue_size
        self.dropped = 0
        self._pending: deque[_Offered] = deque()
        self._lock = threading.Lock()  # between the worker and readers; the request path never takes it
        self._policy: Policy | None = None
        self._loaded_at = 0.0
        self._decisions = 0
        self._counts: dict[tuple[str, str, str, Verdict, Verdict], int] = {}
        self._outside_seen: set[str] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pdp-candidate", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ request path

    def offer(
        self,
        decisions: Sequence[Decision],
        locations: Sequence[Location],
        active: Active,
        action: int,
        meeting: MeetingFields,
    ) -> None:
        """Queue one call's decisions for the candidate; never blocks."""
        if len(self._pending) >= self.queue_size:
            self.dropped += len(decisions)
            return
        # A deque append is one atomic step: no lock, no wake-up of the worker.
        self._pending.append(_Offered(time.time(), decisions, locations, active, action, meeting))

    # ------------------------------------------------------------------ the worker

    def _loop(self) -> None:
        while not self._stopping.wait(0.05):
            self.drain()

    def drain(self) -> None:
        """Decide everything queued so far."""
        with self._lock:
            pending = self._pending
            while pending:
                item = pending.popleft()
                try:
                    self._evaluate(item)
                except Exception:  # a bug here must never reach a request or stop the shadow
                    log.exception("candidate evaluation failed")

    def _current(self) -> Policy | None:
        candidate = self.holder.policy
        if candidate is not self._policy:
            self._policy, self._loaded_at = candidate, time.time()
            self._decisions, self._counts = 0, {}
            if candidate is not None:
                log.info("candidate version %d (%d rules) in shadow", candidate.version, len(candidate.rules))
        return candidate

    def _evaluate(self, item: _Offered) -> None:
        candidate = self._current()
        if candidate is None:
            return
        moment, decisions, locations, active, action, fields = item
        meeting = Meeting(fields.meeting_id, fields.host_account_id, frozenset(fields.tags))
        decided: dict[tuple[int, int], Decision] = {}  # a batch shares decisions and locations
        counts = self._counts
        for decision, location in zip(decisions, locations, strict=True):
            self._decisions += 1
            key = (id(decision), id(location))
            again = decided.get(key)
            if again is None:
                again = decided[key] = candidate.decide(location, action, meeting, moment)
            if again.verdict == decision.verdict:
                continue
            found = flip(
                location, decision.verdict, decider(active.policy, decision), again.verdict, decider(candidate, again)
            )
            assert found is not None
            bucket = (found.rule_id, found.jurisdiction, found.legal_basis, found.before, found.after)
            counts[bucket] = counts.get(bucket, 0) + 1
            for rule_id in set(found.outside) - self._outside_seen:
                self._outside_seen.add(rule_id)
                log.error("BOUNDARY: rule %s decided a participant outside its jurisdiction: a bug, report it", rule_id)

    # ------------------------------------------------------------------ readers

    def state(self) -> CandidateState:
        """The candidate and its counts, every decision made before the call included."""
        self.drain()
        with self._lock:
            policy, counts = self._current(), dict(self._counts)
            decisions, loaded_at = self._decisions, self._loaded_at
        status = self.holder.status
        ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0][0], item[0][1]))
        return CandidateState(
            source=status.source,
            version=policy.version if policy is not None else 0,
            sha256=policy.sha256 if policy is not None else "",
            loaded_at=loaded_at if policy is not None else 0.0,
            last_error=status.last_error,
            decisions=decisions,
            flips=sum(counts.values()),
            dropped=self.dropped,
            by_rule=tuple(FlipCount(*key, count) for key, count in ordered),
        )

    def annotate(self, location: Location, action: int, meeting: MeetingFields, moment: float) -> dict[str, Any]:
        """The candidate's verdict for one audit record (nothing while none is loaded)."""
        candidate = self.holder.policy
        if candidate is None:
            return {}
        model = Meeting(meeting.meeting_id, meeting.host_account_id, frozenset(meeting.tags))
        decision = candidate.decide(location, action, model, moment)
        return {
            "candidate_verdict": decision.verdict.name,
            "candidate_rule_id": decision.rule_id,
            "candidate_version": candidate.version,
        }

    def instrument(self, meter: Meter) -> None:
        """Export ``pdp.candidate.flips`` and ``pdp.candidate.decisions`` through ``meter``."""
        meter.create_observable_counter(
            "pdp.candidate.flips",
            callbacks=[self._observe_flips],
            description="decisions the candidate snapshot would answer otherwise, per rule, jurisdiction, verdict",
        )
        meter.create_observable_counter(
            "pdp.candidate.decisions",
            callbacks=[self._observe_decisions],
            description="decisions evaluated against the candidate snapshot",
        )

    def _observe_flips(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        state = self.state()
        for count in state.by_rule:
            attributes: dict[str, str | int] = {
                "rule_id": count.rule_id,
                "jurisdiction": count.jurisdiction,
                "verdict": count.verdict.name,
                "candidate_verdict": count.candidate_verdict.name,
                "candidate_version": state.version,
            }
            yield Observation(count.count, attributes)

    def _observe_decisions(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        state = self.state()
        if state.version:
            yield Observation(state.decisions, {"candidate_version": state.version})

    def close(self) -> None:
        """Decide what is queued, then stop the worker."""
        self._stopping.set()
        self._thread.join(timeout=10)
        self.drain()
