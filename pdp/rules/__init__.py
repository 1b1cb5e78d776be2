"""Policy snapshots: parse, validate, compile and evaluate.

The package's files are its pipeline, each one stage:

- :mod:`~pdp.rules.errors`: :class:`Problem` and :class:`SnapshotError`
  (every problem at once, with path and line);
- :mod:`~pdp.rules.document`: bytes to line-marked mappings (size and UTF-8
  gate, YAML without duplicate keys, JSON, format detection);
- :mod:`~pdp.rules.jsondiff`: the stepwise JSON reader against the previous
  snapshot's text;
- :mod:`~pdp.rules.text`: what counts as text (valid Unicode, visible, bounded);
- :mod:`~pdp.rules.validate`: the rules format's contract, every problem
  collected, a typed spec per rule;
- :mod:`~pdp.rules.compile`: ranks, reuse of the active policy's unchanged
  rules, pacing, :func:`parse_policy`;
- :mod:`~pdp.rules.evaluate`: :class:`Rule`, the index, :meth:`Policy.decide`
  and :meth:`Policy.explain`.

No gRPC, no network, no clock of its own (the caller passes ``now``), so every
rule of the product's promise can be tested here alone. Side effects live in
:mod:`~pdp.rules.compile` only: :func:`parse_policy` pauses the process-wide
cyclic garbage collector while it compiles, and calls the caller's ``pace``;
:func:`load_policy` reads a file. A compiled :class:`Policy` is immutable and
safe to share between threads.

This module is the package's face: the rest of pdp imports from here.
"""

from __future__ import annotations

from pdp.rules.compile import load_policy, parse_policy, snapshot_as_json
from pdp.rules.document import MAX_SNAPSHOT_BYTES, sniff_format
from pdp.rules.errors import Problem, SnapshotError
from pdp.rules.evaluate import Policy, Rule, Trace, policy_summary
from pdp.rules.validate import MAX_RULES

__all__ = [
    "MAX_RULES",
    "MAX_SNAPSHOT_BYTES",
    "Policy",
    "Problem",
    "Rule",
    "SnapshotError",
    "Trace",
    "load_policy",
    "parse_policy",
    "policy_summary",
    "snapshot_as_json",
    "sniff_format",
]
