"""AuthZEN request bodies to the decision path's values.

A subject of type ``participant`` (``id`` is the user id, ``properties.ip``
the address, ``properties.account_id`` optional), a resource of type
``meeting`` (``id``, ``properties.tags``, ``properties.host_account_id``) and
an action named ``join`` or ``host`` (Authorization API 1.0, section 5).

Only shapes are checked here: JSON that is UTF-8 and one object with unique
member names (section 11.5, I-JSON), each entity an object, each member used
a string (or, for tags, an array of strings). Bounds on ids, tags, addresses
and batch sizes are the decision path's own (:mod:`pdp.decisions`); its
:class:`~pdp.decisions.RequestError` names fields as gRPC does, and
:meth:`Evaluation.field` renames them as the request spelled them.
Unknown members are ignored anywhere (section 10.1.1); a member whose value
is JSON ``null`` counts as absent (section 11.5 asks senders to omit them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pdp.bounds import RequestError, check_batch_size
from pdp.errors import PdpError
from pdp.model import Action

__all__ = [
    "ACTIONS",
    "RESOURCE_TYPE",
    "SEMANTICS",
    "SUBJECT_TYPE",
    "BadRequestError",
    "Evaluation",
    "Evaluations",
    "Resource",
    "parse_body",
    "parse_evaluation",
    "parse_evaluations",
]

SUBJECT_TYPE = "participant"
RESOURCE_TYPE = "meeting"
ACTIONS = {"join": int(Action.JOIN), "host": int(Action.HOST)}
# Section 7.1.2: execute_all is the default.
SEMANTICS = ("execute_all", "deny_on_first_deny", "permit_on_first_permit")
_ENTITIES = ("subject", "action", "resource")

# The decision path's field names, by the AuthZEN entity they belong to.
_RENAMED = {
    "participant.ip": ("subject", "subject.properties.ip"),
    "participant.user_id": ("subject", "subject.id"),
    "participant.account_id": ("subject", "subject.properties.account_id"),
    "meeting.meeting_id": ("resource", "resource.id"),
    "meeting.host_account_id": ("resource", "resource.properties.host_account_id"),
    "meeting.tags": ("resource", "resource.properties.tags"),
    "action": ("action", "action.name"),
}


class BadRequestError(PdpError):
    """A request is not what AuthZEN or pdp's mapping of it asks for: HTTP 400.
    ``field`` is the member's path as the request spelled it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Resource:
    """A meeting as the decision path takes it (a :class:`~pdp.decisions.MeetingFields`)."""

    meeting_id: str
    host_account_id: str
    tags: tuple[str, ...]

    @property
    def key(self) -> tuple[str, str, frozenset[str]]:
        """Equal for resources that are one meeting to the rules."""
        return self.meeting_id, self.host_account_id, frozenset(self.tags)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One participant, meeting and action; ``at`` maps each entity to the
    prefix its members are named with (``"evaluations[2]."`` for an entity an
    item carried, ``""`` for a top-level one)."""

    ip: str
    user_id: str
    account_id: str
    resource: Resource
    action: int
    at: Mapping[str, str]

    def field(self, error: RequestError) -> BadRequestError:
        """The decision path's refusal, named as this request spelled the field."""
        entity, name = _RENAMED.get(error.field, ("", error.field))
        return BadRequestError(self.at.get(entity, "") + name, error.message)


@dataclass(frozen=True, slots=True)
class Evaluations:
    """An Access Evaluations request: one result per item, in order."""

    items: list[Evaluation | BadRequestError]  # an item that cannot be decided is answered false
    semantic: str


# --------------------------------------------------------------------------- JSON


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose member names are unique (I-JSON 2.3): a name given twice
    is refused, so pdp never reads a different value than a proxy in front of it."""
    members = dict(pairs)
    if len(members) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"member {name!r} given twice")
            seen.add(name)
    return members


def parse_body(body: bytes) -> dict[str, Any]:
    """The request body as one JSON object.

    :raises BadRequestError: empty, not UTF-8, not JSON, nested too deeply, a member
        name twice in one object, or not an object.
    """
    if not body.strip():
        raise BadRequestError("request body", "empty: send one JSON object")
    try:
        value = json.loads(body.decode("utf-8"), object_pairs_hook=_unique)
    except UnicodeDecodeError:
        raise BadRequestError("request body", "not UTF-8") from None
    except RecursionError:
        raise BadRequestError("request body", "nested too deeply") from None
    except ValueError as error:  # json.JSONDecodeError is one
        raise BadRequestError("request body", f"not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise BadRequestError("request body", f"must be a JSON object, not {_kind(value)}")
    return value


def _kind(value: object) -> str:
    """How JSON calls the type of ``value``, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else "null"


def _object(value: object, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequestError(field, "required" if value is None else f"must be an object, not {_kind(value)}")
    return value


def _optional_object(value: object, field: str) -> dict[str, Any]:
    return {} if value is None else _object(value, field)


def _string(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise BadRequestError(field, "required" if value is None else f"must be a string, not {_kind(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequestError(field, "holds an unpaired surrogate (not Unicode text)") from None
    return value


def _optional_string(value: object, field: str) -> str:
    return "" if value is None else _string(value, field)


def _tags(value: object, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadRequestError(field, f"must be an array of strings, not {_kind(value)}")
    return tuple(_string(tag, f"{field}[{position}]") for position, tag in enumerate(value))


# --------------------------------------------------------------------------- entities


def _subject(value: object, at: str) -> tuple[str, str, str]:
    """(ip, user_id, account_id)."""
    subject = _object(value, f"{at}subject")
    kind = _string(subject.get("type"), f"{at}subject.type")
    if kind != SUBJECT_TYPE:
        raise BadRequestError(f"{at}subject.type", f"{kind!r} is not {SUBJECT_TYPE!r}: pdp decides for participants")
    user_id = _string(subject.get("id"), f"{at}subject.id")
    properties = _optional_object(subject.get("properties"), f"{at}subject.properties")
    ip = _string(properties.get("ip"), f"{at}subject.properties.ip")
    account_id = _optional_string(properties.get("account_id"), f"{at}subject.properties.account_id")
    return ip, user_id, account_id


def _resource(value: object, at: str) -> Resource:
    resource = _object(value, f"{at}resource")
    kind = _string(resource.get("type"), f"{at}resource.type")
    if kind != RESOURCE_TYPE:
        raise BadRequestError(f"{at}resource.type", f"{kind!r} is not {RESOURCE_TYPE!r}: pdp decides on meetings")
    meeting_id = _string(resource.get("id"), f"{at}resource.id")
    properties = _optional_object(resource.get("properties"), f"{at}resource.properties")
    host = _optional_string(properties.get("host_account_id"), f"{at}resource.properties.host_account_id")
    return Resource(meeting_id, host, _tags(properties.get("tags"), f"{at}resource.properties.tags"))


def _action(value: object, at: str) -> int:
    action = _object(value, f"{at}action")
    name = _string(action.get("name"), f"{at}action.name")
    number = ACTIONS.get(name)
    if number is None:
        raise BadRequestError(f"{at}action.name", f"{name!r} is not one of {', '.join(ACTIONS)}")
    return number


def _evaluation(entities: Mapping[str, object], at: Mapping[str, str]) -> Evaluation:
    """:raises BadRequestError: the first entity (subject, action, resource) that is wrong."""
    ip, user_id, account_id = _subject(entities.get("subject"), at["subject"])
    action = _action(entities.get("action"), at["action"])
    resource = _resource(entities.get("resource"), at["resource"])
    return Evaluation(ip, user_id, account_id, resource, action, at)


_TOP_LEVEL = {"subject": "", "action": "", "resource": ""}


def parse_evaluation(request: Mapping[str, Any]) -> Evaluation:
    """An Access Evaluation request (section 6.1); ``context`` must be an object when given.

    :raises BadRequestError: a required member is missing or of the wrong type.
    """
    evaluation = _evaluation(request, _TOP_LEVEL)
    _optional_object(request.get("context"), "context")
    return evaluation


def parse_evaluations(request: Mapping[str, Any], limit: int) -> Evaluations | None:
    """An Access Evaluations request (section 7.1), or None when it has no
    ``evaluations`` (or an empty array): then it is one Access Evaluation.

    Each item takes the top-level ``subject``, ``action``, ``resource`` and
    ``context`` it does not carry itself, whole (section 7.1.1: no merging of
    members). An item that cannot be decided becomes a :class:`BadRequestError`
    in place; the request as a whole is refused only for what is wrong at
    its top level.

    :raises BadRequestError: ``evaluations`` is not an array or holds more than
        ``limit`` items, ``options`` or its ``evaluations_semantic`` is wrong,
        or a top-level default is not an object.
    """
    items = request.get("evaluations")
    if items is None or items == []:
        return None
    if not isinstance(items, list):
        raise BadRequestError("evaluations", f"must be an array, not {_kind(items)}")
    try:
        check_batch_size(len(items), limit, "evaluations")
    except RequestError as error:
        raise BadRequestError(error.field, error.message) from None
    options = _optional_object(request.get("options"), "options")
    semantic = _optional_string(options.get("evaluations_semantic"), "options.evaluations_semantic") or SEMANTICS[0]
    if semantic not in SEMANTICS:
        raise BadRequestError("options.evaluations_semantic", f"{semantic!r} is not one of {', '.join(SEMANTICS)}")
    defaults = {name: request.get(name) for name in (*_ENTITIES, "context")}
    for name, value in defaults.items():
        if value is not None:
            _object(value, name)
    return Evaluations([_item(item, position, defaults) for position, item in enumerate(items)], semantic)


def _item(item: object, position: int, defaults: Mapping[str, object]) -> Evaluation | BadRequestError:
    at_item = f"evaluations[{position}]."
    try:
        members = _object(item, f"evaluations[{position}]")
        entities: dict[str, object] = {}
        at: dict[str, str] = {}
        for name in _ENTITIES:
            own = members.get(name)
            if own is None and defaults[name] is None:
                raise BadRequestError(f"{at_item}{name}", "required (in the item, or as a top-level default)")
            entities[name], at[name] = (defaults[name], "") if own is None else (own, at_item)
        _optional_object(members.get("context"), f"{at_item}context")
        return _evaluation(entities, at)
    except BadRequestError as error:
        return error
