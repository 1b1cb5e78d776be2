"""Bytes to line-marked mappings: the size and UTF-8 gate, YAML without
duplicate keys, JSON through the same mapping type, and format detection.

Nothing here knows the rules format; :mod:`pdp.rules.validate` does.
"""

from __future__ import annotations

import json
import re
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
    "sniff_format",
]

MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024
"""Larger snapshots are refused before parsing (10,000 rules take about 3 MB)."""

ALIAS_ALLOWANCE = 1024 * 1024
"""What YAML aliases may add: a document's expanded size (every scalar's characters
plus one per node, each alias counted as the whole node it repeats) is at most twice
its text plus this. Without aliases a document never comes near the bound."""


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

    :raises SnapshotError: on any syntax problem or repeated key, or YAML whose
        aliases expand it past :data:`ALIAS_ALLOWANCE` (refused before it is built).
    """
    try:
        if fmt == "json":
            return json.loads(text, object_pairs_hook=json_object)
        return _load_yaml(text)
    except SnapshotError:
        raise
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


def _load_yaml(text: str) -> Any:
    """The YAML document in ``text``, its size bounded before anything is built.

    Composing gives the node graph, in which an alias is the very node its anchor
    names: small, however often it is repeated. Everything after (constructing,
    ``repr``, validation) walks it as a tree, so the tree's size is measured here.

    :raises SnapshotError: the expanded document is too large, or an alias refers
        to a node that contains it.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if "*" in text:  # no alias can be written without one
            _bound_expansion(node, 2 * len(text) + ALIAS_ALLOWANCE, len(text))
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _bound_expansion(root: yaml.Node, limit: int, text_size: int) -> None:
    """Measure the tree ``root`` unfolds into, each shared node once (so it costs
    the graph's size, not the tree's), and refuse it past ``limit``.

    :raises SnapshotError: naming the line of the smallest node past the limit.
    """
    scalar = yaml.ScalarNode
    sizes: dict[int, int] = {}  # of collections; a scalar's is one plus its length
    open_nodes: set[int] = set()  # entered, not yet left: met again, it contains itself
    stack: list[tuple[yaml.Node, list[yaml.Node] | None]] = [(root, None)]
    while stack:
        node, children = stack.pop()
        key = id(node)
        if children is not None:  # leaving it: every child is measured
            open_nodes.discard(key)
            size = 1 + sum(1 + len(child.value) if type(child) is scalar else sizes[id(child)] for child in children)
        elif type(node) is scalar:
            size = 1 + len(node.value)
        elif key in sizes:
            continue
        elif key in open_nodes:
            raise SnapshotError(
                "", [Problem("", "invalid YAML: an alias refers to a node that contains it", _line(node))]
            )
        else:
            open_nodes.add(key)
            children = _children(node)
            stack.append((node, children))
            stack.extend((child, None) for child in children if type(child) is not scalar and id(child) not in sizes)
            continue
        if size > limit:
            message = (
                f"invalid YAML: aliases expand this node to more than {limit:,} characters and nodes (the text has"
                f" {text_size:,}): an alias may repeat what its anchor names, not multiply the document"
            )
            raise SnapshotError("", [Problem("", message, _line(node))])
        sizes[key] = size


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _line(node: yaml.Node) -> int | None:
    return node.start_mark.line + 1 if node.start_mark is not None else None


def guess_format(data: bytes, name: str) -> str:
    """``"json"`` or ``"yaml"``: from the name's suffix, else from the content (:func:`sniff_format`)."""
    suffix = Path(name).suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    return sniff_format(data)


_JSON_START = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*\{[ \t\r\n]*[\"}]")


def sniff_format(data: bytes) -> str:
    """``"json"`` when ``data`` opens as a JSON object does (``{`` then ``"`` or ``}``,
    after a BOM and whitespace), else ``"yaml"``: flow-style YAML (``{version: 3``)
    stays YAML. Used where no name tells, as for the payload of a signed envelope."""
    return "json" if _JSON_START.match(data) else "yaml"
