"""The README stays true to the code it documents."""

from __future__ import annotations

import ast
import importlib
import re

from pdp.config import settings_markdown
from pdp.decisions import Endpoint
from pdp.rules import load_policy

from .conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_configuration_table_matches_the_settings() -> None:
    assert settings_markdown() in README


def test_readme_names_both_commands_and_ci_calls_the_test_one() -> None:
    assert "make run" in README
    assert "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_module_is_in_the_module_map() -> None:
    for module in sorted((ROOT / "pdp").glob("*.py")):
        if module.name not in ("__init__.py", "__main__.py"):
            assert f"`pdp/{module.name}`" in README, module.name
    for module in sorted((ROOT / "pdp" / "rules").glob("*.py")):
        if module.name != "__init__.py":
            assert f"`pdp/rules/{module.name}`" in README, module.name
    for module in sorted((ROOT / "pdp" / "sources").glob("*.py")):
        if module.name != "__init__.py":
            assert f"`{module.name}`" in README, module.name


def test_example_rules_load() -> None:
    assert load_policy(ROOT / "examples" / "rules.yaml").version >= 1


def test_no_section_appears_twice() -> None:
    headings = [line for line in README.splitlines() if line.startswith("## ")]
    assert len(headings) == len(set(headings)), headings


# --------------------------------------------------------------------------- "Observability"

# What a meter's create_* method makes, in the words of the README's table.
_INSTRUMENTS = {
    "create_counter": "counter",
    "create_observable_counter": "counter",
    "create_up_down_counter": "up-down counter",
    "create_observable_up_down_counter": "up-down counter",
    "create_histogram": "histogram",
    "create_gauge": "gauge",
    "create_observable_gauge": "gauge",
}
# Telemetry's table of observables (pdp/telemetry.py) names its instruments in rows
# ("counter" | "gauge", name, unit, callback, description) and creates them in a loop.
_TABLE_MODULE = "telemetry.py"


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    return README[start : README.index("\n## ", start + 1)]


def _string(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def metrics_in_code() -> dict[str, tuple[str, str]]:
    """Every instrument created under pdp/: name -> (kind, unit)."""
    found: dict[str, tuple[str, str]] = {}
    for path in sorted((ROOT / "pdp").rglob("*.py")):
        if "_proto" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        named = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _INSTRUMENTS:
                name = _string(node.args[0]) if node.args else None
                if name is not None:
                    units = [_string(k.value) for k in node.keywords if k.arg == "unit"]
                    found[name] = (_INSTRUMENTS[node.func.attr], (units[0] or "") if units else "")
                    named.add(id(node.func))
            if isinstance(node, ast.Tuple) and len(node.elts) == 5 and path.name == _TABLE_MODULE:
                kind, name, unit = (_string(element) for element in node.elts[:3])
                if kind in ("counter", "gauge") and name is not None and unit is not None:
                    found[name] = (kind, unit)
        for node in ast.walk(tree):
            # A create_* whose name is not a literal escapes this list, unless it is the table's loop.
            if isinstance(node, ast.Attribute) and node.attr in _INSTRUMENTS and id(node) not in named:
                assert path.name == _TABLE_MODULE, f"{path.name}:{node.lineno}: an instrument named at run time"
    return found


def _rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()]


def test_the_observability_section_lists_every_metric_and_span() -> None:
    section = _section("Observability")
    metrics_part, spans_part = section.split("**Spans**", 1)
    documented = {
        row[0].strip("`"): (row[1], row[2].strip("`")) for row in _rows(metrics_part) if row[0].startswith("`pdp.")
    }
    in_code = metrics_in_code()
    assert len(in_code) >= 10  # guards the comparison against a walk that found nothing
    assert documented == in_code

    endpoints = []
    for path in sorted((ROOT / "pdp").rglob("*.py")):
        if "_proto" not in path.parts and "Endpoint(" in path.read_text(encoding="utf-8"):
            module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
            endpoints += [value for value in vars(module).values() if isinstance(value, Endpoint)]
    span_rows = [row for row in _rows(spans_part.split("\n\n", 2)[1]) if row[0].startswith("`")]
    documented_spans = {name for row in span_rows for name in re.findall(r"`([^`]+)`", row[0])}
    assert documented_spans == {endpoint.span_name for endpoint in endpoints}
    (duration,) = [row for row in _rows(metrics_part) if row[0] == "`pdp.check.duration`"]
    rpc_values = duration[3].split("; `verdict`")[0]
    assert set(re.findall(r"`([^`]+)`", rpc_values)) == {"rpc", *(endpoint.label for endpoint in endpoints)}
