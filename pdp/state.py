"""The active state the server answers from: one policy and one GeoIP database.

Both are swapped by replacing a single immutable :class:`Active` reference, so a
request that reads ``holder.active`` once sees a consistent pair for its whole
life, and a half-loaded state is never visible. A replaced GeoIP database is
never closed explicitly: its reader is released when the last request holding
the old :class:`Active` finishes and drops the reference.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pdp.batch import BatchMemo, Selectors
from pdp.geo import GeoDatabase
from pdp.rules import Policy

__all__ = ["Active", "PolicyHolder", "ReloadStatus"]


@dataclass(frozen=True, slots=True)
class Active:
    """What one request is decided with."""

    policy: Policy
    geo: GeoDatabase
    source: str  # where the policy came from
    activated_at: float  # Unix seconds, when this policy version became active
    # Response bytes already encoded for this state (see pdp.wire); dies with it.
    encoded: dict[tuple[int, int], tuple[bytes, bytes, object, object]] = field(
        default_factory=dict, compare=False, repr=False
    )
    # Batches' decisions per kind of meeting and place (see pdp.batch); dies with it.
    batch_memo: BatchMemo = field(default_factory=BatchMemo, compare=False, repr=False)


@dataclass(slots=True)
class ReloadStatus:
    """How following the store is going; written by the reloaders, read by GetStatus."""

    source: str = ""
    last_fetch_at: float = 0.0
    last_fetch_result: str = ""
    last_error: str = ""
    stale: bool = False
    activations: int = 0
    rejections: int = 0
    fetch_errors: int = 0
    last_compile_ms: float = 0.0
    geoip_reloads: int = 0
    geoip_rejections: int = 0
    delta_activations: int = 0  # activations made from deltas (the rest: full snapshots)
    delta_fallbacks: int = 0  # changes announced as deltas that were fetched whole instead
    last_delta_fallback: str = ""  # why, the last time


class PolicyHolder:
    """Holds the active state; readers never lock, writers serialise on a lock."""

    def __init__(self) -> None:
        self.active: Active | None = None
        self.status = ReloadStatus()
        self._policy: tuple[Policy, str, float] | None = None
        self._geo: GeoDatabase | None = None
        self._write_lock = threading.Lock()
        self._listeners: dict[int, Callable[[Active], None]] = {}
        self._next_listener = 0

    def activate(self, policy: Policy, geo: GeoDatabase, source: str) -> Active:
        """Make ``policy`` and ``geo`` the active pair."""
        with self._write_lock:
            self._geo = geo
            self._policy = (policy, source, time.time())
            active = self._publish()
        assert active is not None
        return active

    def activate_policy(self, policy: Policy, source: str) -> Active | None:
        """Replace the policy (the database stays). Returns the new state, or
        None while no database is loaded yet."""
        with self._write_lock:
            self._policy = (policy, source, time.time())
            return self._publish()

    def activate_geo(self, geo: GeoDatabase) -> Active | None:
        """Replace the GeoIP database (the policy stays)."""
        with self._write_lock:
            self._geo = geo
            return self._publish()

    @property
    def geo(self) -> GeoDatabase | None:
        """The newest database, served or (without a policy yet) waiting."""
        return self._geo

    @property
    def policy(self) -> Policy | None:
        """The newest policy, served or (without a database yet) waiting."""
        return self._policy[0] if self._policy else None

    def _publish(self) -> Active | None:
        if self._policy is None or self._geo is None:
            return None
        policy, source, activated_at = self._policy
        previous = self.active
        if previous is not None and previous.policy is policy:  # a database swap: the same rules
            selectors = previous.batch_memo.selectors
        else:  # here, on the writer's thread, not on the first request that needs them
            selectors = Selectors.of(policy)
        active = Active(policy, self._geo, source, activated_at, batch_memo=BatchMemo(selectors))
        self.active = active
        for listener in list(self._listeners.values()):
            listener(active)
        return active

    def subscribe(self, listener: Callable[[Active], None]) -> Callable[[], None]:
        """Call ``listener`` after every activation, from the activating thread
        and under the writers' lock, so it sees activations in order; it must
        not block. Returns the function that unsubscribes it."""
        with self._write_lock:
            key = self._next_listener
            self._next_listener += 1
            self._listeners[key] = listener

        def unsubscribe() -> None:
            self._listeners.pop(key, None)

        return unsubscribe
