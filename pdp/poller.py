"""A daemon thread that repeats one step: the shape of every follower in pdp."""

from __future__ import annotations

import logging
import threading

__all__ = ["Poller"]

log = logging.getLogger("pdp.reload")


class Poller:
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
