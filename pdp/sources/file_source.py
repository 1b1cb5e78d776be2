"""``file:///path``: a file polled by identity and content, read only once it is whole.

Editors rewrite in place, ``mv`` and geoipupdate rename a new file in, and
Kubernetes swaps a ConfigMap's ``..data`` symlink: device, inode, size and
mtime together catch all of them; the SHA-256 then tells a touch from a change.

A file renamed in (another inode at the path than at the last look) was written
before it appeared, so it is read at once. A file written in place may be
half-way, and its first half can be a valid snapshot: it is read only when two
looks in a row, one poll apart, see the same identity, and only if that identity
holds from before the read to after it. At the very first look (start-up) the
file is read at once; the reloader's same-version rule then lets the complete
snapshot replace a truncated one (see :mod:`pdp.reload`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from pdp.compression import CompressionError, inflate
from pdp.files import Identity, identity_of
from pdp.sources.base import Fetched, Source, SourceError, SourceOptions, read_limited


def file_path(url: str) -> Path:
    """The path behind a ``file://`` URL.

    :raises ValueError: the URL names a remote host.
    """
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{url!r}: file URLs name a local path, like file:///etc/pdp/rules.yaml")
    return Path(unquote(parsed.path))


class FileSource(Source):
    def __init__(self, url: str, options: SourceOptions | None = None) -> None:
        super().__init__(url)
        self.path = file_path(url)
        self.max_bytes = (options or SourceOptions()).max_bytes
        self._seen_identity: Identity | None = None  # of the bytes last committed, or last found touched
        self._fetched_identity: Identity | None = None
        self._last_look: Identity | None = None
        self._looked = False

    def fetch(self) -> Fetched | None:
        """:raises SourceError: the file cannot be read, or is larger than ``max_bytes``."""
        first, self._looked = not self._looked, True
        try:
            identity = identity_of(self.path.stat())
        except OSError as error:
            self._last_look = None
            raise SourceError(f"{self.path}: {error.strerror or error}") from None
        previous, self._last_look = self._last_look, identity
        if identity == self._seen_identity:
            return None
        renamed_in = previous is not None and identity[:2] != previous[:2]
        if not (first or renamed_in or identity == previous):
            return None  # written in place since the last look: wait until it stays the same
        data = self._read(identity)
        if data is None:
            return None
        try:
            data = inflate(data, self.max_bytes, str(self.path))  # gzip, told by its magic bytes
        except CompressionError as error:
            raise SourceError(str(error)) from None
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.committed:
            self._seen_identity = identity  # touched, not changed
            return None
        self._fetched_identity = identity
        return Fetched(data, digest, digest)

    def _read(self, identity: Identity) -> bytes | None:
        """The file's bytes if it is still ``identity`` from open to end of read, else None."""
        try:
            with self.path.open("rb") as handle:
                before = identity_of(os.fstat(handle.fileno()))
                data = read_limited(handle, self.max_bytes, str(self.path))
                after = identity_of(os.fstat(handle.fileno()))
        except OSError as error:
            raise SourceError(f"{self.path}: {error.strerror or error}") from None
        if not before == after == identity or len(data) != identity[2]:
            self._last_look = after  # it is being written: look again at the next poll
            return None
        return data

    def commit(self, fetched: Fetched) -> None:
        super().commit(fetched)
        # The identity read with these bytes, not a fresh stat: the file may have changed since.
        self._seen_identity = self._fetched_identity
