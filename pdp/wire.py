"""Responses as bytes, encoded once per (decision, location) and reused.

A decision without shadow matches is one of a few precomputed objects (one per
rule, plus the defaults) and locations are interned, so the same response
bytes recur constantly; encoding them once per policy activation turns the
response side of Check into a dict lookup. Protobuf messages are sequences of
fields, so a CheckBatchResponse is the concatenation of framed results and
its two scalar fields (the order of fields on the wire does not matter).

Requests are read from their bytes the same way, in C where the answer is certain:
a batch's addresses (:func:`batch_addresses`), and a Check's meeting, kept as the
bytes it was sent as so that :class:`MeetingMemo` reads each meeting once
(:func:`check_parts`); any other request is parsed whole, as protobuf would.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from pdp._proto import admission_pb2 as pb
from pdp.bounds import MeetingFields, ParticipantFields, RequestError, checked_meeting
from pdp.model import Action, Decision, Location, Meeting
from pdp.state import Active

__all__ = [
    "MEETINGS",
    "MEETING_BYTES",
    "MeetingMemo",
    "batch_addresses",
    "check_parts",
    "check_response",
    "encode_batch",
    "encode_check",
    "encode_result",
    "varint",
]

# Distinct (decision, location) pairs kept per activation; a policy with many
# rules seen from many places refills after a clear, it never grows unbounded.
CACHE_LIMIT = 50_000
# Meetings remembered by their bytes (see MeetingMemo), and the largest remembered.
MEETINGS = 4096
MEETING_BYTES = 512
_RESULTS_TAG = b"\x0a"  # CheckBatchResponse.results: field 1, length-delimited


def check_response(decision: Decision, location: Location, active: Active) -> pb.CheckResponse:
    """The response message, built field by field (the uncached path)."""
    return pb.CheckResponse(
        verdict=decision.verdict,  # type: ignore[arg-type]  # IntEnum values equal the proto's
        rule_id=decision.rule_id,
        reason=decision.reason,
        legal_basis=decision.legal_basis,
        location=pb.Location(found=location.found, country=location.country, subdivisions=location.subdivisions),
        policy_version=active.policy.version,
        geoip_build=active.geo.build_epoch,
        shadow_rule_ids=decision.shadow_rule_ids,
    )


def varint(value: int) -> bytes:
    """Protobuf's base-128 encoding of a non-negative integer."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encoded(decision: Decision, location: Location, active: Active) -> tuple[bytes, bytes]:
    """(CheckResponse bytes, the same framed as one CheckBatchResponse result)."""
    if decision.shadow_rule_ids:  # a fresh object per call: not worth caching
        data = check_response(decision, location, active).SerializeToString()
        return data, _RESULTS_TAG + varint(len(data)) + data
    cache = active.encoded
    key = (id(decision), id(location))
    hit = cache.get(key)
    if hit is not None:
        return hit[0], hit[1]
    data = check_response(decision, location, active).SerializeToString()
    framed = _RESULTS_TAG + varint(len(data)) + data
    if len(cache) >= CACHE_LIMIT:
        cache.clear()
    # The entry holds the decision and location so that their ids stay theirs.
    cache[key] = (data, framed, decision, location)
    return data, framed


def encode_check(decision: Decision, location: Location, active: Active) -> bytes:
    """A serialized CheckResponse."""
    return _encoded(decision, location, active)[0]


def encode_result(decision: Decision, location: Location, active: Active) -> bytes:
    """One result of a CheckBatchResponse, framed (tag, length, CheckResponse bytes)."""
    return _encoded(decision, location, active)[1]


def encode_batch(results: Sequence[bytes], active: Active) -> bytes:
    """A serialized CheckBatchResponse from framed results, in order, then the versions."""
    parts = list(results)
    parts.append(
        pb.CheckBatchResponse(
            policy_version=active.policy.version, geoip_build=active.geo.build_epoch
        ).SerializeToString()
    )
    return b"".join(parts)


# --------------------------------------------------------------------------- reading requests


def _reading_types() -> tuple[Any, Any, Any]:
    """Three private message types (a pool of their own) that read requests' bytes
    with fewer Python objects: ``Raw`` takes each of a CheckBatchRequest's participants
    as bytes; ``Addresses`` reads participants laid end to end as one message, in which
    every participant's field 1 (``ip``) is one more element of a repeated string;
    ``CheckParts`` reads a CheckRequest with its meeting left as bytes (repeated, so
    that a meeting sent twice, which a parser merges, is seen), for the meeting memo."""
    kind = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="pdp/internal/request_reading.proto", package="pdp.internal")
    file.syntax = "proto3"
    raw = file.message_type.add(name="Raw")
    raw.field.add(name="participants", number=2, type=kind.TYPE_BYTES, label=kind.LABEL_REPEATED)
    addresses = file.message_type.add(name="Addresses")
    addresses.field.add(name="ip", number=1, type=kind.TYPE_STRING, label=kind.LABEL_REPEATED)
    # The same fields, checks and defaults: Participant holds strings only, no message of its own to copy.
    pb.Participant.DESCRIPTOR.CopyToProto(file.message_type.add())
    parts = file.message_type.add(name="CheckParts")
    parts.field.add(name="participant", number=1, type=kind.TYPE_MESSAGE, type_name=".pdp.internal.Participant",
                    label=kind.LABEL_OPTIONAL)  # fmt: skip
    parts.field.add(name="meeting", number=2, type=kind.TYPE_BYTES, label=kind.LABEL_REPEATED)
    parts.field.add(name="action", number=3, type=kind.TYPE_INT32, label=kind.LABEL_OPTIONAL)  # an open enum's varint
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    find = pool.FindMessageTypeByName
    return (
        message_factory.GetMessageClass(find("pdp.internal.Raw")),
        message_factory.GetMessageClass(find("pdp.internal.Addresses")),
        message_factory.GetMessageClass(find("pdp.internal.CheckParts")),
    )


_RAW, _ADDRESSES, _CHECK_PARTS = _reading_types()
_FIRST_BYTE = itemgetter(0)
_IP_TAG = b"\x0a"  # Participant.ip: field 1, length-delimited
_MEETING_TAG = b"\x12"  # CheckRequest.meeting: field 2, length-delimited


def batch_addresses(data: bytes, count: int, longest: int) -> list[str] | None:
    """The participants' addresses of ``data``, a CheckBatchRequest that protobuf has
    already parsed whole (so each participant in it is a valid Participant) and found
    ``count`` participants in, read in C; or None, and the caller reads the message.

    Only when the answer is certain: every participant starts with its address (as
    every serializer writes one), and the participants end to end hold ``count``
    addresses, so each holds exactly one, its own. And only when no participant is
    longer than ``longest`` bytes, so that none of its ids can be longer than
    ``longest`` characters: the caller need not read the ids to bound them.
    """
    people = list(_RAW.FromString(data).participants)
    if len(people) != count or not count or max(map(len, people)) > longest:
        return None
    try:
        if bytes(map(_FIRST_BYTE, people)) != _IP_TAG * count:
            return None
    except IndexError:  # an empty participant
        return None
    try:
        addresses = _ADDRESSES.FromString(b"".join(people)).ip
    except DecodeError:  # not from a request protobuf parsed whole: let the caller read it
        return None
    return list(addresses) if len(addresses) == count else None


def check_parts(data: bytes) -> tuple[ParticipantFields, bytes, int] | None:
    """A CheckRequest's participant, its meeting as the bytes it was sent as, and its
    action, read in C; or None, and the caller parses the request whole: ``data`` is not
    a CheckRequest, or its meeting is absent or sent more than once (a parser merges
    the copies). The meeting's bytes are not checked here: they are a valid Meeting only
    once ``pb.Meeting`` has parsed them."""
    try:
        parts = _CHECK_PARTS.FromString(data)
    except DecodeError:
        return None
    meetings = parts.meeting
    if len(meetings) != 1:
        return None
    return parts.participant, meetings[0], parts.action


class MeetingMemo:
    """Meetings by the bytes they were sent as, parsed and checked once: a node sees
    the same few meetings over and over, and reading a meeting's fields from a message
    (each read a new str) costs more in a loaded server than the decision itself.

    Only a meeting within its bounds is remembered, only one of at most
    :data:`MEETING_BYTES` bytes, and at most :data:`MEETINGS` of them (then all are
    forgotten): a caller sending a new meeting each time pays one parse more, never
    unbounded memory. Shared by the request threads without a lock: each dict
    operation is atomic, and two threads remembering one meeting store equal values.
    """

    __slots__ = ("_known",)

    def __init__(self) -> None:
        self._known: dict[bytes, Meeting] = {}

    def __len__(self) -> int:
        """Meetings remembered."""
        return len(self._known)

    def meeting(self, data: bytes) -> MeetingFields | None:
        """The meeting ``data`` holds: remembered, checked now, or, when out of bounds,
        the message itself (the decision path refuses it, naming the field); None
        when ``data`` is not a Meeting."""
        known = self._known.get(data)
        if known is not None:
            return known
        try:  # parsed where the request holds it: protobuf's nesting limit counts from the request
            message = pb.CheckRequest.FromString(_MEETING_TAG + varint(len(data)) + data).meeting
        except DecodeError:
            return None
        try:
            checked = checked_meeting(message, Action.JOIN)  # the action is the request's own to check
        except RequestError:
            return message
        if len(data) <= MEETING_BYTES:
            if len(self._known) >= MEETINGS:
                self._known.clear()
            self._known[data] = checked
        return checked
