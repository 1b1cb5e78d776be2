"""What the audit log does not say about a rule: its validity window, from the snapshots.

A record names the policy version that decided it; ``pdp report --rules FILE``
reads the snapshot files of those versions, so that the report can print each
rule's window and check the log's jurisdictions against the published ones.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from pathlib import Path

from pdp.report.records import ReportError, rfc3339
from pdp.rules import Rule, SnapshotError, load_policy

__all__ = ["Snapshots", "window_text"]


def window_text(rule: Rule) -> str:
    """A rule's validity window in words, times RFC 3339 in UTC."""
    start = None if math.isinf(rule.valid_from) else rfc3339(dt.datetime.fromtimestamp(rule.valid_from, dt.UTC))
    end = None if math.isinf(rule.valid_until) else rfc3339(dt.datetime.fromtimestamp(rule.valid_until, dt.UTC))
    if start and end:
        return f"from {start} until {end}"
    if start:
        return f"from {start}, no end"
    if end:
        return f"until {end}"
    return "none: applies while published"


class Snapshots:
    """Rules by (policy version, rule id), from snapshot files."""

    def __init__(self, paths: Iterable[str | Path] = ()) -> None:
        """:raises ReportError: a file cannot be read, is not a valid snapshot, or repeats a version."""
        self._rules: dict[int, dict[str, Rule]] = {}
        for path in paths:
            try:
                policy = load_policy(path)
            except OSError as error:
                raise ReportError(f"--rules {path}: {error.strerror or error}") from None
            except SnapshotError as error:
                raise ReportError(f"--rules {error}") from None
            if policy.version in self._rules:
                raise ReportError(f"--rules {path}: a second snapshot of version {policy.version}")
            self._rules[policy.version] = dict(policy.by_id)

    def __bool__(self) -> bool:
        return bool(self._rules)

    def rule(self, version: int | None, rule_id: str) -> Rule | None:
        """The rule as published in ``version``, or None when that snapshot was not given."""
        if version is None:
            return None
        return self._rules.get(version, {}).get(rule_id)

    def window(self, rule_id: str, versions: Iterable[int]) -> str:
        """The rule's window in the versions that decided its records, one text per distinct window."""
        if not self._rules:
            return "not in the audit log (pass the snapshots with --rules)"
        texts: dict[str, list[int]] = {}
        for version in sorted(set(versions)):
            rule = self.rule(version, rule_id)
            if rule is not None:
                texts.setdefault(window_text(rule), []).append(version)
        if not texts:
            return "no snapshot given for the versions that applied it"
        if len(texts) == 1:
            return next(iter(texts))
        return "; ".join(f"version {', '.join(map(str, v))}: {text}" for text, v in texts.items())
