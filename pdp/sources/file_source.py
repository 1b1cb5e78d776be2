"""``file:///path``: a file polled by identity and content.

Editors rewrite in place, ``mv`` and geoipupdate rename a new file in, and
Kubernetes swaps a ConfigMap's ``..data`` symlink: device, inode, size and
mtime together catch all of them; the SHA-256 then tells a touch from a change.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import unquote, urlparse

from pdp.compression import CompressionError, inflate
from pdp.files import Identity, identity_of
from pdp.rules import MAX_SNAPSHOT_BYTES
from pdp.sources.base import Fetched, Source, SourceError, read_limited


def file_path(url: str) -> Path:
    """The path behind a ``file://`` URL.

    :raises ValueError: the URL names a remote host.
    """
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{url!r}: file URLs name a local path, like file:///etc/pdp/rules.yaml")
    return Path(unquote(parsed.path))


class FileSource(Source):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.path = file_path(url)
        self._seen_identity: Identity | None = None
        self._fetched_identity: Identity | None = None

    def fetch(self) -> Fetched | None:
        try:
            status = self.path.stat()
            identity = identity_of(status)
            if identity == self._seen_identity:
                return None
            with self.path.open("rb") as handle:
                data = read_limited(handle, MAX_SNAPSHOT_BYTES, str(self.path))
            data = inflate(data, MAX_SNAPSHOT_BYTES, str(self.path))  # gzip, told by its magic bytes
        except CompressionError as error:
            raise SourceError(str(error)) from None
        except OSError as error:
            raise SourceError(f"{self.path}: {error.strerror or error}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.committed:
            self._seen_identity = identity  # touched, not changed
            return None
        self._fetched_identity = identity
        return Fetched(data, digest, digest)

    def commit(self, fetched: Fetched) -> None:
        super().commit(fetched)
        # The identity read with these bytes, not a fresh stat: the file may have changed since.
        self._seen_identity = self._fetched_identity
