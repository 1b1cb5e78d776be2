"""The decision audit log: one JSON line per DENY and per shadow match.

ALLOWs are sampled (default: none). Participant, user and host account ids are
pseudonymised with HMAC-SHA256 under a key kept outside the log; raw IPs are
written only when explicitly asked for. Each record carries what replaying it
against another snapshot needs (``pdp snapshot impact``): the location codes,
the meeting's id, tags and host, the action, the time, the policy's version and
digest, and the ALLOW sampling rate in force, so that counts can be scaled.
Records leave the request path through a bounded queue: when it is full they
are dropped and counted, never waited for. A writer thread formats them and
hands them to :class:`pdp.audit_file.RecordFile`, which writes each whole or counts
it dropped, rotates the file by size, and outlives a failing disk.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import itertools
import json
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from pdp.audit_file import RecordFile
from pdp.errors import PdpError
from pdp.model import Action, Decision, Location, Verdict
from pdp.state import Active

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation


__all__ = ["AuditConfig", "AuditError", "AuditLog", "key_id", "pseudonym"]


class AuditError(PdpError):
    """The audit log cannot be set up (no key, unwritable path)."""


def pseudonym(key: bytes, value: str) -> str:
    """Stable, unlinkable-without-the-key stand-in for an id; empty stays empty."""
    if not value:
        return ""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]


def key_id(key: bytes) -> str:
    """Names the pseudonymisation key without revealing it, so a reader of the
    log can tell whether the key it holds is the one the log was written with."""
    return hmac.new(key, b"pdp audit key id", hashlib.sha256).hexdigest()[:16]


class MeetingFields(Protocol):
    """The meeting as the request carried it (``pb.Meeting`` and ``pdp.model.Meeting`` are both one)."""

    @property
    def meeting_id(self) -> str: ...

    @property
    def host_account_id(self) -> str: ...

    @property
    def tags(self) -> Collection[str]: ...


class _Pending(NamedTuple):
    """What the request path hands to the writer: references only, no formatting.

    Read by field name only. A NamedTuple because it is built on the request
    path, where a frozen dataclass costs twice as much to make.
    """

    time: float
    decision: Decision
    location: Location
    active: Active
    action: int
    meeting: MeetingFields
    ip: str
    user_id: str
    account_id: str
    enforced: bool  # log the verdict itself (a DENY, or a sampled ALLOW), not just shadow matches


@dataclass(frozen=True, slots=True)
class AuditConfig:
    target: str  # a path, or "stdout"
    hmac_key_file: str
    allow_sample_rate: float = 0.0
    include_ip: bool = False
    queue_size: int = 10_000
    max_bytes: int = 100 * 1024 * 1024
    backups: int = 5


class AuditLog:
    """A bounded deque plus a writer thread. :meth:`record` is called on the request path."""

    def __init__(self, config: AuditConfig) -> None:
        self.config = config
        try:
            self._key = Path(config.hmac_key_file).read_bytes().strip()
        except OSError as error:
            raise AuditError(f"audit HMAC key file {config.hmac_key_file}: {error.strerror or error}") from None
        if len(self._key) < 16:
            raise AuditError(f"audit HMAC key file {config.hmac_key_file}: use at least 16 bytes of key")
        self._key_id = key_id(self._key)
        self._pending: deque[_Pending] = deque()
        self._stopping = threading.Event()
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        try:
            self._file = RecordFile(config.target, config.max_bytes, config.backups)
        except OSError as error:
            raise AuditError(f"audit log {config.target}: {error.strerror or error}") from None
        self._full = 0  # records refused by a full queue, counted under _drops (request threads)
        self._drops = threading.Lock()
        self._unwritable = 0  # records that could not be formatted (the writer's count)
        # More fields for each record, computed by the writer (pdp.candidate sets it).
        self.annotate: Callable[[Location, int, MeetingFields, float], dict[str, Any]] | None = None
        self._thread = threading.Thread(target=self._write_loop, name="pdp-audit", daemon=True)
        self._thread.start()

    def instrument(self, meter: Meter) -> None:
        """Export ``pdp.audit.records`` (written and dropped) through ``meter``."""
        meter.create_observable_counter(
            "pdp.audit.records",
            callbacks=[self._observe_records],
            description="audit records written, and dropped (queue full or unwritable)",
        )

    @property
    def written(self) -> int:
        """Records written whole."""
        return self._file.written

    @property
    def dropped(self) -> int:
        """Records not written: the queue was full, or the file would not take them."""
        return self._full + self._unwritable + self._file.dropped

    def _observe_records(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        yield Observation(self.written, {"result": "written"})
        yield Observation(self.dropped, {"result": "dropped"})

    # ------------------------------------------------------------------ request path

    def record(
        self,
        decision: Decision,
        location: Location,
        active: Active,
        action: int,
        meeting: MeetingFields,
        ip: str,
        user_id: str,
        account_id: str,
    ) -> None:
        """Queue the decision if it is to be logged; never blocks."""
        enforced = decision.verdict == Verdict.DENY or bool(
            self.config.allow_sample_rate and random.random() < self.config.allow_sample_rate  # noqa: S311
        )
        if not (enforced or decision.shadow_rule_ids):
            return
        if len(self._pending) >= self.config.queue_size:
            with self._drops:  # only when dropping: the common path takes no lock
                self._full += 1
            return
        # A deque append is one atomic step: no lock, no wake-up of the writer.
        self._pending.append(
            _Pending(
                time=time.time(), decision=decision, location=location, active=active, action=action,
                meeting=meeting, ip=ip, user_id=user_id, account_id=account_id, enforced=enforced,
            )
        )  # fmt: skip

    # ------------------------------------------------------------------ writer

    def _lines(self, item: _Pending) -> list[str]:
        decision, location, active = item.decision, item.location, item.active
        base = {
            "time": dt.datetime.fromtimestamp(item.time, dt.UTC).isoformat(timespec="milliseconds"),
            "action": "join" if item.action == Action.JOIN else "host",
            "location": {"country": location.country, "subdivisions": list(location.subdivisions)},
            "meeting_id": item.meeting.meeting_id,
            "participant": pseudonym(self._key, str(item.account_id)),
            "user": pseudonym(self._key, str(item.user_id)),
            "policy_version": active.policy.version,
            "geoip_build": active.geo.build_epoch,
            # What a replay needs besides the above (pdp snapshot impact).
            "tags": sorted(set(item.meeting.tags)),  # as a set: a tag given twice is one
            "host_account": pseudonym(self._key, item.meeting.host_account_id),
            "policy_sha256": active.policy.sha256,
            "allow_sample_rate": self.config.allow_sample_rate,
            "hmac_key_id": self._key_id,
        }
        if self.annotate is not None:  # the candidate's verdict, with --candidate-snapshot
            base.update(self.annotate(location, item.action, item.meeting, item.time))
        if self.config.include_ip:
            base["ip"] = item.ip
        lines = []
        by_id = active.policy.by_id
        entries: list[tuple[str, str, str, str]] = []
        if item.enforced:
            entries.append(("enforce", decision.verdict.name, decision.rule_id, decision.legal_basis))
        for shadow_id in decision.shadow_rule_ids:
            shadow = by_id[shadow_id]
            entries.append(("shadow", shadow.effect.name, shadow_id, shadow.legal_basis))
        for mode, verdict, rule_id, legal_basis in entries:
            rule = by_id.get(rule_id)
            record = {
                "decision_id": f"{self._prefix}-{next(self._ids)}",
                "mode": mode,
                "verdict": verdict,
                "rule_id": rule_id,
                "legal_basis": legal_basis,
                "jurisdiction": list(rule.jurisdiction) if rule else [],
                **base,
            }
            lines.append(json.dumps(record, separators=(",", ":"), ensure_ascii=False))
        return lines

    def _write_loop(self) -> None:
        # The writer looks for records every 50 ms instead of being woken for each:
        # the request path then never touches a lock or a condition variable.
        while not self._stopping.wait(0.05):
            self._write_pending()
        self._write_pending()

    def _write_pending(self) -> None:
        pending = self._pending
        records: list[bytes] = []
        while pending:
            item = pending.popleft()
            try:
                records.append("".join(f"{line}\n" for line in self._lines(item)).encode())
            except Exception:  # one bad record must not stop the log
                self._unwritable += 1
        self._file.write(records)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop."""
        self._stopping.set()
        self._thread.join(timeout=timeout)
        if not self._thread.is_alive():  # else it still writes: leave it the file
            self._file.close()
