"""What one request may carry: the fields adapters hand to the decision path,
one function per bound, and :class:`RequestError`, which names the field.

Shared by every protocol adapter: fields an adapter parses itself (an Envoy
header, an AuthZEN property) are checked with the same functions the path
uses, so a bound is the same whatever the protocol.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol, cast

from pdp.errors import PdpError
from pdp.model import Action, Meeting

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_TAGS",
    "MAX_TAG_LENGTH",
    "MeetingFields",
    "ParticipantFields",
    "RequestError",
    "check_action",
    "check_batch_size",
    "check_length",
    "check_participant",
    "check_tag_count",
    "check_tag_lengths",
    "checked_meeting",
    "require",
]

# Bounds on what one request may carry: ids and tags are labels, never documents.
MAX_ID_LENGTH = 256
MAX_TAGS = 64
MAX_TAG_LENGTH = 128
_VALID_ACTIONS = frozenset((int(Action.JOIN), int(Action.HOST)))


class RequestError(PdpError):
    """A request field is missing or out of bounds; ``field`` is its path,
    like ``meeting.meeting_id`` or ``participants[3].ip``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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


def checked_meeting(meeting: MeetingFields, action: int) -> Meeting:
    """The checked meeting as a model value.

    :raises RequestError: the first bound the meeting or the action breaks.
    """
    model = isinstance(meeting, Meeting)  # as pdp.wire.MeetingMemo hands them: checked again, nothing made
    meeting_id, host_account_id, given = meeting.meeting_id, meeting.host_account_id, meeting.tags
    count = len(given)
    # A protobuf field makes a new str each time it is read: read the tags once,
    # into the set the decision needs, and bound their lengths there.
    tags = given if model else frozenset(given) if count <= MAX_TAGS else frozenset()
    # One expression for the common case, in this frame (a call costs in a loaded
    # server); the bound functions name a problem.
    if not (
        meeting_id
        and action in _VALID_ACTIONS
        and len(meeting_id) <= MAX_ID_LENGTH
        and len(host_account_id) <= MAX_ID_LENGTH
        and count <= MAX_TAGS
        and (not tags or max(map(len, tags)) <= MAX_TAG_LENGTH)
    ):
        _refuse_meeting(meeting_id, host_account_id, given, action)
    if model:
        return cast(Meeting, meeting)
    made = _new(Meeting)  # what Meeting(...) makes, without the frozen dataclass's slower __init__
    _set_meeting_id(made, meeting_id)
    _set_host_account_id(made, host_account_id)
    _set_tags(made, tags)
    return made


_new = object.__new__
# The slots' own setters: a frozen dataclass refuses setattr, its slots do not.
_set_meeting_id = Meeting.meeting_id.__set__  # type: ignore[attr-defined,misc]
_set_host_account_id = Meeting.host_account_id.__set__  # type: ignore[attr-defined,misc]
_set_tags = Meeting.tags.__set__  # type: ignore[attr-defined,misc]


def _refuse_meeting(meeting_id: str, host_account_id: str, tags: Collection[str], action: int) -> None:
    """Raise for the first bound broken, in the order the fields are documented."""
    require(meeting_id, "meeting.meeting_id")
    check_action(action)
    check_length(meeting_id, "meeting.meeting_id")
    check_length(host_account_id, "meeting.host_account_id")
    check_tag_count(tags)
    check_tag_lengths(tags)


def check_participant(user_id: str, account_id: str, field: str) -> None:
    """:raises RequestError: ``user_id`` or ``account_id`` (of ``field``) is too long."""
    check_length(user_id, f"{field}.user_id")
    check_length(account_id, f"{field}.account_id")
