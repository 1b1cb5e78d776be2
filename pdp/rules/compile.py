"""From a parsed snapshot to a :class:`~pdp.rules.evaluate.Policy`, reusing
what the active policy already compiled.

One reuse mechanism serves YAML and JSON alike: a compiled policy keeps a
*memory* of the text of each of its rules (for JSON, the snapshot's text and
where each rule lies in it, see :mod:`pdp.rules.jsondiff`; for a fully parsed
document, each rule's ``repr``). The next compile compares each position with
that memory, validates and compiles only the rules that changed, takes the
active policy's :class:`Rule` objects for the others, and patches its id map
and the index lists of the jurisdiction codes the change touched.

Side effects live here and only here: :func:`parse_policy` pauses the
process-wide cyclic garbage collector while it runs (see
:func:`_collector_paused`) and calls the caller's ``pace`` between steps.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import hashlib
import itertools
import json
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pdp.model import Action, Decision, Verdict
from pdp.rules.document import (
    MAX_SNAPSHOT_BYTES,
    DuplicateKeyError,
    decode_text,
    guess_format,
    parse_document,
    parse_text,
)
from pdp.rules.errors import SnapshotError
from pdp.rules.evaluate import Index, Policy, Rule, build_index
from pdp.rules.jsondiff import PACE_EVERY, JsonRules, JsonSource, split_json
from pdp.rules.text import MAX_SHADOW_ID_BYTES
from pdp.rules.validate import PRIORITY_LIMIT, Checker, Header, RuleSpec, check_header, check_rule

__all__ = ["Fingerprints", "load_policy", "parse_policy", "rank", "snapshot_as_json"]

_ALL_ACTIONS = int(Action.JOIN | Action.HOST)
_Pace = Callable[[], None]


def rank(priority: int, effect: Verdict, position: int) -> int:
    """An integer that orders rules as the semantics do, from one rule's own fields."""
    return ((PRIORITY_LIMIT - priority) << 33) | ((effect != Verdict.DENY) << 32) | position


def _ranked(spec: RuleSpec) -> Rule:
    """The final rule: its rank, its precomputed decision, whether finding it settles it."""
    if spec["effect"] == Verdict.DENY:
        reason = (
            spec["reason"] or f"participants located in {_places(spec['jurisdiction'])} are denied by rule {spec['id']}"
        )
    else:
        reason = spec["reason"] or f"exception granted by rule {spec['id']}"
    selectors = bool(spec["meeting_ids"]) + bool(spec["host_accounts"]) + bool(spec["tags"])
    settled = (
        spec["actions"] == _ALL_ACTIONS
        and spec["valid_from"] == -math.inf
        and spec["valid_until"] == math.inf
        and selectors <= 1
    )
    decision = Decision(spec["effect"], spec["id"], reason, spec["legal_basis"])
    return Rule(
        **spec, rank=rank(spec["priority"], spec["effect"], spec["position"]), decision=decision, settled=settled
    )


def _places(codes: Sequence[str]) -> str:
    """The codes of a jurisdiction for a generated reason, within a few hundred
    characters however many there are (the reason travels in every answer)."""
    shown = ", ".join(codes)
    if len(shown) <= 200:
        return shown
    head = shown[:200].rpartition(", ")[0]
    return f"{head} and {len(codes) - head.count(', ') - 1} more"


# --------------------------------------------------------------------------- where rules come from


@dataclass(frozen=True, slots=True)
class Fingerprints:
    """The memory of a fully parsed snapshot: each rule's ``repr``, by position.
    Strings, not tuples: the cyclic collector does not track them."""

    texts: tuple[str, ...]


class _RuleTexts(Protocol):
    """A snapshot's rules as compared with the active policy's memory."""

    count: int
    changed: list[int]  # positions to validate and compile; the rest are the previous rules

    def parse(self, position: int) -> object: ...

    def memory(self) -> JsonSource | Fingerprints: ...


class _ParsedRules:
    """The rules list of a fully parsed document (YAML, or JSON the stepwise
    reader declined), compared with ``base`` rule by rule."""

    def __init__(self, raws: list[object], base: Fingerprints | None, pace: _Pace) -> None:
        self._raws = raws
        self.count = len(raws)
        texts = []
        for position, raw in enumerate(raws):
            if position % PACE_EVERY == 0:
                pace()
            texts.append(repr(raw))
        self._texts = tuple(texts)
        old = base.texts if base is not None else ()
        self.changed = [p for p, text in enumerate(self._texts) if p >= len(old) or old[p] != text]

    def parse(self, position: int) -> object:
        return self._raws[position]

    def memory(self) -> Fingerprints:
        return Fingerprints(self._texts)


def _compile_rules(checker: Checker, texts: _RuleTexts, previous: Policy | None, pace: _Pace) -> list[Rule] | None:
    """The snapshot's rules: ``previous``'s where unchanged, the changed ones
    validated and compiled. None when a rule repeats a key, or, against a
    previous policy, when a changed rule has a problem or takes the id of an
    unchanged one: the caller then reads the whole snapshot afresh, so that the
    report is exactly a full read's.

    """
    count = texts.count
    rules: list[Rule | None] = list(previous.rules[:count]) if previous is not None else []
    rules += [None] * (count - len(rules))
    seen: dict[str, int] = {}
    for step, position in enumerate(texts.changed):
        if step % PACE_EVERY == 0:
            pace()
        try:
            raw = texts.parse(position)
        except DuplicateKeyError:
            return None
        spec = check_rule(checker, raw, position, seen)
        rules[position] = _ranked(spec) if spec is not None and not checker.problems else None
    if previous is not None and checker.shadow_reach:
        return None  # a shadow rule changed: how many reach each country is counted over them all
    _check_shadow_reach(checker)
    if checker.problems:
        return None if previous is not None else []
    if previous is not None:
        for rule_id in seen:
            other = previous.by_id.get(rule_id)
            if other is not None and other.position < count and rules[other.position] is other:
                return None
    return rules  # type: ignore[return-value]  # without a problem, every position holds a rule


def _check_shadow_reach(checker: Checker) -> None:
    """After every rule: record a problem for each country whose shadow rules' ids
    would take more than :data:`~pdp.rules.text.MAX_SHADOW_ID_BYTES` in an answer,
    at the first rule past the bound."""
    for country, reached in checker.shadow_reach.items():
        total = 0
        for count, (path, line, size) in enumerate(reached, 1):
            total += size
            if total > MAX_SHADOW_ID_BYTES:
                checker.fail(
                    path,
                    f"the {count} shadow rules up to this one reaching participants located in {country} list"
                    f" {total} bytes of ids in every answer there (each id and 2), at most {MAX_SHADOW_ID_BYTES}:"
                    " a CheckBatch answer of 1,000 participants must fit gRPC's 4 MiB message limit; use"
                    " shorter ids or fewer shadow rules",
                    line,
                )
                break


# --------------------------------------------------------------------------- assembling the policy


def _changes(rules: Sequence[Rule], previous: Policy) -> tuple[list[Rule], list[Rule]]:
    """(rules new in ``rules``, rules of ``previous`` gone from it), by identity:
    an unchanged rule is the same object at the same position. Compared in C
    (map, compress): this runs on every activation."""
    before = previous.rules
    differs = list(map(operator.is_not, rules, before))
    added = list(itertools.compress(rules, differs)) + list(rules[len(before) :])
    removed = list(itertools.compress(before, differs)) + list(before[len(rules) :])
    return added, removed


def _reindex(rules: Sequence[Rule], previous: Policy, affected: set[str], added: list[Rule]) -> Index:
    """``previous``'s index with the ``affected`` codes' lists rebuilt from
    their old rules still present and the ``added`` ones; every other code
    keeps its lists."""
    index = dict(previous.index)
    found: dict[int, Rule] = {}
    for code in affected:
        for bucket in index.pop(code, ()):
            for rule in bucket.rules() if bucket is not None else ():
                if rule.position < len(rules) and rules[rule.position] is rule:
                    found[id(rule)] = rule
    found.update((id(rule), rule) for rule in added)
    index.update(build_index(found.values(), affected))
    return index


def _assemble(
    header: Header,
    rules: list[Rule],
    sha256: str,
    memory: JsonSource | Fingerprints,
    previous: Policy | None,
    pace: _Pace,
) -> Policy:
    """The policy of ``rules``; with ``previous``, whose unchanged rules
    ``rules`` reuses as the same objects at the same positions, only what
    changed is built again. ``pace`` is called between the steps."""
    if previous is not None:
        added, removed = _changes(rules, previous)
        pace()
        if (len(added) + len(removed)) * 4 < len(rules):
            by_id = previous.by_id.copy()
            for rule in removed:
                del by_id[rule.id]
            by_id.update((rule.id, rule) for rule in added)
            pace()
            affected = {code for rule in added + removed for code in rule.jurisdiction}
            index = _reindex(rules, previous, affected, added)
            return Policy(
                header.version, rules, header.unknown_location, sha256, by_id=by_id, index=index, memory=memory
            )
    # Much changed, or nothing to start from: building anew is as quick.
    return Policy(header.version, rules, header.unknown_location, sha256, memory=memory)


# --------------------------------------------------------------------------- entry points


def parse_policy(
    data: bytes,
    source: str = "<snapshot>",
    fmt: str | None = None,
    *,
    pace: _Pace | None = None,
    previous: Policy | None = None,
    sha256: str = "",
) -> Policy:
    """Parse, validate and compile a snapshot given as bytes.

    ``fmt`` is ``"yaml"`` or ``"json"``; by default it is guessed from the
    ``source`` name's suffix, then from the first character. ``pace``, when
    given, is called every few hundred rules: a server passes a short sleep so
    that compiling a large snapshot shares the interpreter with requests.
    ``previous``, the active policy, lets rules that did not change (same text,
    same place) be reused instead of validated and compiled again. ``sha256``
    is the data's digest when the caller has computed it already.

    Pauses the process-wide cyclic garbage collector while it runs.

    :raises SnapshotError: listing every problem found, with lines for YAML.
    """
    with _collector_paused():
        try:
            return _parse_policy(data, fmt or guess_format(data, source), pace or _no_pause, previous, sha256)
        except SnapshotError as error:
            raise SnapshotError(source, error.problems) from None


def _no_pause() -> None:
    """The default pace: compile without stopping."""


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Compiling creates tens of thousands of acyclic objects; the cyclic
    collector would walk them over and over (a third of the time for 10,000
    rules) and find nothing to free."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _parse_policy(data: bytes, fmt: str, pace: _Pace, previous: Policy | None, sha256: str) -> Policy:
    """:func:`parse_policy` without the collector pause; problems carry no source name.

    :raises SnapshotError: every problem found.
    """
    text = decode_text(data)
    digest = sha256 or hashlib.sha256(data).hexdigest()
    memory = previous.memory if previous is not None else None
    if fmt == "json":
        document = split_json(text, memory if isinstance(memory, JsonSource) else None, pace)
        if document is not None:
            policy = _compile(document, digest, previous, pace)
            if policy is not None:
                return policy
        previous = None  # declined or doubtful: the full parser reads it all and names the problems
    document = parse_text(text, fmt)
    policy = _compile(document, digest, previous, pace)
    if policy is None:
        policy = _compile(document, digest, None, pace)
    assert policy is not None  # compiled afresh, a parsed document gives a policy or raises
    return policy


def _compile(document: object, sha256: str, previous: Policy | None, pace: _Pace) -> Policy | None:
    """The policy of a parsed document, reusing ``previous`` where its memory
    allows. None when it must be compiled afresh (see :func:`_compile_rules`).

    :raises SnapshotError: every problem found, when compiled afresh.
    """
    checker = Checker()
    header = check_header(checker, document)
    texts: _RuleTexts | None = None
    memory = previous.memory if previous is not None else None
    if header is not None and isinstance(header.rules, JsonRules):
        texts = header.rules
        previous = previous if isinstance(memory, JsonSource) else None
    elif header is not None and isinstance(header.rules, list):
        texts = _ParsedRules(header.rules, memory if isinstance(memory, Fingerprints) else None, pace)
        previous = previous if isinstance(memory, Fingerprints) else None
    rules = _compile_rules(checker, texts, previous, pace) if texts is not None else []
    if rules is None:
        return None
    if checker.problems or header is None or texts is None:
        raise SnapshotError("", checker.problems)
    return _assemble(header, rules, sha256, texts.memory(), previous, pace)


def snapshot_as_json(data: bytes, source: str = "<snapshot>") -> bytes:
    """The same snapshot as compact JSON, which sidecars compile several times
    faster than YAML (10,000 rules: about 0.16 s against 1.6 s).

    :raises SnapshotError: the snapshot is invalid (it is fully validated first).
    """
    parse_policy(data, source)
    document = parse_document(data, guess_format(data, source))

    def plain(value: object) -> object:
        if isinstance(value, dt.datetime):
            return value.isoformat()
        raise TypeError(f"{type(value).__name__} has no JSON form")

    return json.dumps(document, default=plain, ensure_ascii=False, separators=(",", ":")).encode()


def load_policy(path: str | Path) -> Policy:
    """Read and compile a snapshot file.

    :raises SnapshotError: the file is invalid (every problem listed).
    :raises OSError: the file cannot be read.
    """
    path = Path(path)
    with path.open("rb") as handle:
        data = handle.read(MAX_SNAPSHOT_BYTES + 1)
    return parse_policy(data, str(path))
