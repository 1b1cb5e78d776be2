"""The stepwise JSON reader: a JSON snapshot read against the previous one's text.

A sidecar following a store sees the same large snapshot again and again with a
rule or two changed. ``json.loads`` would spend tens of milliseconds in one call
that no request thread can interrupt, and build every rule's mapping again; this
reader walks the document in small steps, calls ``pace`` between them, finds
the rules whose text is unchanged by slicing and comparing in C, and leaves
only the changed ones to be parsed (by :meth:`JsonRules.parse`, one at a time,
as they are compiled).
"""

from __future__ import annotations

import bisect
import json
import json.scanner
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from pdp.rules.document import DuplicateKeyError, Marked, json_object

__all__ = ["PACE_EVERY", "JsonRules", "JsonSource", "split_json"]

PACE_EVERY = 128  # rules read or compiled between two calls of ``pace``

_PLAIN_JSON = json.JSONDecoder()
_MAPPING_JSON = json.JSONDecoder(object_pairs_hook=json_object)
# Each parses one JSON value at a position: (value, end); StopIteration when none starts there.
# (typeshed calls the argument a scanner; CPython's C scanner takes the decoder, as json itself does)
_scan_plain = json.scanner.make_scanner(_PLAIN_JSON)  # type: ignore[arg-type]
_scan_mapping = json.scanner.make_scanner(_MAPPING_JSON)  # type: ignore[arg-type]


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\n\r":
        position += 1
    return position


@dataclass(frozen=True, slots=True)
class JsonSource:
    """A JSON snapshot's text and where each rule lies in it; a policy keeps it
    so that the next snapshot's compile can skip what did not change."""

    text: str
    starts: array[int]
    ends: array[int]
    rules_end: int  # just past the rules array's closing bracket

    def rule_text(self, position: int) -> str:
        return self.text[self.starts[position] : self.ends[position]]


_NO_SOURCE = JsonSource("", array("q"), array("q"), 0)


class JsonRules:
    """The ``rules`` array of a JSON snapshot, as read against the previous one.

    ``changed`` lists, in order, the positions whose rule is new or changed; any
    other position holds the previous policy's rule at that position, unchanged.
    Without a previous snapshot every position is in ``changed``. Rules are
    parsed one at a time by :meth:`parse` as they are compiled, so that 10,000
    parsed mappings never exist at once (they would leave about 20 MB of
    fragmented heap behind them).
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.changed: list[int] = []
        self.count = 0
        self.starts: array[int] = array("q")
        self.ends: array[int] = array("q")
        self.rules_end = 0

    def memory(self) -> JsonSource:
        """What the policy compiled from these rules keeps for the next compile."""
        return JsonSource(self.text, self.starts, self.ends, self.rules_end)

    def parse(self, position: int) -> object:
        """The rule at ``position`` as a mapping with its keys checked distinct.

        :raises DuplicateKeyError: a mapping in it repeats a key.
        """
        return _scan_mapping(self.text, self.starts[position])[0]


def split_json(text: str, base: JsonSource | None, pace: Callable[[], None]) -> Marked | None:
    """The top-level mapping of a JSON snapshot, its ``rules`` as :class:`JsonRules`.

    A walk over the document in many small steps, where ``json.loads`` is one
    call of tens of milliseconds that no request thread can interrupt. Returns
    None for anything but a well-formed object whose keys are distinct and whose
    ``rules`` is an array: the full parser then names the problem.
    """
    try:
        position = _skip_space(text, 0)
        if text[position : position + 1] != "{":
            return None
        document = Marked()
        position = _skip_space(text, position + 1)
        while text[position : position + 1] != "}":
            if document and text[position] == ",":
                position = _skip_space(text, position + 1)
            if text[position : position + 1] != '"':
                return None
            key, position = _scan_plain(text, position)
            position = _skip_space(text, position)
            if key in document or text[position : position + 1] != ":":
                return None
            position = _skip_space(text, position + 1)
            if key == "rules" and text[position : position + 1] == "[":
                document[key] = rules = _split_rules(text, position, base, pace)
                position = rules.rules_end
            else:
                document[key], position = _MAPPING_JSON.raw_decode(text, position)
            position = _skip_space(text, position)
            if text[position : position + 1] not in (",", "}"):
                return None
        if _skip_space(text, position + 1) != len(text):
            return None
    except (ValueError, RecursionError, IndexError, StopIteration, DuplicateKeyError):
        return None
    return document


def _split_rules(text: str, position: int, base: JsonSource | None, pace: Callable[[], None]) -> JsonRules:
    """The rules array starting at ``text[position] == "["``.

    Against ``base``, the previous snapshot: the rules inside the text both
    share from the start are the same rules, and so is every rule from the
    first one found, at its old position, inside the text both share up to the
    end. Only the rules between are read, and those identical to the rule at the
    same position are not parsed. Slicing and copying in C do the shared parts.

    :raises ValueError, StopIteration: the array is malformed.
    """
    rules = JsonRules(text)
    starts, ends = rules.starts, rules.ends
    position = _skip_space(text, position + 1)
    if text[position] == "]":
        rules.rules_end = position + 1
        return rules
    base = base or _NO_SOURCE
    old_starts, old_ends, old_text, old_count = base.starts, base.ends, base.text, len(base.starts)
    suffix_from = shift = 0
    if old_count:
        prefix = _common_prefix(old_text, text)
        suffix_from = _shared_end_from(base, text, prefix)
        shift = len(text) - len(old_text)
        # Old rules wholly inside the shared beginning lie at the same offsets now.
        head = bisect.bisect_right(old_ends, prefix)
        if head and old_starts[0] == position:
            starts.extend(old_starts[:head])
            ends.extend(old_ends[:head])
            position = _after_comma(text, old_ends[head - 1])
            if position < 0:
                rules.count, rules.rules_end = head, -position
                return rules
    while True:
        count = len(starts)
        if count % PACE_EVERY == 0:
            pace()
        start = position
        if count < old_count:
            old_start, old_end = old_starts[count], old_ends[count]
            if old_start + shift == start and old_start >= suffix_from:
                # From here to the end the text is the old text: so are the remaining rules.
                starts.extend(map(shift.__add__, old_starts[count:]))
                ends.extend(map(shift.__add__, old_ends[count:]))
                rules.count, rules.rules_end = old_count, base.rules_end + shift
                return rules
            position = _scan_plain(text, start)[1]
            same_size = position - start == old_end - old_start
            if not (same_size and text.startswith(old_text[old_start:old_end], start)):
                rules.changed.append(count)
        else:
            position = _scan_plain(text, start)[1]
            rules.changed.append(count)
        starts.append(start)
        ends.append(position)
        following = _after_comma(text, position)
        if following < 0:
            rules.count, rules.rules_end = len(starts), -following
            return rules
        position = following


def _shared_end_from(base: JsonSource, text: str, prefix: int) -> int:
    """The offset in ``base.text`` from which its rules array's text is also the
    end of ``text``'s (before the array's end), given the ``prefix`` both share.

    Shared ends are sought up to the rules array's end, as if what follows it kept
    its length (the version, last in pdp.canonical's text); a wrong guess only
    shortens them: they are compared exactly.
    """
    old_text, end = base.text, base.rules_end
    new_end = max(prefix, len(text) - (len(old_text) - end))
    return end - _common_suffix(old_text[:end], text[:new_end], min(end, new_end) - prefix)


def _after_comma(text: str, position: int) -> int:
    """Where the next element starts after the one ending at ``position``, or
    minus the offset just past the closing bracket when it was the last.

    :raises ValueError: neither a comma nor the closing bracket follows.
    """
    position = _skip_space(text, position)
    if text[position] == "]":
        return -(position + 1)
    if text[position] != ",":
        raise ValueError("expected , or ] in rules")
    return _skip_space(text, position + 1)


_STRIDE = 1 << 16


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix, by slice comparisons (memcmp), not by character."""
    limit = min(len(a), len(b))
    low = 0
    while low + _STRIDE <= limit and a[low : low + _STRIDE] == b[low : low + _STRIDE]:
        low += _STRIDE
    high = min(low + _STRIDE, limit)
    while low < high:  # a[:low] == b[:low]; the answer is at most high
        middle = (low + high + 1) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _common_suffix(a: str, b: str, limit: int) -> int:
    """Length, at most ``limit``, of the longest common suffix."""
    size_a, size_b = len(a), len(b)
    low = 0
    while (
        low + _STRIDE <= limit and a[size_a - low - _STRIDE : size_a - low] == b[size_b - low - _STRIDE : size_b - low]
    ):
        low += _STRIDE
    high = min(low + _STRIDE, limit)
    while low < high:  # the last low characters agree; the answer is at most high
        middle = (low + high + 1) // 2
        if a[size_a - middle : size_a - low] == b[size_b - middle : size_b - low]:
            low = middle
        else:
            high = middle - 1
    return low
