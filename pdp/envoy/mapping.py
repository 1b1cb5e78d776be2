"""Envoy ext_authz: which participant, meeting and action an HTTP request stands for.

A participant controls every header of its own request, so a meeting's
attributes come only from sources the platform controls, one per attribute:

- ``context:KEY``: the route's ``context_extensions`` (Envoy's route config);
- ``claim:PATH``: a claim of a JWT that Envoy's ``jwt_authn`` verified and put in
  ``metadata_context`` (``payload_in_metadata``), ``PATH`` dotted (``video.room``);
- ``path:REGEX``: the one named group of ``REGEX`` searched in the request path
  (query removed), percent-decoded as the application behind Envoy will decode it;
- ``header:NAME``: a request header, only when the operator declared it trusted.

The participant's address is Envoy's L4 peer (``source.address``), or with N
trusted hops the Nth address from the right of ``x-forwarded-for``.

No protobuf at import time: :mod:`pdp.config` validates sources with
:func:`parse_source` without loading Envoy's stubs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote

from pdp.model import Action

if TYPE_CHECKING:
    from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext

__all__ = [
    "ATTRIBUTES",
    "HttpAdmission",
    "Mapper",
    "MappingError",
    "check_sources",
    "parse_attribute_names",
    "parse_header_names",
    "parse_hops",
    "parse_source",
]

# Every attribute a source can be configured for; the first four describe the meeting.
ATTRIBUTES = ("meeting_id", "tags", "host_account_id", "action", "user_id", "account_id")
JWT_NAMESPACE = "envoy.filters.http.jwt_authn"
_KINDS = ("context", "claim", "path", "header")
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_ACTIONS = {"join": Action.JOIN, "host": Action.HOST}

Value = str | list[str] | None
# (attributes, its context_extensions, its request headers): the two maps fetched once per request.
Extractor = Callable[["AttributeContext", Any, Any], Value]


class MappingError(Exception):
    """A request that cannot be decided: an attribute is required and missing, or unreadable.

    Answered with HTTP 400 and a body naming ``attribute``; never an allow.
    """

    def __init__(self, attribute: str, message: str) -> None:
        super().__init__(f"{attribute}: {message}")
        self.attribute = attribute
        self.message = message


class HttpAdmission(NamedTuple):
    """What one HTTP request asks: a participant, a meeting, an action.

    A NamedTuple: built once per request, where a frozen dataclass costs several µs.
    """

    ip: str
    meeting_id: str
    host_account_id: str = ""
    tags: tuple[str, ...] = ()
    action: Action = Action.JOIN
    user_id: str = ""
    account_id: str = ""


def parse_source(text: str) -> str:
    """Check one ``KIND:ARGUMENT`` source; return it normalised (header names in lower case).

    :raises ValueError: unknown kind, empty argument, a bad header name, or a
        regex that does not compile or has not exactly one named group.
    """
    kind, separator, argument = text.partition(":")
    if not separator or kind not in _KINDS:
        raise ValueError(f"{text!r} is not context:KEY, claim:PATH, path:REGEX or header:NAME")
    if not argument:
        raise ValueError(f"{text!r}: {kind}: needs {'a regex' if kind == 'path' else 'a name'} after the colon")
    if kind == "header":
        argument = argument.lower()
        if not _HEADER_NAME.fullmatch(argument) or argument.startswith(("x-pdp-", ":")):
            raise ValueError(f"{text!r}: not a request header name (x-pdp-* are pdp's own)")
    elif kind == "claim" and "" in argument.split("."):
        raise ValueError(f"{text!r}: an empty segment in the claim path")
    elif kind == "path":
        try:
            groups = re.compile(argument).groupindex
        except re.error as error:
            raise ValueError(f"{text!r}: not a regular expression: {error}") from None
        if len(groups) != 1:
            raise ValueError(f"{text!r}: the regex needs exactly one named group, like (?P<room>[^/]+)")
    return f"{kind}:{argument}"


def parse_attribute_names(text: str) -> str:
    """A comma-separated list of :data:`ATTRIBUTES`, normalised. :raises ValueError: an unknown name."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not one of {', '.join(ATTRIBUTES)}")
    return ",".join(names)


def parse_header_names(text: str) -> str:
    """A comma-separated list of header names, in lower case. :raises ValueError: a bad name."""
    names = (parse_source(f"header:{name.strip()}") for name in text.split(",") if name.strip())
    return ",".join(name.removeprefix("header:") for name in names)


def parse_hops(text: str) -> int:
    """:raises ValueError: not a whole number in 0..32."""
    value = int(text)
    if not 0 <= value <= 32:
        raise ValueError(f"{value} is outside 0..32")
    return value


def check_sources(sources: Mapping[str, str], trusted_headers: str, required: str) -> None:
    """Settings that only make sense together.

    :raises ValueError: a ``header:`` source whose header is not declared trusted,
        or a required attribute without a source; the message names the flag.
    """
    trusted = set(trusted_headers.split(","))
    for name, source in sources.items():
        header = source.removeprefix("header:") if source.startswith("header:") else ""
        if header and header not in trusted:
            raise ValueError(
                f"--ext-authz-{name.replace('_', '-')}: {source} reads a header the client may write; list "
                f"{header} in --ext-authz-trusted-headers (PDP_EXT_AUTHZ_TRUSTED_HEADERS) only if a proxy you "
                "run sets or overwrites it on every request"
            )
    for name in {"meeting_id", *filter(None, required.split(","))}:
        if not sources.get(name):
            raise ValueError(f"--ext-authz-required: {name} has no source (--ext-authz-{name.replace('_', '-')})")


class Mapper:
    """Turns Envoy's AttributeContext into an :class:`HttpAdmission`.

    ``sources`` maps attributes (:data:`ATTRIBUTES`) to validated sources, an
    empty or absent one meaning not mapped. ``meeting_id`` is always required.
    """

    def __init__(
        self,
        sources: Mapping[str, str],
        *,
        required: Collection[str] = (),
        xff_trusted_hops: int = 0,
        jwt_payload_key: str = "jwt_payload",
    ) -> None:
        self._hops = xff_trusted_hops
        self._required = frozenset(required) | {"meeting_id"}
        self._extractors: list[tuple[str, str, Extractor]] = []
        for attribute in ATTRIBUTES:
            if sources.get(attribute):
                source = parse_source(sources[attribute])
                self._extractors.append((attribute, source, _extractor(source, jwt_payload_key)))
        unmapped = self._required - {attribute for attribute, _, _ in self._extractors}
        if unmapped:
            raise ValueError(f"required but given no source: {', '.join(sorted(unmapped))}")

    def map(self, attributes: AttributeContext, headers: Any = None) -> HttpAdmission:
        """``headers``: ``attributes.request.http.headers``, when the caller holds it already.

        :raises MappingError: a required attribute is absent, or one is unreadable.
        """
        context = attributes.context_extensions
        if headers is None:
            headers = attributes.request.http.headers
        values: dict[str, Any] = {}
        for attribute, source, extract in self._extractors:
            try:
                found = extract(attributes, context, headers)
            except ValueError as error:
                raise MappingError(attribute, f"{source}: {error}") from None
            value: Value | tuple[str, ...] = found
            if attribute == "tags" and found is not None:
                value = _tags(found)
            elif isinstance(found, list):
                raise MappingError(attribute, f"{source}: a list where one value was expected")
            if not value:
                if attribute in self._required:
                    raise MappingError(attribute, f"required, and {source} gave nothing")
                continue
            values[attribute] = value
        if "action" in values:
            action = _ACTIONS.get(values["action"])
            if action is None:
                raise MappingError("action", f"{values['action'][:64]!r} is not join or host")
            values["action"] = action
        return HttpAdmission(self._address(attributes, headers), **values)

    def _address(self, attributes: AttributeContext, headers: Any) -> str:
        if not self._hops:
            address = attributes.source.address
            if not address.HasField("socket_address"):
                raise MappingError("participant.ip", "Envoy's peer (source.address) has no IP address")
            return str(address.socket_address.address)
        forwarded: str = headers.get("x-forwarded-for", "")
        # Only the trusted end is split off: whatever the client wrote further left is never parsed.
        entries = forwarded.rsplit(",", self._hops) if forwarded.strip() else []
        if len(entries) < self._hops:
            raise MappingError(
                "participant.ip",
                f"x-forwarded-for holds {len(entries)} addresses; {self._hops} trusted hops each append one",
            )
        return entries[-self._hops].strip()


def _tags(value: str | list[str]) -> tuple[str, ...]:
    """One comma-separated text, or a list claim; blanks dropped."""
    parts = value.split(",") if isinstance(value, str) else value
    return tuple(tag for tag in (part.strip() for part in parts) if tag)


def _extractor(source: str, jwt_payload_key: str) -> Extractor:
    kind, _, argument = source.partition(":")
    if kind == "context":
        return lambda attributes, context, headers: context.get(argument)
    if kind == "header":
        return lambda attributes, context, headers: headers.get(argument)
    if kind == "path":
        pattern = re.compile(argument)

        def from_path(attributes: AttributeContext, context: Any, headers: Any) -> Value:
            match = pattern.search(attributes.request.http.path.partition("?")[0])
            found = match.group(1) if match else None
            # strict: invalid UTF-8 after decoding is a ValueError, reported as unreadable
            return unquote(found, errors="strict") if found else None

        return from_path
    segments = tuple(argument.split("."))
    return lambda attributes, context, headers: _claim(attributes, jwt_payload_key, segments)


def _claim(attributes: AttributeContext, payload_key: str, segments: tuple[str, ...]) -> Value:
    namespace = attributes.metadata_context.filter_metadata.get(JWT_NAMESPACE)
    if namespace is None:
        return None
    value = namespace.fields.get(payload_key)
    for segment in segments:
        if value is None or value.WhichOneof("kind") != "struct_value":
            return None
        value = value.struct_value.fields.get(segment)
    return None if value is None else _claim_value(value)


def _claim_value(value: Any) -> Value:
    """A claim as text, or a list of texts; :raises ValueError: an object, or a list of non-strings."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return str(value.string_value)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "number_value" and float(value.number_value).is_integer():
        return str(int(value.number_value))
    if kind == "list_value" and all(item.WhichOneof("kind") == "string_value" for item in value.list_value.values):
        return [str(item.string_value) for item in value.list_value.values]
    if kind == "null_value":
        return None
    raise ValueError(f"a {kind.removesuffix('_value')} claim is not a text, a whole number or a list of texts")
