"""The active state the server answers from: one policy and one GeoIP database.

Both are swapped by replacing a single immutable :class:`Active` reference, so a
request that reads ``holder.active`` once sees a consistent pair for its whole
life, and a half-loaded state is never visible.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from pdp.geo import GeoDatabase
from pdp.rules import Policy

__all__ = ["Active", "PolicyHolder"]


@dataclass(frozen=True, slots=True)
class Active:
    """What one request is decided with."""

    policy: Policy
    geo: GeoDatabase
    source: str  # where the policy came from
    activated_at: float  # Unix seconds


class PolicyHolder:
    """Holds the active state; readers never lock, writers serialise on a lock."""

    def __init__(self) -> None:
        self.active: Active | None = None
        self.last_error = ""
        self._write_lock = threading.Lock()
        self._listeners: dict[int, Callable[[Active], None]] = {}
        self._next_listener = 0

    def activate(self, policy: Policy, geo: GeoDatabase, source: str) -> Active:
        """Make ``policy`` and ``geo`` the active pair and notify listeners."""
        with self._write_lock:
            active = Active(policy, geo, source, time.time())
            self.active = active
            self.last_error = ""
        self._notify(active)
        return active

    def activate_policy(self, policy: Policy, source: str) -> Active:
        """Replace the policy, keeping the current GeoIP database.

        :raises RuntimeError: no database is active yet.
        """
        with self._write_lock:
            if self.active is None:
                raise RuntimeError("no GeoIP database is active yet")
            active = replace(self.active, policy=policy, source=source, activated_at=time.time())
            self.active = active
        self._notify(active)
        return active

    def subscribe(self, listener: Callable[[Active], None]) -> Callable[[], None]:
        """Call ``listener`` after every activation, from the activating thread;
        it must not block. Returns the function that unsubscribes it."""
        with self._write_lock:
            key = self._next_listener
            self._next_listener += 1
            self._listeners[key] = listener

        def unsubscribe() -> None:
            self._listeners.pop(key, None)

        return unsubscribe

    def _notify(self, active: Active) -> None:
        for listener in list(self._listeners.values()):
            listener(active)
