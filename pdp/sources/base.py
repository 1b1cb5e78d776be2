"""The contract every snapshot source keeps."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pdp.errors import PdpError
from pdp.signing import Opened, TrustedKeys

__all__ = ["MAX_SNAPSHOT_BYTES", "Fetched", "Source", "SourceError", "SourceOptions"]

MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024
"""The most a store may hand over: the same bound as the rules parser's (a test keeps
the two equal), defined here so that a source does not import the rules engine."""


class SourceError(PdpError):
    """The store could not be read (unreachable, error status, missing key, timeout)."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """Bytes from the store, the tag that identifies them (ETag, file identity,
    hash), and their SHA-256, which every source computes anyway to tell a
    touched object from a changed one."""

    data: bytes
    tag: str
    sha256: str
    deltas: int = 0  # deltas applied to the active snapshot to make ``data`` (0: fetched whole)
    fallback: str = ""  # why deltas were announced but not used, when they were
    # The envelope ``data`` is, as the source opened it (and verified it when keys are trusted):
    # set by sources that build the envelope themselves, so that it is not parsed again.
    opened: Opened | None = None


@dataclass(frozen=True, slots=True)
class SourceOptions:
    """Settings some sources use; the rest ignore them."""

    timeout: float = 5.0
    bearer_token_file: str = ""
    ca_bundle: str = ""
    max_bytes: int = MAX_SNAPSHOT_BYTES
    keys: TrustedKeys = field(default_factory=TrustedKeys)  # deltas are verified with them (redis)


class Source:
    """Base class: a wake-up event for :meth:`wait`, and the committed tag."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.committed = ""
        self._wake = threading.Event()

    def fetch(self) -> Fetched | None:
        """New bytes, or None when unchanged since the last commit.

        :raises SourceError: the store could not be read.
        """
        raise NotImplementedError

    def commit(self, fetched: Fetched) -> None:
        """Remember ``fetched`` as activated, so that it is not fetched again."""
        self.committed = fetched.tag

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``; a change notice or :meth:`wake` ends it early."""
        self._wake.wait(seconds)
        self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """Release connections and threads; :meth:`wait` returns at once afterwards."""
        self._wake.set()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


def read_limited(stream: object, limit: int, origin: str) -> bytes:
    """Read at most ``limit`` bytes from a file-like ``stream``.

    :raises SourceError: there is more.
    """
    data: bytes = stream.read(limit + 1)  # type: ignore[attr-defined]
    if len(data) > limit:
        raise SourceError(f"{origin}: snapshot larger than {limit} bytes")
    return data
