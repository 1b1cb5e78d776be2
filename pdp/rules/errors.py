"""How a snapshot is rejected: every problem at once, each with its path and line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdp.errors import PdpError

__all__ = ["Problem", "SnapshotError"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason a snapshot was rejected."""

    path: str
    message: str
    line: int | None = None

    def __post_init__(self) -> None:
        # A path names keys and ids as written; one that is not valid Unicode (a lone
        # surrogate) would make the refusal itself unprintable, and unfit for a status.
        for name in ("path", "message"):
            text = getattr(self, name)
            if not text.isascii():
                object.__setattr__(self, name, text.encode("utf-8", "backslashreplace").decode("utf-8"))

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SnapshotError(PdpError, ValueError):
    """A snapshot was rejected. ``problems`` lists every problem found."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        count = len(self.problems)
        lines = "\n".join("  " + problem.render(source) for problem in self.problems)
        super().__init__(f"{source}: snapshot rejected, {count} problem{'s' * (count != 1)}:\n{lines}")
