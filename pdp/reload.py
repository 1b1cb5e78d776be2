"""Following the store: fetch, verify, parse, validate and compile off the request
path, then one atomic swap; and the same for the GeoIP database file.

Rules that keep a fleet safe (learnt from OPA's and Cerbos's issue trackers):

- a source remembers what it fetched (ETag, file identity) only after the
  snapshot was activated, so a rejected one is fetched again;
- a lower version is a replay and is refused; the same version with other
  content is a conflict and is refused; the same content is a no-op;
- the last good snapshot is persisted atomically and re-verified at start;
  stale-but-valid beats empty;
- nothing here ever blocks or fails a request: requests read one reference.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pdp import archive
from pdp.files import atomic_write
from pdp.files import identity as file_identity
from pdp.geo import GeoDatabase, GeoIPError, read_pinned_sha256
from pdp.logs import redact_url
from pdp.pacing import in_background
from pdp.policy import PolicyHolder, ReloadStatus
from pdp.rules import Policy, SnapshotError, parse_policy
from pdp.signing import SignatureError, TrustedKeys, is_envelope, open_envelope
from pdp.sources import Fetched, Source, SourceError

__all__ = ["GeoWatcher", "Reloader", "SnapshotRejectedError", "StartupError", "read_snapshot"]

log = logging.getLogger("pdp.reload")

PERSISTED = "snapshot"
PERSISTED_META = "snapshot.meta.json"


class SnapshotRejectedError(Exception):
    """A fetched snapshot was refused; the message says why."""


class StartupError(Exception):
    """Nothing valid to serve at start: the store's snapshot is invalid and none was persisted."""


def read_snapshot(
    data: bytes,
    keys: TrustedKeys,
    source: str,
    pace: Callable[[], None] | None = None,
    previous: Policy | None = None,
    sha256: str = "",
) -> Policy:
    """Verify (when keys are trusted) and compile snapshot bytes as stored.
    ``sha256``, the digest of ``data`` if known, saves hashing it again.

    :raises SnapshotRejectedError: unsigned, unknown key, bad signature, envelope/payload
        version mismatch, or any rules-file problem (every one listed).
    """
    try:
        if keys:
            opened = keys.open(data)
        elif is_envelope(data):
            opened = open_envelope(data)  # no key to check against: payload only
        else:
            return parse_policy(data, source, pace=pace, previous=previous, sha256=sha256)
        policy = parse_policy(opened.payload, source, pace=pace, previous=previous)
    except SignatureError as error:
        raise SnapshotRejectedError(f"{source}: {error}") from None
    except SnapshotError as error:
        raise SnapshotRejectedError(str(error)) from None
    if policy.version != opened.version:
        raise SnapshotRejectedError(
            f"{source}: envelope says version {opened.version}, the rules inside say {policy.version}"
        )
    return policy


class _Poller:
    """A daemon thread calling :meth:`run_once` after each :meth:`_wait` until stopped."""

    name = "pdp-poller"

    def __init__(self) -> None:
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> str:
        raise NotImplementedError

    def _wait(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wait()
            if self._stopping.is_set():
                break
            try:
                self.run_once()
            except Exception:  # a bug in one step must not end the polling
                log.exception("%s: step failed", self.name)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


class Reloader(_Poller):
    """Follows one source; :meth:`run_once` is one fetch-and-maybe-activate step."""

    name = "pdp-reloader"

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
        self.state_dir = Path(state_dir) if state_dir else None
        self.poll_seconds = poll_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.status: ReloadStatus = holder.status
        self.status.source = redact_url(source.url)
        super().__init__()
        self._failures = 0
        self._rejected_sha = ""

    # ------------------------------------------------------------------ steps

    def run_once(self) -> str:
        """Fetch once; activate if new and valid. Returns what happened, in words."""
        self.status.last_fetch_at = time.time()
        try:
            fetched = self.source.fetch()
        except SourceError as error:
            self._failures += 1
            self.status.fetch_errors += 1
            self.status.stale = True
            return self._result(f"error: {error}", error=str(error))
        self._failures = 0
        self.status.stale = False
        if fetched is None:
            return self._result("unchanged")
        digest = fetched.sha256
        if digest == self._rejected_sha:
            return self._result("unchanged (still rejected)")
        started = time.perf_counter()
        try:
            with in_background() as pace:
                policy = read_snapshot(
                    fetched.data, self.keys, self.status.source, pace, previous=self.holder.policy, sha256=digest
                )
            self.status.last_compile_ms = round((time.perf_counter() - started) * 1000, 1)
            outcome = self._offer(policy, fetched)
        except SnapshotRejectedError as error:
            self._rejected_sha = digest
            self.status.rejections += 1
            log.warning("snapshot rejected, version %s stays active: %s", self._active_version(), error)
            return self._result(f"rejected: {error}", error=str(error))
        return self._result(outcome)

    def _offer(self, policy: Policy, fetched: Fetched) -> str:
        current = self.holder.policy
        if current is not None:
            if policy.sha256 == current.sha256:
                self.source.commit(fetched)
                return f"unchanged content (version {policy.version})"
            if policy.version < current.version:
                raise SnapshotRejectedError(
                    f"version {policy.version} is lower than the active {current.version} (replay)"
                )
            if policy.version == current.version:
                raise SnapshotRejectedError(f"version {policy.version} is already active with other content (conflict)")
        self.holder.activate_policy(policy, self.status.source)
        self.source.commit(fetched)
        self._rejected_sha = ""
        self.status.activations += 1
        self.status.last_error = ""
        log.info(
            "activated policy version %d (%d rules) from %s, compiled in %.0f ms",
            policy.version,
            len(policy.rules),
            self.status.source,
            self.status.last_compile_ms,
        )
        self._persist(fetched.data, policy)
        return f"activated version {policy.version}"

    def _result(self, text: str, *, error: str = "") -> str:
        self.status.last_fetch_result = text
        if error:
            self.status.last_error = error
        return text

    def _active_version(self) -> str:
        policy = self.holder.policy
        return str(policy.version) if policy else "none"

    # ------------------------------------------------------------------ start

    def initial(self) -> None:
        """First load at start-up, before serving.

        Activates the store's snapshot; if the store is unreachable or its
        snapshot invalid, the persisted one (re-verified, marked stale). With
        neither, returns without activating (health stays NOT_SERVING) when the
        store is unreachable, so the loop keeps trying.

        :raises StartupError: the store's snapshot is invalid and nothing is persisted.
        """
        result = self.run_once()
        if result.startswith(("activated", "unchanged")):
            return
        persisted = self._load_persisted()
        if persisted is not None:
            self.holder.activate_policy(persisted, self.status.source)
            self.status.stale = True
            log.warning("serving the persisted snapshot, version %d, marked stale: %s", persisted.version, result)
            return
        if result.startswith("rejected"):
            raise StartupError(self.status.last_error)
        log.warning("no policy yet (%s); not serving until one can be fetched", result)

    # ------------------------------------------------------------------ persistence

    def _persist(self, data: bytes, policy: Policy) -> None:
        if self.state_dir is None:
            return
        meta = {"source": self.status.source, "version": policy.version, "sha256": policy.sha256}
        try:
            atomic_write(self.state_dir / PERSISTED, data)
            atomic_write(self.state_dir / PERSISTED_META, json.dumps(meta).encode())
            # The audit log names this policy: keep it findable for replays (pdp snapshot impact).
            archive.keep(self.state_dir, data, policy.version, policy.sha256)
        except OSError as error:
            # Serving the new policy matters more than remembering it.
            self.status.last_error = f"cannot persist the snapshot in {self.state_dir}: {error.strerror or error}"
            log.error("%s", self.status.last_error)

    def _load_persisted(self) -> Policy | None:
        if self.state_dir is None:
            return None
        try:
            meta = json.loads((self.state_dir / PERSISTED_META).read_bytes())
            data = (self.state_dir / PERSISTED).read_bytes()
        except (OSError, ValueError):
            return None
        if meta.get("source") != self.status.source:
            log.warning("persisted snapshot came from %s, not %s; not used", meta.get("source"), self.status.source)
            return None
        try:
            return read_snapshot(data, self.keys, str(self.state_dir / PERSISTED))
        except SnapshotRejectedError as error:
            log.error("persisted snapshot fails verification, not used: %s", error)
            return None

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


class GeoWatcher(_Poller):
    """Reopens the GeoIP database when its file is replaced (geoipupdate renames
    a new file in); a file that fails the checks is refused until it changes again."""

    name = "pdp-geoip-watcher"

    def __init__(
        self, holder: PolicyHolder, path: str, *, cache_size: int, poll_seconds: float = 5.0, sha256_file: str = ""
    ) -> None:
        """``sha256_file``, when set, pins the digest a new database must have;
        a change to either file is a change (write the digest, then rename the
        database in, or the other way round: the pair is checked again)."""
        self.holder = holder
        self.path = path
        self.cache_size = cache_size
        self.poll_seconds = poll_seconds
        self.sha256_file = sha256_file
        self._seen = self._identity()
        super().__init__()

    def _identity(self) -> object:
        database = file_identity(self.path)
        if database is None or not self.sha256_file:
            return database
        return (database, file_identity(self.sha256_file))

    def run_once(self) -> str:
        identity = self._identity()
        if identity is None or identity == self._seen:
            return "unchanged" if identity else "missing: the current database keeps serving"
        self._seen = identity
        status = self.holder.status
        try:
            pinned = read_pinned_sha256(self.sha256_file) if self.sha256_file else ""
            geo = GeoDatabase(self.path, self.cache_size, sha256=pinned)
        except GeoIPError as error:
            status.geoip_rejections += 1
            status.last_error = f"GeoIP database rejected, the current one keeps serving: {error}"
            log.warning("%s", status.last_error)
            return f"rejected: {error}"
        self.holder.activate_geo(geo)
        status.geoip_reloads += 1
        log.info("GeoIP database reloaded: %s built %d", geo.database_type, geo.build_epoch)
        return f"reloaded build {geo.build_epoch}"

    def _wait(self) -> None:
        self._stopping.wait(self.poll_seconds)
