"""Following the store: fetch, verify, parse, validate and compile off the request
path, then one atomic swap. (The GeoIP database file is followed by
:mod:`pdp.geo_watch`.)

Rules that keep a fleet safe (learnt from OPA's and Cerbos's issue trackers):

- a source remembers what it fetched (ETag, file identity) only after the
  snapshot was activated, so a rejected one is fetched again;
- a lower version is a replay and is refused; the same content is a no-op;
- the same version with other content is a conflict and is refused, unless the
  active snapshot's bytes are a prefix of the new one's: then the active one was
  a truncated read (a writer that paused longer than a poll) and the complete
  one replaces it. A truncated copy never replaces the complete one;
- the last good snapshot is persisted atomically (a failed write is retried at
  every poll) and, at start, re-verified and made the floor: the store must
  offer it or a later version; stale-but-valid beats empty;
- nothing here ever blocks or fails a request: requests read one reference.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

from pdp import archive
from pdp.errors import PdpError
from pdp.files import NotPrivateError
from pdp.logs import redact_url
from pdp.pacing import in_background
from pdp.persisted import Persisted, StateDir
from pdp.poller import Poller as _Poller
from pdp.rules import Policy, SnapshotError, parse_policy, sniff_format
from pdp.signing import Opened, SignatureError, TrustedKeys, is_envelope, open_envelope
from pdp.sources import Fetched, Source, SourceError, snapshot_format
from pdp.state import PolicyHolder, ReloadStatus

__all__ = [
    "InitialOutcome",
    "Reloader",
    "SnapshotRejectedError",
    "StartupError",
    "Step",
    "read_snapshot",
]

log = logging.getLogger("pdp.reload")


class SnapshotRejectedError(PdpError):
    """A fetched snapshot was refused; the message says why."""


class StartupError(PdpError):
    """Nothing valid to serve at start (the store's snapshot is invalid and none was
    persisted), or a ``--state-dir`` that others could write."""


class Step(enum.Enum):
    """What one :meth:`Reloader.step` did."""

    ACTIVATED = "activated"
    UNCHANGED = "unchanged"  # nothing new, the same content again, or the same rejected bytes
    REJECTED = "rejected"
    FETCH_FAILED = "fetch failed"


class InitialOutcome(enum.Enum):
    """What :meth:`Reloader.initial` left active when the server starts."""

    STORE = "the store's snapshot"
    PERSISTED = "the persisted snapshot, marked stale"  # store unreachable, or its snapshot refused
    NOTHING = "no policy, NOT_SERVING until one can be fetched"


def read_snapshot(
    data: bytes,
    keys: TrustedKeys,
    source: str,
    pace: Callable[[], None] | None = None,
    previous: Policy | None = None,
    sha256: str = "",
    *,
    fmt: str | None = None,
    opened: Opened | None = None,
) -> Policy:
    """Verify (when keys are trusted) and compile snapshot bytes as stored.
    ``sha256``, the digest of ``data`` if known, saves hashing it again; ``fmt``
    (``"yaml"`` or ``"json"``) overrides the parser's guess from ``source`` and content;
    ``opened``, the contents of the envelope ``data`` is as its source opened them (a
    snapshot rebuilt from deltas, its payload's digest computed), saves parsing and
    hashing it again: only the signature over that digest is checked. The payload of a
    signed envelope is read in its own format, from its content: ``source`` and ``fmt``
    name the envelope, which is JSON whatever it carries.

    :raises SnapshotRejectedError: unsigned, unknown key, bad signature, envelope/payload
        version mismatch, or any rules-file problem (every one listed).
    """
    try:
        if opened is None and keys:
            opened = keys.open(data)
        elif opened is None and is_envelope(data):
            opened = open_envelope(data)  # no key to check against: payload only
        elif opened is None:
            return parse_policy(data, source, fmt, pace=pace, previous=previous, sha256=sha256)
        elif keys:  # a source's word is not enough: its signature over the payload's digest is checked here too
            keys.check(opened.key_id, opened.version, opened.sha256, opened.signature)
        payload_format = sniff_format(opened.payload)
        policy = parse_policy(
            opened.payload, source, payload_format, pace=pace, previous=previous, sha256=opened.sha256
        )
    except SignatureError as error:
        raise SnapshotRejectedError(f"{source}: {error}") from None
    except SnapshotError as error:
        raise SnapshotRejectedError(str(error)) from None
    if policy.version != opened.version:
        raise SnapshotRejectedError(
            f"{source}: envelope says version {opened.version}, the rules inside say {policy.version}"
        )
    return policy


class Reloader(_Poller):
    """Follows one source; :meth:`step` is one fetch-and-maybe-activate."""

    name = "pdp-reloader"
    what = "policy"  # in the logs: "candidate" for pdp serve --candidate-snapshot

    def __init__(
        self,
        holder: PolicyHolder,
        source: Source,
        *,
        keys: TrustedKeys | None = None,
        state_dir: str | Path | None = None,
        poll_seconds: float = 2.0,
        max_backoff_seconds: float = 60.0,
    ) -> None:
        self.holder = holder
        self.source = source
        self.keys = keys or TrustedKeys()
        self.state = StateDir(Path(state_dir)) if state_dir else None
        self.poll_seconds = poll_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.status: ReloadStatus = holder.status
        self.status.source = redact_url(source.url)
        super().__init__()
        self._format = snapshot_format(source.url)
        self._failures = 0
        self._rejected_sha = ""
        self._active_bytes: tuple[int, str] = (0, "")  # length and SHA-256 of the active snapshot as fetched
        self._unsaved: Persisted | None = None
        self._save_error = ""

    # ------------------------------------------------------------------ steps

    def run_once(self) -> str:
        """Fetch once; activate if new and valid. Returns what happened, in words."""
        return self.step()[1]

    def step(self) -> tuple[Step, str]:
        """Fetch once; activate if new and valid; retry a failed persist."""
        self.status.last_fetch_at = time.time()
        self._save()
        try:
            fetched = self.source.fetch()
        except SourceError as error:
            self._failures += 1
            self.status.fetch_errors += 1
            self.status.stale = True
            return self._result(Step.FETCH_FAILED, f"error: {error}", error=str(error))
        self._failures = 0
        self.status.stale = False
        if fetched is None:
            return self._result(Step.UNCHANGED, "unchanged")
        digest = fetched.sha256
        if digest == self._rejected_sha:
            return self._result(Step.UNCHANGED, "unchanged (still rejected)")
        if fetched.fallback:  # deltas were announced but could not be used: this is the full snapshot
            self.status.delta_fallbacks += 1
            self.status.last_delta_fallback = fetched.fallback
            log.warning("deltas not used, the full snapshot was fetched: %s", fetched.fallback)
        started = time.perf_counter()
        try:
            with in_background() as pace:
                policy = read_snapshot(
                    fetched.data,
                    self.keys,
                    self.status.source,
                    pace,
                    previous=self.holder.policy,
                    sha256=digest,
                    fmt=self._format,
                    opened=fetched.opened,
                )
            self.status.last_compile_ms = round((time.perf_counter() - started) * 1000, 1)
            return self._offer(policy, fetched)
        except SnapshotRejectedError as error:
            self._rejected_sha = digest
            self.status.rejections += 1
            log.warning("%s snapshot rejected, version %s stays: %s", self.what, self._active_version(), error)
            return self._result(Step.REJECTED, f"rejected: {error}", error=str(error))

    def _offer(self, policy: Policy, fetched: Fetched) -> tuple[Step, str]:
        current = self.holder.policy
        completes = False
        if current is not None:
            if policy.sha256 == current.sha256:
                self.source.commit(fetched)
                return self._result(Step.UNCHANGED, f"unchanged content (version {policy.version})")
            if policy.version < current.version:
                raise SnapshotRejectedError(
                    f"version {policy.version} is lower than the active {current.version} (replay)"
                )
            completes = policy.version == current.version
            if completes and not self._completes_active(fetched.data):
                raise SnapshotRejectedError(f"version {policy.version} is already active with other content (conflict)")
        self.holder.activate_policy(policy, self.status.source)
        self.source.commit(fetched)
        self._active_bytes = (len(fetched.data), fetched.sha256)
        self._rejected_sha = ""
        self.status.activations += 1
        self.status.last_error = ""
        log.info(
            "activated %s version %d (%d rules) from %s, compiled in %.0f ms",
            self.what,
            policy.version,
            len(policy.rules),
            self.status.source,
            self.status.last_compile_ms,
        )
        if completes:
            log.warning("version %d was a truncated read; the complete snapshot replaces it", policy.version)
        self._persist(fetched, policy)
        done = f" (it completes the truncated version {policy.version} that was active)" if completes else ""
        if fetched.deltas:
            self.status.delta_activations += 1
            done += f" (from {fetched.deltas} delta{'s' if fetched.deltas > 1 else ''})"
        return self._result(Step.ACTIVATED, f"activated version {policy.version}{done}")

    def _completes_active(self, data: bytes) -> bool:
        """Whether the active snapshot's bytes are a strict prefix of ``data``."""
        size, digest = self._active_bytes
        return bool(digest) and len(data) > size and hashlib.sha256(data[:size]).hexdigest() == digest

    def _result(self, step: Step, text: str, *, error: str = "") -> tuple[Step, str]:
        self.status.last_fetch_result = text
        if error:
            self.status.last_error = error
        return step, text

    def _active_version(self) -> str:
        policy = self.holder.policy
        return str(policy.version) if policy else "none"

    # ------------------------------------------------------------------ start

    def initial(self) -> InitialOutcome:
        """First load at start-up, before serving.

        The persisted snapshot (re-verified) is activated first and is the floor:
        the store's replaces it only when it is a later version (or completes it,
        see the module's rules). If the store is unreachable or its snapshot
        refused, the persisted one serves, marked stale. With neither, nothing
        is active (health stays NOT_SERVING) while the store is unreachable, and
        the loop keeps trying.

        :raises StartupError: the store's snapshot is invalid and nothing is persisted,
            or others could write the state directory or a file in it.
        """
        persisted = self._start_from_state_dir()
        step, result = self.step()
        if step in (Step.ACTIVATED, Step.UNCHANGED) and self.holder.policy is not None:
            return InitialOutcome.STORE
        if persisted is not None:
            self.status.stale = True
            log.warning("serving the persisted snapshot, version %d, marked stale: %s", persisted.version, result)
            return InitialOutcome.PERSISTED
        if step is Step.REJECTED:
            raise StartupError(self.status.last_error)
        log.warning("no %s yet (%s); not serving it until one can be fetched", self.what, result)
        return InitialOutcome.NOTHING

    def _start_from_state_dir(self) -> Policy | None:
        """Check and clean the state directory; activate the persisted snapshot, if any and valid.

        :raises StartupError: others could write the directory or a file in it.
        """
        if self.state is None:
            return None
        try:
            self.state.prepare()
            persisted = self.state.load()
        except NotPrivateError as error:
            raise StartupError(
                f"{error} (pdp trusts the snapshot it keeps in --state-dir: only its own user may write there)"
            ) from None
        except OSError as error:
            self.status.last_error = f"cannot use the state directory {self.state.path}: {error.strerror or error}"
            log.error("%s", self.status.last_error)
            return None
        if persisted is None:
            return None
        if persisted.source != self.status.source:
            log.warning("persisted snapshot came from %s, not %s; not used", persisted.source, self.status.source)
            return None
        try:
            # Read as it was the first time: the same name and format, so the same parse.
            policy = read_snapshot(persisted.data, self.keys, self.status.source, fmt=persisted.format)
        except SnapshotRejectedError as error:
            log.error("persisted snapshot fails verification, not used: %s", error)
            return None
        self.holder.activate_policy(policy, self.status.source)
        self._active_bytes = (len(persisted.data), persisted.sha256)
        log.info("persisted snapshot version %d loaded: the store must offer it or a later one", policy.version)
        return policy

    # ------------------------------------------------------------------ persistence

    def _persist(self, fetched: Fetched, policy: Policy) -> None:
        if self.state is not None:
            self._unsaved = Persisted(fetched.data, self.status.source, policy.version, fetched.sha256, self._format)
            self._save()
            try:  # the audit log names this policy: keep it findable for replays (pdp snapshot impact)
                archive.keep(self.state.path, fetched.data, policy.version, policy.sha256, self._format)
            except OSError as error:
                log.warning("cannot archive snapshot version %d: %s", policy.version, error.strerror or error)

    def _save(self) -> None:
        """Write the newest activated snapshot if it is not on disk yet; a failure is
        said in ``last_error`` and retried at the next step."""
        if self.state is None or self._unsaved is None:
            return
        try:
            self.state.save(self._unsaved)
        except (OSError, NotPrivateError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            message = f"cannot persist the snapshot in {self.state.path}: {reason}; retried at the next poll"
            if message != self._save_error:
                log.error("%s", message)  # once per reason, not at every poll
            # Serving the new policy matters more than remembering it.
            self.status.last_error = self._save_error = message
            return
        self._unsaved = None
        if self._save_error and self.status.last_error == self._save_error:
            self.status.last_error = ""
        self._save_error = ""

    # ------------------------------------------------------------------ loop

    def next_wait(self) -> float:
        """Seconds until the next poll: the interval, or a capped exponential
        backoff after failures; with jitter so a fleet does not poll in step."""
        base = self.poll_seconds * (2 ** min(self._failures, 16)) if self._failures else self.poll_seconds
        return min(base, max(self.max_backoff_seconds, self.poll_seconds)) * random.uniform(0.8, 1.2)  # noqa: S311

    def _wait(self) -> None:
        self.source.wait(self.next_wait())  # a Redis notice or close() ends the wait early

    def stop(self) -> None:
        self._stopping.set()  # before close() wakes the wait, so no step runs on a closed source
        self.source.close()
        super().stop()
