"""Bytes to line-marked mappings: the size and UTF-8 gate, YAML without
duplicate keys, JSON through the same mapping type, and format detection.

Nothing here knows the rules format; :mod:`pdp.rules.validate` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pdp.rules.errors import Problem, SnapshotError

__all__ = [
    "MAX_SNAPSHOT_BYTES",
    "DuplicateKeyError",
    "Marked",
    "decode_text",
    "guess_format",
    "json_object",
    "line_of",
    "parse_document",
    "parse_text",
]

MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024
"""Larger snapshots are refused before parsing (10,000 rules take about 3 MB)."""


class Marked(dict[Any, Any]):
    """A dict that remembers where it and each of its keys stood in the source."""

    line: int | None = None
    lines: dict[Any, int]

    def __init__(self) -> None:
        super().__init__()
        self.lines = {}


def line_of(mapping: object, key: str) -> int | None:
    """The line of ``key`` in ``mapping``, when the source had lines (YAML)."""
    return mapping.lines.get(key) if isinstance(mapping, Marked) else None


class DuplicateKeyError(Exception):
    """A mapping in the source repeats a key."""

    def __init__(self, key: object, line: int | None) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.line = line


_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc]  # PyYAML's loaders are untyped classes
    """Safe YAML loader that records line numbers and refuses duplicate keys."""


def _construct_mapping(loader: Any, node: yaml.MappingNode) -> Marked:
    loader.flatten_mapping(node)
    mapping = Marked()
    mapping.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            duplicate = key in mapping
        except TypeError:
            raise DuplicateKeyError(key, line) from None
        if duplicate:
            raise DuplicateKeyError(key, line)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = line
    return mapping


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def json_object(pairs: list[tuple[str, Any]]) -> Marked:
    """``object_pairs_hook`` for :mod:`json`: a :class:`Marked` without lines.

    :raises DuplicateKeyError: a key repeats.
    """
    mapping = Marked()
    for key, value in pairs:
        if key in mapping:
            raise DuplicateKeyError(key, None)
        mapping[key] = value
    return mapping


def decode_text(data: bytes) -> str:
    """The snapshot's text.

    :raises SnapshotError: too large, or not UTF-8 (with an empty source name).
    """
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError("", [Problem("", f"{len(data)} bytes exceeds the {MAX_SNAPSHOT_BYTES}-byte limit")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SnapshotError("", [Problem("", f"not UTF-8 (byte {error.start})")]) from None
    return text.removeprefix("\ufeff")


def parse_document(data: bytes, fmt: str) -> Any:
    """Turn bytes into plain data.

    :raises SnapshotError: on any size, encoding or syntax problem.
    """
    return parse_text(decode_text(data), fmt)


def parse_text(text: str, fmt: str) -> Any:
    """Parse the whole text as ``fmt`` (``"json"`` or ``"yaml"``).

    :raises SnapshotError: on any syntax problem or repeated key.
    """
    try:
        if fmt == "json":
            return json.loads(text, object_pairs_hook=json_object)
        return yaml.load(text, Loader=_Loader)  # noqa: S506  # _Loader derives from SafeLoader
    except DuplicateKeyError as error:
        raise SnapshotError("", [Problem("", str(error), error.line)]) from None
    except json.JSONDecodeError as error:
        raise SnapshotError("", [Problem("", f"invalid JSON: {error.msg}", error.lineno)]) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise SnapshotError("", [Problem("", f"invalid YAML: {error.problem or error}", line)]) from None
    except (yaml.YAMLError, RecursionError, ValueError) as error:
        raise SnapshotError("", [Problem("", f"invalid {fmt.upper()}: {error}")]) from None


def guess_format(data: bytes, name: str) -> str:
    """``"json"`` or ``"yaml"``: from the name's suffix, else from the first character."""
    suffix = Path(name).suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    return "json" if data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{") else "yaml"
