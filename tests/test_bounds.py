"""The checked meeting the decision path builds per call is the model value, whatever it came from."""

from __future__ import annotations

import dataclasses

import pytest

from pdp._proto import admission_pb2 as pb
from pdp.bounds import MAX_TAGS, RequestError, checked_meeting
from pdp.model import Action, Meeting


def test_a_protobuf_meeting_becomes_the_equal_frozen_model_value() -> None:
    message = pb.Meeting(meeting_id="m-1", host_account_id="acct", tags=["memorial", "vip", "memorial"])
    checked = checked_meeting(message, int(Action.JOIN))
    expected = Meeting("m-1", "acct", frozenset({"memorial", "vip"}))
    assert type(checked) is Meeting
    assert checked == expected
    assert hash(checked) == hash(expected)
    assert repr(checked) == repr(expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
        checked.tags = frozenset()  # type: ignore[misc]


def test_a_model_meeting_is_checked_and_passed_through() -> None:
    meeting = Meeting("m-1", "", frozenset({"memorial"}))
    assert checked_meeting(meeting, int(Action.HOST)) is meeting
    with pytest.raises(RequestError, match=r"meeting\.tags: 65 given"):
        checked_meeting(Meeting("m-1", "", frozenset(f"t{n}" for n in range(MAX_TAGS + 1))), int(Action.JOIN))


def test_the_tag_count_is_of_tags_as_sent_not_distinct_ones() -> None:
    with pytest.raises(RequestError, match=rf"meeting\.tags: {MAX_TAGS + 1} given, at most {MAX_TAGS}"):
        checked_meeting(pb.Meeting(meeting_id="m", tags=["t"] * (MAX_TAGS + 1)), int(Action.JOIN))
    assert checked_meeting(pb.Meeting(meeting_id="m", tags=["t"] * MAX_TAGS), int(Action.JOIN)).tags == {"t"}
