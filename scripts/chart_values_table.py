"""Print helm/pdp's values table (Markdown) from the `# --` comments in values.yaml.

    python scripts/chart_values_table.py > /tmp/table.md   # then paste into helm/pdp/README.md

tests/test_helm.py fails when the README's table and values.yaml disagree, or a
top-level key has no documented entry.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

VALUES = Path(__file__).resolve().parent.parent / "helm" / "pdp" / "values.yaml"
_KEY = re.compile(r"^(\s*)([A-Za-z][A-Za-z0-9]*):\s*(.*)$")


def documented_values(text: str) -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every key preceded by a `# --` comment."""
    rows: list[tuple[str, str, str]] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and comment:
            comment.append(stripped.lstrip("#").strip())
            continue
        match = _KEY.match(line)
        if not match or stripped.startswith(("#", "-")):
            continue
        indent, key, value = len(match[1]), match[2], match[3]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([*(name for _, name in stack), key])
        stack.append((indent, key))
        if comment:
            rows.append((path, value or "(see values.yaml)", " ".join(comment)))
            comment = []
    return rows


def table(text: str) -> str:
    lines = ["| key | default | description |", "|---|---|---|"]
    lines += [f"| `{path}` | `{default}` | {description} |" for path, default, description in documented_values(text)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(VALUES.read_text()))
    sys.exit(0)
