"""Reading audit logs for a replay: every recorded decision, nothing else, never a crash.

A log is read as it is found in the field: rotated files, gzip (by its magic
bytes, whatever the name), a last line cut short by a crash or a full disk,
lines of another program's log, records of an older pdp that did not yet write
what a replay needs. Each line that cannot be replayed is counted under one
:data:`SKIP_KINDS` and skipped, with ``file:line`` kept for the first few; the
replay then says exactly how much of the log it saw.

Only ``mode: enforce`` records are decisions: a DENY is always recorded and an
ALLOW only at the recorded ``allow_sample_rate``, so a record stands for
``1 / rate`` ALLOWs (:attr:`Recorded.weight`). ``mode: shadow`` lines repeat a
decision's shadow matches and are not counted again.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import math
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pdp.model import Action, Location, Meeting, Verdict

__all__ = ["SKIP_KINDS", "LogError", "LogReader", "Recorded"]

MAX_LINE_BYTES = 1 << 20  # a record is a few KB at most (64 tags of 128 characters)
SAMPLES_KEPT = 10
SKIP_KINDS = {
    "malformed": "not a JSON object, not UTF-8, or a field of the wrong type",
    "truncated": "cut short (the file's last line without its end, or a gzip stream that stops)",
    "foreign": "JSON, but not a pdp audit record",
    "old format": "a pdp audit record without the fields a replay needs (written before pdp recorded them)",
    "other key": "pseudonymised with another HMAC key than --audit-hmac-key-file: its host would not match",
}
_ACTIONS = {"join": int(Action.JOIN), "host": int(Action.HOST)}
_VERDICTS = {"ALLOW": Verdict.ALLOW, "DENY": Verdict.DENY}
_REPLAY_FIELDS = ("tags", "host_account", "policy_sha256", "allow_sample_rate")


class LogError(Exception):
    """A log file cannot be opened at all (the message names it)."""


class _SkipLine(Exception):  # noqa: N818  # control flow, not an error
    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Recorded:
    """One recorded decision, ready to be decided again."""

    where: str  # file:line
    decision_id: str
    time: float  # Unix seconds
    action: int
    location: Location
    meeting: Meeting  # host_account_id is the log's pseudonym
    participant: str  # pseudonym
    verdict: Verdict
    rule_id: str
    legal_basis: str
    jurisdiction: tuple[str, ...]  # of the deciding rule, as recorded
    policy_version: int
    policy_sha256: str
    allow_sample_rate: float
    hmac_key_id: str

    @property
    def weight(self) -> float:
        """How many decisions this record stands for: 1 for a DENY, 1/rate for a sampled ALLOW."""
        return 1.0 if self.verdict == Verdict.DENY else 1.0 / self.allow_sample_rate


@dataclass
class LogReader:
    """Reads logs and keeps the tally of what it skipped."""

    since: float = -math.inf
    until: float = math.inf
    key_id: str = ""  # when set, records pseudonymised under another key are skipped
    files: list[str] = field(default_factory=list)
    lines: int = 0
    shadow_lines: int = 0
    outside_period: int = 0
    duplicates: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_KINDS, 0))
    examples: dict[str, list[str]] = field(default_factory=lambda: {kind: [] for kind in SKIP_KINDS})
    _seen: set[str] = field(default_factory=set, repr=False)

    def read(self, paths: Iterable[str | Path]) -> Iterator[Recorded]:
        """Every replayable decision of every file, each file once, in the order given.

        :raises LogError: a file cannot be opened (missing, a directory, no permission).
        """
        done: set[Path] = set()
        for name in paths:
            path = Path(name)
            try:
                real = path.resolve()
            except OSError as error:
                raise LogError(f"{path}: {error.strerror or error}") from None
            if real in done:
                continue
            done.add(real)
            self.files.append(str(path))
            yield from self._read_file(path)

    def _read_file(self, path: Path) -> Iterator[Recorded]:
        try:
            raw = path.open("rb")
        except OSError as error:
            raise LogError(f"{path}: {error.strerror or error}") from None
        with raw:
            try:
                compressed = raw.read(2) == b"\x1f\x8b"
                raw.seek(0)
            except OSError as error:
                raise LogError(f"{path}: {error.strerror or error}") from None
            stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw  # type: ignore[assignment]  # both read bytes
            number = 0
            while True:
                number += 1
                try:
                    line = stream.readline(MAX_LINE_BYTES)
                except (EOFError, OSError, zlib.error) as error:
                    self._skip(f"{path}:{number}", "truncated", f"the gzip stream stops ({error})")
                    return
                if not line:
                    return
                if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
                    self._discard_rest(stream)
                    self.lines += 1
                    self._skip(f"{path}:{number}", "malformed", f"longer than {MAX_LINE_BYTES} bytes")
                    continue
                record = self._line(line, f"{path}:{number}")
                if record is not None:
                    yield record

    @staticmethod
    def _discard_rest(stream: IO[bytes]) -> None:
        """Skip to the end of an over-long line (a stream error ends the file at the next read)."""
        while True:
            try:
                chunk = stream.readline(MAX_LINE_BYTES)
            except (EOFError, OSError, zlib.error):
                return
            if not chunk or chunk.endswith(b"\n"):
                return

    def _line(self, line: bytes, where: str) -> Recorded | None:
        if not line.strip():
            return None
        self.lines += 1
        try:
            document = _document(line)
            if document.get("mode") == "shadow":
                self.shadow_lines += 1
                return None
            record = _recorded(document, where)
        except _SkipLine as skip:
            self._skip(where, skip.kind, str(skip))
            return None
        if self.key_id and record.hmac_key_id and record.hmac_key_id != self.key_id:
            self._skip(where, "other key", f"hmac_key_id {record.hmac_key_id}, the key given is {self.key_id}")
            return None
        if not self.since <= record.time < self.until:
            self.outside_period += 1
            return None
        if record.decision_id:
            if record.decision_id in self._seen:
                self.duplicates += 1  # the same file passed twice under two names, or copied by a rotation
                return None
            self._seen.add(record.decision_id)
        return record

    def _skip(self, where: str, kind: str, why: str) -> None:
        self.skipped[kind] += 1
        if len(self.examples[kind]) < SAMPLES_KEPT:
            self.examples[kind].append(f"{where}: {why}")

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


def _document(line: bytes) -> dict[str, Any]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise _SkipLine("malformed", "not UTF-8") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if not line.endswith(b"\n"):
            raise _SkipLine("truncated", f"ends mid-record ({error.msg})") from None
        raise _SkipLine("malformed", f"not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(document, dict):
        raise _SkipLine("foreign", f"a JSON {type(document).__name__}, not an audit record")
    if not {"time", "verdict", "rule_id", "decision_id"} <= document.keys():
        raise _SkipLine("foreign", "no time, verdict, rule_id and decision_id: not a pdp audit record")
    return document


def _recorded(document: dict[str, Any], where: str) -> Recorded:
    missing = [name for name in _REPLAY_FIELDS if name not in document]
    if missing:
        raise _SkipLine("old format", f"no {', '.join(missing)}")
    location = _get(document, "location", dict)
    country = _get(location, "country", str, "location.country")
    subdivisions = _strings(location.get("subdivisions", []), "location.subdivisions")
    verdict = _VERDICTS.get(_get(document, "verdict", str))
    action = _ACTIONS.get(_get(document, "action", str))
    if verdict is None or action is None:
        raise _SkipLine("malformed", "verdict is not ALLOW or DENY, or action not join or host")
    rate = _get(document, "allow_sample_rate", (int, float))
    if isinstance(rate, bool) or not 0 <= rate <= 1 or (verdict == Verdict.ALLOW and rate == 0):
        raise _SkipLine("malformed", f"allow_sample_rate {rate!r} is not a rate this record could be written at")
    version = _get(document, "policy_version", int)
    if isinstance(version, bool):
        raise _SkipLine("malformed", "policy_version is not an integer")
    return Recorded(
        where=where,
        decision_id=_get(document, "decision_id", str),
        time=_time(_get(document, "time", str)),
        action=action,
        location=Location(country, subdivisions) if country else Location(),
        meeting=Meeting(
            _get(document, "meeting_id", str),
            _get(document, "host_account", str),
            frozenset(_strings(document["tags"], "tags")),
        ),
        participant=_get(document, "participant", str),
        verdict=verdict,
        rule_id=_get(document, "rule_id", str),
        legal_basis=_get(document, "legal_basis", str),
        jurisdiction=_strings(document.get("jurisdiction", []), "jurisdiction"),
        policy_version=version,
        policy_sha256=_get(document, "policy_sha256", str),
        allow_sample_rate=float(rate),
        hmac_key_id=str(document.get("hmac_key_id", "")),
    )


def _get(document: dict[str, Any], name: str, kind: type | tuple[type, ...], label: str = "") -> Any:
    value = document.get(name)
    if not isinstance(value, kind):
        raise _SkipLine("malformed", f"{label or name} is missing or of the wrong type")
    return value


def _strings(value: object, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _SkipLine("malformed", f"{name} is not a list of strings")
    return tuple(value)


def _time(text: str) -> float:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise _SkipLine("malformed", f"time {text!r} is not RFC 3339") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()
