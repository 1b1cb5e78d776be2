"""Reading audit logs: one typed :class:`Record` per JSON line, read tolerantly.

Fields this module does not know are ignored, so that a later audit format with
more fields still reports; optional fields may be missing. What a report cannot
do without (``time``, ``verdict``, ``rule_id``) and fields of the wrong type are
errors that name the file and line: a report counted from half-understood
records would be worse than none.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdp.errors import PdpError

__all__ = ["Record", "ReportError", "load", "moment", "read_records", "rfc3339"]

_VERDICTS = frozenset({"ALLOW", "DENY"})
_MODES = frozenset({"enforce", "shadow"})


class ReportError(PdpError):
    """An audit log, a snapshot or an option cannot be used (the message names which and where)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One audit record, as much of it as a report uses.

    ``rule_id`` is empty when no rule decided (the policy default, or a sampled
    ALLOW); ``jurisdiction`` is the deciding rule's, as the server wrote it.
    """

    time: dt.datetime  # aware, UTC
    verdict: str  # ALLOW | DENY
    mode: str  # enforce | shadow
    rule_id: str
    legal_basis: str
    jurisdiction: tuple[str, ...]
    country: str
    subdivisions: tuple[str, ...]
    meeting_id: str
    participant: str
    policy_version: int | None
    decision_id: str
    where: str  # file:line, to point at a record

    @property
    def codes(self) -> frozenset[str]:
        """The codes a jurisdiction is matched against (none when the country is unknown)."""
        return frozenset((self.country, *self.subdivisions)) if self.country else frozenset()


def moment(text: str, what: str) -> dt.datetime:
    """An RFC 3339 time (or a date) as an aware UTC datetime; without an offset, UTC is meant.

    :raises ReportError: ``text`` is not such a time (the message starts with ``what``).
    """
    try:
        parsed = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise ReportError(f"{what}: {text!r} is not a time like 2026-11-01T00:00:00Z") from None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


def rfc3339(when: dt.datetime) -> str:
    """``when`` in UTC to the second, the way people read it: 2026-06-01T10:00:00Z."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_records(paths: Iterable[str | Path]) -> Iterator[dict[str, Any]]:
    """Every JSON line of every file, as it was written (blank lines skipped).

    :raises ReportError: a file is unreadable, or a line is not a JSON object with
        ``time``, ``verdict`` and ``rule_id``.
    """
    for _path, _number, record in _lines(paths):
        yield record


def _lines(paths: Iterable[str | Path]) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    for name in paths:
        path = Path(name)
        try:
            handle = path.open(encoding="utf-8")  # closed by the with below; open errors named first
        except OSError as error:
            raise ReportError(f"{path}: {error.strerror or error}") from None
        with handle:
            try:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ReportError(f"{path}:{number}: not a JSON line ({error.msg})") from None
                    if not isinstance(record, dict) or not {"time", "verdict", "rule_id"} <= record.keys():
                        raise ReportError(f"{path}:{number}: not an audit record (needs time, verdict and rule_id)")
                    yield path, number, record
            except UnicodeDecodeError:
                raise ReportError(f"{path}: not UTF-8 text") from None


def load(paths: Iterable[str | Path]) -> list[Record]:
    """Every record of every file, typed.

    :raises ReportError: as :func:`read_records`, or a field has the wrong type or value.
    """
    return [_typed(record, f"{path}:{number}") for path, number, record in _lines(paths)]


def _typed(raw: dict[str, Any], where: str) -> Record:
    fields = _Fields(raw, where)
    verdict = fields.text("verdict", required=True)
    mode = fields.text("mode") or "enforce"
    if verdict not in _VERDICTS:
        raise ReportError(f"{where}: verdict {verdict!r} is not ALLOW or DENY")
    if mode not in _MODES:
        raise ReportError(f"{where}: mode {mode!r} is not enforce or shadow")
    location = raw.get("location")
    location = {} if location is None else location
    if not isinstance(location, dict):
        raise ReportError(f"{where}: location must be an object")
    place = _Fields(location, f"{where}: location")
    version = raw.get("policy_version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise ReportError(f"{where}: policy_version must be an integer")
    return Record(
        time=moment(raw["time"], f"{where}: time"),
        verdict=verdict,
        mode=mode,
        rule_id=fields.text("rule_id", required=True),
        legal_basis=fields.text("legal_basis"),
        jurisdiction=fields.codes("jurisdiction"),
        country=place.text("country"),
        subdivisions=place.codes("subdivisions"),
        meeting_id=fields.text("meeting_id"),
        participant=fields.text("participant"),
        policy_version=version,
        decision_id=fields.text("decision_id"),
        where=where,
    )


class _Fields:
    """Typed access to one JSON object's fields, with errors naming the record."""

    def __init__(self, raw: dict[str, Any], where: str) -> None:
        self.raw, self.where = raw, where

    def text(self, name: str, *, required: bool = False) -> str:
        value = self.raw.get(name)
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            raise ReportError(f"{self.where}: {name} must be a string")
        return value

    def codes(self, name: str) -> tuple[str, ...]:
        value = self.raw.get(name)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(code, str) for code in value):
            raise ReportError(f"{self.where}: {name} must be a list of codes")
        return tuple(value)
