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
whole answer, and a batch calls it once per distinct location: participants
at one place in one meeting share one decision and one encoded result. No
value is allocated per call beyond what the decision itself needs.

Request bounds are one function each (:func:`require`, :func:`check_action`,
:func:`check_length`, :func:`check_tag_count`, :func:`check_tag_lengths`,
:func:`check_batch_size`); adapters that must refuse a request before it
reaches the path use the same functions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from opentelemetry.trace import Span, SpanKind

from pdp.errors import PdpError
from pdp.geo import InvalidAddressError
from pdp.model import Action, Decision, Location, Meeting, Verdict, verdict_label
from pdp.state import Active, PolicyHolder

if TYPE_CHECKING:
    from pdp.audit import AuditLog
    from pdp.candidate import CandidateShadow
    from pdp.telemetry import Telemetry

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_TAGS",
    "MAX_TAG_LENGTH",
    "Batch",
    "DecisionPath",
    "Endpoint",
    "MeetingFields",
    "NotReadyError",
    "Outcome",
    "ParticipantFields",
    "RequestError",
    "check_action",
    "check_batch_size",
    "check_length",
    "check_tag_count",
    "check_tag_lengths",
    "require",
]

# Bounds on what one request may carry: ids and tags are labels, never documents.
MAX_ID_LENGTH = 256
MAX_TAGS = 64
MAX_TAG_LENGTH = 128

T = TypeVar("T")
Presenter = Callable[[Decision, Location, Active], T]
_VALID_ACTIONS = frozenset((int(Action.JOIN), int(Action.HOST)))
_VERDICT_NAMES = {Verdict.ALLOW: "ALLOW", Verdict.DENY: "DENY"}


class NotReadyError(PdpError):
    """No policy and GeoIP database are active yet: retry shortly."""

    def __init__(self) -> None:
        super().__init__("no policy and GeoIP database loaded yet; retry shortly")


class RequestError(PdpError):
    """A request field is missing or out of bounds; ``field`` is its path,
    like ``meeting.meeting_id`` or ``participants[3].ip``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --------------------------------------------------------------------------- what adapters pass


class ParticipantFields(Protocol):
    """A participant as a request carries it (``pb.Participant`` is one)."""

    @property
    def ip(self) -> str: ...

    @property
    def user_id(self) -> str: ...

    @property
    def account_id(self) -> str: ...


class MeetingFields(Protocol):
    """A meeting as a request carries it (``pb.Meeting`` and
    :class:`pdp.model.Meeting` are both one)."""

    @property
    def meeting_id(self) -> str: ...

    @property
    def host_account_id(self) -> str: ...

    @property
    def tags(self) -> Collection[str]: ...


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


# --------------------------------------------------------------------------- request bounds


def require(value: str, field: str) -> None:
    """:raises RequestError: ``value`` is empty."""
    if not value:
        raise RequestError(field, "required")


def check_action(action: int) -> None:
    """:raises RequestError: ``action`` is neither JOIN nor HOST."""
    if action not in _VALID_ACTIONS:
        raise RequestError("action", f"{action} is not ACTION_JOIN (1) or ACTION_HOST (2)")


def check_length(value: str, field: str) -> None:
    """:raises RequestError: ``value`` is longer than :data:`MAX_ID_LENGTH`."""
    if len(value) > MAX_ID_LENGTH:
        raise RequestError(field, f"longer than {MAX_ID_LENGTH} characters")


def check_tag_count(tags: Collection[str], field: str = "meeting.tags") -> None:
    """:raises RequestError: more than :data:`MAX_TAGS` tags."""
    if len(tags) > MAX_TAGS:
        raise RequestError(field, f"{len(tags)} given, at most {MAX_TAGS} accepted")


def check_tag_lengths(tags: Collection[str], field: str = "meeting.tags") -> None:
    """:raises RequestError: a tag is longer than :data:`MAX_TAG_LENGTH`."""
    if any(len(tag) > MAX_TAG_LENGTH for tag in tags):
        raise RequestError(field, f"a tag longer than {MAX_TAG_LENGTH} characters")


def check_batch_size(count: int, limit: int, field: str = "participants") -> None:
    """:raises RequestError: not between 1 and ``limit`` participants."""
    if not 1 <= count <= limit:
        raise RequestError(field, f"{count} given, between 1 and {limit} accepted")


def _meeting(meeting: MeetingFields, action: int) -> Meeting:
    """The checked meeting as a model value.

    :raises RequestError: the first bound the meeting or the action breaks.
    """
    meeting_id, host_account_id, tags = meeting.meeting_id, meeting.host_account_id, meeting.tags
    # One expression for the common case; the bound functions name a problem.
    if not (
        meeting_id
        and action in _VALID_ACTIONS
        and len(meeting_id) <= MAX_ID_LENGTH
        and len(host_account_id) <= MAX_ID_LENGTH
        and len(tags) <= MAX_TAGS
        and (not tags or max(map(len, tags)) <= MAX_TAG_LENGTH)
    ):
        _refuse_meeting(meeting_id, host_account_id, tags, action)
    if isinstance(meeting, Meeting):
        return meeting
    return Meeting(meeting_id, host_account_id, frozenset(tags))


def _refuse_meeting(meeting_id: str, host_account_id: str, tags: Collection[str], action: int) -> None:
    require(meeting_id, "meeting.meeting_id")
    check_action(action)
    check_length(meeting_id, "meeting.meeting_id")
    check_length(host_account_id, "meeting.host_account_id")
    check_tag_count(tags)
    check_tag_lengths(tags)


def _check_participant(user_id: str, account_id: str, field: str) -> None:
    check_length(user_id, f"{field}.user_id")
    check_length(account_id, f"{field}.account_id")


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

    def _active(self) -> Active:
        active = self.holder.active
        if active is None:
            raise NotReadyError
        return active

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
    ) -> T:
        """Decide for one participant; returns ``present(decision, location, active)``.

        :raises NotReadyError: no policy and database active yet.
        :raises RequestError: a field is missing or out of bounds, or ``ip`` is not an address.
        """
        if not self._observed:
            return self._decide(ip, user_id, account_id, meeting, action, present)
        with self._span(endpoint) as span:
            started = time.perf_counter()
            try:
                outcome = self._decide(ip, user_id, account_id, meeting, action, Outcome)
                result = present(outcome.decision, outcome.location, outcome.active)
            except Exception:
                self._observe_error(endpoint, started)
                raise
            decision, location, active = outcome.decision, outcome.location, outcome.active
            verdict = _VERDICT_NAMES[decision.verdict]
            if span is not None:
                span.set_attributes(
                    {**_span_attributes(endpoint, active), "pdp.verdict": verdict, "pdp.rule_id": decision.rule_id}
                )
        if self._telemetry is not None:
            seconds = time.perf_counter() - started
            self._telemetry.observe(endpoint.label, seconds, verdict, (decision,), (location,), active)
        if self._audit is not None:
            self._audit.record(decision, location, active, action, meeting, ip, user_id, account_id)
        if self.candidate is not None:
            self.candidate.offer((decision,), (location,), active, action, meeting)
        return result

    def _decide(
        self, ip: str, user_id: str, account_id: str, meeting: MeetingFields, action: int, present: Presenter[T]
    ) -> T:
        active = self._active()
        checked = _meeting(meeting, action)
        if len(user_id) > MAX_ID_LENGTH or len(account_id) > MAX_ID_LENGTH:
            _check_participant(user_id, account_id, "participant")
        try:
            location = active.geo.locate(ip)
        except InvalidAddressError as error:
            raise RequestError("participant.ip", str(error)) from None
        return present(active.policy.decide(location, action, checked, time.time()), location, active)

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
    ) -> Batch[T]:
        """Decide for each participant of one meeting, at one moment;
        ``present`` is called once per distinct location.

        :raises NotReadyError: no policy and database active yet.
        :raises RequestError: not 1 to ``limit`` participants, or a field is
            missing or out of bounds (the first one, by position).
        """
        if not self._observed:
            return self._decide_batch(participants, meeting, action, limit, present)
        with self._span(endpoint) as span:
            started = time.perf_counter()
            try:
                batch = self._decide_batch(participants, meeting, action, limit, present)
            except Exception:
                self._observe_error(endpoint, started)
                raise
            verdict = verdict_label(decision.verdict for decision in batch.decisions)
            if span is not None:
                span.set_attributes(
                    {**_span_attributes(endpoint, batch.active), "pdp.verdict": verdict,
                     "pdp.participants": len(batch.decisions)}
                )  # fmt: skip
        if self._telemetry is not None:
            seconds = time.perf_counter() - started
            self._telemetry.observe(endpoint.label, seconds, verdict, batch.decisions, batch.locations, batch.active)
        if self._audit is not None:
            record, active = self._audit.record, batch.active
            for decision, location, who in zip(batch.decisions, batch.locations, participants, strict=True):
                record(decision, location, active, action, meeting, who.ip, who.user_id, who.account_id)
        if self.candidate is not None:
            self.candidate.offer(batch.decisions, batch.locations, batch.active, action, meeting)
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
        active = self._active()
        checked = _meeting(meeting, action)
        for position, participant in enumerate(participants):
            if len(participant.user_id) > MAX_ID_LENGTH or len(participant.account_id) > MAX_ID_LENGTH:
                _check_participant(participant.user_id, participant.account_id, f"participants[{position}]")
        try:
            locations = active.geo.locate_many([participant.ip for participant in participants])
        except InvalidAddressError as error:
            raise RequestError(f"participants[{error.position}].ip", str(error)) from None
        decide, now = active.policy.decide, time.time()
        decisions: list[Decision] = []
        results: list[T] = []
        # One meeting, one action, one moment: the decision depends on the
        # location alone, and locations are interned, so decide once per place.
        by_location: dict[int, tuple[Decision, T]] = {}
        for location in locations:
            known = by_location.get(id(location))
            if known is None:
                decision = decide(location, action, checked, now)
                known = by_location[id(location)] = (decision, present(decision, location, active))
            decisions.append(known[0])
            results.append(known[1])
        return Batch(results, decisions, locations, active)

    # ------------------------------------------------------------------ observation

    def _span(self, endpoint: Endpoint) -> AbstractContextManager[Span | None]:
        if self._tracer is None:
            return contextlib.nullcontext()
        return self._tracer.start_as_current_span(endpoint.span_name, kind=SpanKind.SERVER)

    def _observe_error(self, endpoint: Endpoint, started: float) -> None:
        if self._telemetry is not None:
            self._telemetry.observe_error(endpoint.label, time.perf_counter() - started)


def _span_attributes(endpoint: Endpoint, active: Active) -> dict[str, str | int]:
    """Attributes every span carries; never an address or an id of a person."""
    return {
        **endpoint.attributes,
        "pdp.policy_version": active.policy.version,
        "pdp.geoip_build": active.geo.build_epoch,
    }
