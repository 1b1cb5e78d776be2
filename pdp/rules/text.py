"""What the rules format accepts as text: Unicode that encodes as UTF-8, that shows
something where something is required, and that fits the answers that carry it.

A rule's reason and legal basis travel in every answer it decides, and the ids
of the shadow rules that apply in every answer there; a CheckBatch
answer carries them once per participant. Their bound keeps the largest answer of
the default batch (1,000 participants) far under gRPC's default 4 MiB message
limit: ``tests/test_hardening_inputs.py`` computes that worst case through the
real encoder.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = [
    "MAX_SHADOW_ID_BYTES",
    "MAX_TEXT_BYTES",
    "control_problem",
    "encoding_problem",
    "is_blank",
    "size_problem",
]

MAX_TEXT_BYTES = 1000
"""A reason or legal basis, in UTF-8 bytes (1,000 Latin letters, 333 Chinese characters)."""

MAX_SHADOW_ID_BYTES = 1040
"""What the ids of the shadow rules reaching one country (or its subdivisions) may
take in an answer, each id's length and 2 bytes of framing: every answer lists the
shadow rules that apply to the participant's place. Eight of the longest ids (128
characters), 86 of 10 characters."""

# Letters and symbols that render as nothing, besides the format (Cf) and space (Z*)
# categories: Hangul fillers and the blank Braille pattern.
_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u2800")
_BLANK_CATEGORIES = frozenset(("Zs", "Zl", "Zp", "Cc", "Cf"))
# C0 controls but tab and newline, DEL, and the C1 controls: terminals act on them.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def encoding_problem(text: str) -> str:
    """Why ``text`` cannot be encoded as UTF-8 (a lone surrogate, as the JSON escape
    ``"\\ud800"`` makes), or ''."""
    if text.isascii():
        return ""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return (
            f"not valid Unicode: a lone surrogate U+{ord(text[error.start]):04X} at character {error.start + 1}"
            " (a JSON \\u escape must give both halves of a pair, like \\ud83d\\ude00)"
        )
    return ""


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: only whitespace, zero-width or other format
    characters, controls, or letters that render blank."""
    if text.isascii():
        return not text.strip() or all(not character.isprintable() or character == " " for character in text)
    return all(
        character.isspace() or character in _INVISIBLE or unicodedata.category(character) in _BLANK_CATEGORIES
        for character in text
    )


def control_problem(text: str) -> str:
    """Why ``text`` must not be shown as it is (a control character), or ''."""
    found = _CONTROL.search(text)
    if found is None:
        return ""
    return (
        f"control character U+{ord(found.group()):04X} at character {found.start() + 1}: reasons and legal"
        " bases are shown in terminals and reports, which would act on it"
    )


def size_problem(text: str) -> str:
    """Why ``text`` is too long to travel in every answer, or ''."""
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    if size <= MAX_TEXT_BYTES:
        return ""
    return (
        f"{size} bytes in UTF-8, at most {MAX_TEXT_BYTES}: every answer the rule decides carries it, and a"
        " CheckBatch answer of 1,000 participants must fit gRPC's 4 MiB message limit; cite the order and"
        " say where its full text is"
    )
