"""The package's size limits (CONTRIBUTING.md): a module is one concern, a function one step.

A module under ``pdp/`` (the generated ``pdp/_proto/`` aside) is at most 400 lines and a
function at most 60, except declarative tables, which are listed here by name with the
reason: a table grows by entries, not by logic.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pdp"
MODULE_LINES = 400
FUNCTION_LINES = 60
# (module, function): why it may be longer.
TABLES = {
    ("cli.py", "build_parser"): "the argparse table: one add_argument per flag",
}


def _modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if "_proto" not in path.relative_to(PACKAGE).parts)


def test_the_package_has_modules() -> None:
    # Guards the two tests below against passing on an empty glob.
    assert len(_modules()) > 40


def test_no_module_over_400_lines() -> None:
    long = {}
    for path in _modules():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MODULE_LINES:
            long[str(path.relative_to(PACKAGE))] = lines
    assert not long, f"split these modules by concern (CONTRIBUTING.md): {long}"


def test_no_function_over_60_lines_but_tables() -> None:
    long = {}
    for path in _modules():
        name = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (name, node.name) not in TABLES:
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > FUNCTION_LINES:
                    long[f"{name}:{node.lineno} {node.name}"] = lines
    assert not long, f"split these functions into named steps: {long}"


def test_every_listed_table_exists() -> None:
    # A table that was split or renamed must leave the list, or the exception outlives its reason.
    found = set()
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef):
                found.add((str(path.relative_to(PACKAGE)), node.name))
    assert set(TABLES) <= found
