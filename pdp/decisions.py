"""The one decision path: request bounds, location, decision, and the one
observation of each call (telemetry, audit, tracing), for every protocol.

A protocol adapter (``pdp.servicer``'s AdmissionService today; Envoy's
``Authorization/Check`` and an AuthZEN HTTP handler the same way) turns its
request into plain values and calls :meth:`DecisionPath.check` or
:meth:`DecisionPath.check_batch` with its own :class:`Endpoint` and a
*presenter*: a function ``(Decision, Location, Active) -> T`` that builds the
adapter's answer (the gRPC adapter passes ``pdp.wire.encode_check``, which
returns cached response bytes; an adapter that wants a plain value passes
:class:`Outcome`). It maps the two errors raised here to its protocol:
:class:`NotReadyError` (no policy or database yet; gRPC UNAVAILABLE, HTTP 503)
and :class:`RequestError` (a field is missing or out of bounds; gRPC
INVALID_ARGUMENT, HTTP 400). Adapters never observe calls themselves.

The presenter is called inside the path, so the observed duration covers the
whole answer, and a batch calls it at most once per distinct location:
participants at one place in one meeting share one decision and one encoded
result, and answers that are bytes are remembered for later batches of the
same kind of meeting (:mod:`pdp.batch`). No value is allocated per call beyond
what the decision itself needs.

The request bounds the path applies are :mod:`pdp.bounds`, one function
each; an adapter that checks a field of its own before calling the path uses
the same functions. ``MeetingFields``, ``ParticipantFields`` and
``RequestError`` come from there and are part of this module's face.
"""

from __future__ import annotations

import contextlib
import operator
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from opentelemetry.trace import Span, use_span

from pdp.batch import ReadParticipants, decide_place, decide_places
from pdp.bounds import (
    MAX_ID_LENGTH,
    MeetingFields,
    ParticipantFields,
    RequestError,
    check_batch_size,
    check_participant,
    checked_meeting,
)
from pdp.errors import PdpError
from pdp.geo import InvalidAddressError
from pdp.model import Decision, Location, Verdict, verdict_label
from pdp.state import Active, PolicyHolder
from pdp.telemetry import Telemetry, backdated_span, server_span

if TYPE_CHECKING:
    from pdp.audit import AuditLog
    from pdp.candidate import CandidateShadow

__all__ = [
    "Batch",
    "DecisionPath",
    "Endpoint",
    "MeetingFields",
    "NotReadyError",
    "Outcome",
    "Participant",
    "ParticipantFields",
    "RequestError",
]

T = TypeVar("T")
Presenter = Callable[[Decision, Location, Active], T]
_VERDICT_NAMES = {Verdict.ALLOW: "ALLOW", Verdict.DENY: "DENY"}
_PARTICIPANT_FIELDS = operator.attrgetter("ip", "user_id", "account_id")
_DECISION, _ANSWER = operator.itemgetter(0), operator.itemgetter(1)  # of a batch entry


class NotReadyError(PdpError):
    """No policy and GeoIP database are active yet: retry shortly."""

    def __init__(self) -> None:
        super().__init__("no policy and GeoIP database loaded yet; retry shortly")


# --------------------------------------------------------------------------- what adapters pass


@dataclass(frozen=True, slots=True)
class Participant:
    """A participant for adapters whose request is not already one."""

    ip: str
    user_id: str = ""
    account_id: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The adapter method a call came in through; names its span and its
    ``rpc`` label in the duration metric (``label``, the method by default)."""

    system: str  # rpc.system: "grpc", "http"
    service: str
    method: str
    label: str = ""
    span_name: str = field(init=False, compare=False)
    attributes: dict[str, str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self.label or self.method)
        object.__setattr__(self, "span_name", f"{self.service}/{self.method}")
        attributes = {"rpc.system": self.system, "rpc.service": self.service, "rpc.method": self.method}
        object.__setattr__(self, "attributes", attributes)


# --------------------------------------------------------------------------- what the path returns


@dataclass(frozen=True, slots=True)
class Outcome:
    """One decision with the location and the state it was made with; also a
    presenter, for adapters that want exactly this."""

    decision: Decision
    location: Location
    active: Active


@dataclass(frozen=True, slots=True)
class Batch(Generic[T]):
    """A batch's answers, by participant: ``results[n]`` is the presenter's
    value for participant ``n``, decided as ``decisions[n]`` at ``locations[n]``
    (participants at one place share one object), all with ``active``."""

    results: list[T]
    decisions: list[Decision]
    locations: list[Location]
    active: Active


# --------------------------------------------------------------------------- the path


class DecisionPath:
    """Decides from the holder's active state and observes every call once.

    Telemetry, tracing, the audit log and a candidate in shadow are optional;
    without them a call is the bare decision path.
    """

    def __init__(
        self,
        holder: PolicyHolder,
        telemetry: Telemetry | None = None,
        audit: AuditLog | None = None,
        candidate: CandidateShadow | None = None,
    ) -> None:
        self.holder = holder
        self._telemetry = telemetry
        self._tracer = telemetry.tracer if telemetry is not None else None
        self._audit = audit
        self.candidate = candidate  # evaluates every decision again, off the request path
        self._observed = telemetry is not None or audit is not None or candidate is not None

    # ------------------------------------------------------------------ one participant

    def check(
        self,
        ip: str,
        user_id: str,
        account_id: str,
        meeting: MeetingFields,
        action: int,
        *,
        endpoint: Endpoint,
        present: Presenter[T],
        active: Active | None = None,
        remember: bool = True,
    ) -> T:
        """Decide for one participant; returns ``present(decision, location, active)``.

        ``active``: the state to decide with, for an adapter that answers
        several calls as one at one policy version (it reads ``holder.active``
        once); by default the holder's current one. ``remember=False`` for a
        presenter made for this call alone (its answer depends on more than the
        decision, the place and the state): its answers stay out of the state's
        memo (see :func:`pdp.batch.decide_place`).

        :raises NotReadyError: no policy and database active yet.
        :raises RequestError: a field is missing or out of bounds, or ``ip`` is not an address.
        """
        if not self._observed:
            return self._decide(ip, user_id, account_id, meeting, action, present, active, remember)[1]
        if self._tracer is None:
            started = time.perf_counter()
            try:  # here, not in a helper both branches call: a frame costs in a loaded server
                decision, result, location, active = self._decide(
                    ip, user_id, account_id, meeting, action, present, active, remember
                )
            except Exception as error:
                self._observe_error(endpoint, started, error)
                raise
        else:
            with server_span(self._tracer, endpoint.span_name) as span:
                started = time.perf_counter()
                try:
                    decision, result, location, active = self._decide(
                        ip, user_id, account_id, meeting, action, present, active, remember
                    )
                except Exception as error:
                    self._observe_error(endpoint, started, error)
                    raise
                verdict = _VERDICT_NAMES[decision.verdict]
                span.set_attributes(_span_attributes(endpoint, active, verdict, {"pdp.rule_id": decision.rule_id}))
        self._record_one(endpoint, started, decision, location, active, action, meeting, ip, user_id, account_id)
        return result

    def _decide(
        self,
        ip: str,
        user_id: str,
        account_id: str,
        meeting: MeetingFields,
        action: int,
        present: Presenter[T],
        active: Active | None,
        remember: bool,
    ) -> tuple[Decision, T, Location, Active]:
        if active is None:
            active = self.holder.active  # read once: one consistent policy and database
            if active is None:
                raise NotReadyError
        checked = checked_meeting(meeting, action)
        if len(user_id) > MAX_ID_LENGTH or len(account_id) > MAX_ID_LENGTH:
            check_participant(user_id, account_id, "participant")
        try:
            location = active.geo.locate(ip)
        except InvalidAddressError as error:
            raise RequestError("participant.ip", str(error)) from None
        decision, answer, _ = decide_place(active, location, checked, action, time.time(), present, remember)
        return decision, answer, location, active

    # ------------------------------------------------------------------ many participants, one meeting

    def check_batch(
        self,
        participants: Sequence[ParticipantFields],
        meeting: MeetingFields,
        action: int,
        *,
        limit: int,
        endpoint: Endpoint,
        present: Presenter[T],
        observe_refusal: bool = True,
    ) -> Batch[T]:
        """Decide for each participant of one meeting, at one moment;
        ``present`` is called once per distinct location. ``observe_refusal=False``:
        nothing is observed of a batch refused or not ready (no error timed, no
        span), for an adapter that then decides its items one by one, each observed.

        :raises NotReadyError: no policy and database active yet.
        :raises RequestError: not 1 to ``limit`` participants, or a field is
            missing or out of bounds (the first one, by position).
        """
        if not self._observed:
            return self._decide_batch(participants, meeting, action, limit, present)
        # A try that may be refused has its span begun once it has decided, dated back to its start.
        tried = not observe_refusal and self._tracer is not None
        began = time.time_ns() if tried else 0
        with contextlib.nullcontext() if tried else self._span(endpoint) as span:
            started = time.perf_counter()
            try:
                batch = self._decide_batch(participants, meeting, action, limit, present)
            except Exception as error:
                if not observe_refusal and isinstance(error, (RequestError, NotReadyError)):
                    raise  # the caller decides the items one by one, each observed
                # A failure all the same; a try gets its span now, dated back, for _observe_error to mark.
                failed = backdated_span(self._tracer, endpoint.span_name, began) if tried else None
                with contextlib.nullcontext() if failed is None else use_span(failed, end_on_exit=True):
                    self._observe_error(endpoint, started, error)
                raise
            verdict = verdict_label(decision.verdict for decision in batch.decisions)
            attributes = _span_attributes(endpoint, batch.active, verdict, {"pdp.participants": len(batch.decisions)})
            if span is not None:
                span.set_attributes(attributes)
        if tried:
            backdated_span(self._tracer, endpoint.span_name, began, attributes).end()
        self._record(endpoint, started, verdict, batch, action, meeting, participants)
        return batch

    def _decide_batch(
        self,
        participants: Sequence[ParticipantFields],
        meeting: MeetingFields,
        action: int,
        limit: int,
        present: Presenter[T],
    ) -> Batch[T]:
        check_batch_size(len(participants), limit)
        active = self.holder.active  # read once: one consistent policy and database
        if active is None:
            raise NotReadyError
        checked = checked_meeting(meeting, action)
        if type(participants) is ReadParticipants:  # the adapter read the addresses and bounded the ids
            addresses: Sequence[str] = participants.addresses
        else:  # one pass over the participants for their addresses and the ids' bounds
            addresses, user_ids, account_ids = zip(*map(_PARTICIPANT_FIELDS, participants), strict=True)
            if max(map(len, user_ids)) > MAX_ID_LENGTH or max(map(len, account_ids)) > MAX_ID_LENGTH:
                for position, participant in enumerate(participants):
                    check_participant(participant.user_id, participant.account_id, f"participants[{position}]")
        try:
            locations = active.geo.locate_many(addresses)
        except InvalidAddressError as error:
            raise RequestError(f"participants[{error.position}].ip", str(error)) from None
        # One meeting, one action, one moment: the decision depends on the place
        # alone, and places are interned; the memo keeps them per kind of meeting.
        entries = decide_places(active, locations, checked, action, time.time(), present)
        return Batch(list(map(_ANSWER, entries)), list(map(_DECISION, entries)), locations, active)

    # ------------------------------------------------------------------ observation

    def _span(self, endpoint: Endpoint) -> AbstractContextManager[Span | None]:
        if self._tracer is None:
            return contextlib.nullcontext()
        return server_span(self._tracer, endpoint.span_name)

    def _record(
        self,
        endpoint: Endpoint,
        started: float,
        verdict: str,
        batch: Batch[T],
        action: int,
        meeting: MeetingFields,
        who: Sequence[ParticipantFields],
    ) -> None:
        """The one observation of a call that decided: its duration and
        decisions to telemetry, each decision (of ``who[n]``) to the audit log,
        all of them to the candidate in shadow."""
        active = batch.active
        if self._telemetry is not None:
            seconds = time.perf_counter() - started
            self._telemetry.observe(endpoint.label, seconds, verdict, batch.decisions, batch.locations, active)
        if self._audit is not None:
            record = self._audit.record
            for decision, location, person in zip(batch.decisions, batch.locations, who, strict=True):
                record(decision, location, active, action, meeting, person.ip, person.user_id, person.account_id)
        if self.candidate is not None:
            self.candidate.offer(batch.decisions, batch.locations, active, action, meeting)

    def _record_one(
        self,
        endpoint: Endpoint,
        started: float,
        decision: Decision,
        location: Location,
        active: Active,
        action: int,
        meeting: MeetingFields,
        ip: str,
        user_id: str,
        account_id: str,
    ) -> None:
        """:meth:`_record` for one decision, without the batch's lists and participant objects."""
        if self._telemetry is not None:
            seconds = time.perf_counter() - started
            verdict = _VERDICT_NAMES[decision.verdict]
            self._telemetry.observe(endpoint.label, seconds, verdict, (decision,), (location,), active)
        if self._audit is not None:
            self._audit.record(decision, location, active, action, meeting, ip, user_id, account_id)
        if self.candidate is not None:
            self.candidate.offer((decision,), (location,), active, action, meeting)

    def refused(self, endpoint: Endpoint, started: float) -> None:
        """An adapter refused a request before it reached this path (an attribute
        it could not map, a body that is not its protocol): timed as an error,
        as a refusal inside the path is, so that no refused request goes uncounted."""
        self._observe_error(endpoint, started)

    def _observe_error(self, endpoint: Endpoint, started: float, error: Exception | None = None) -> None:
        if self._telemetry is not None:
            self._telemetry.observe_error(endpoint.label, time.perf_counter() - started, error)


def _span_attributes(
    endpoint: Endpoint, active: Active, verdict: str, extra: dict[str, str | int]
) -> dict[str, str | int]:
    """What a span carries; never an address or an id of a person."""
    return {
        **endpoint.attributes,
        "pdp.policy_version": active.policy.version,
        "pdp.geoip_build": active.geo.build_epoch,
        "pdp.verdict": verdict,
        **extra,
    }
