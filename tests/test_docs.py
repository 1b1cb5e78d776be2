"""The README stays true to the code it documents."""

from __future__ import annotations

from pdp.config import settings_markdown
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
