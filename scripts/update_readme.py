"""Rewrite the generated parts of README.md (the configuration table) from the code.

    python scripts/update_readme.py

tests/test_docs.py fails when README.md and the code disagree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdp.config import settings_markdown  # after the path fix above

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def main() -> int:
    text = README.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        print(f"README.md lacks the {START} ... {END} markers", file=sys.stderr)
        return 1
    README.write_text(pattern.sub(lambda _: f"{START}\n{settings_markdown()}\n{END}", text), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
