"""Where snapshots come from: ``file://``, ``http(s)://`` and ``redis://`` (or ``redis+sentinel://``) sources.

Every source answers :meth:`Source.fetch` with new bytes, or None when nothing
changed since the last :meth:`Source.commit`; the reloader commits only after
a snapshot was verified and activated, so a rejected one is fetched again.
"""

from __future__ import annotations

from urllib.parse import urlparse

from pdp.sources.base import Fetched, Source, SourceError, SourceOptions

__all__ = ["Fetched", "Source", "SourceError", "SourceOptions", "open_source"]

SCHEMES = ("file", "http", "https", "redis", "rediss", "redis+sentinel")


def open_source(url: str, options: SourceOptions | None = None) -> Source:
    """The source for ``url``.

    :raises ValueError: an unsupported scheme or a malformed URL (the message says which).
    """
    options = options or SourceOptions()
    scheme = urlparse(url).scheme
    if scheme == "file":
        from pdp.sources.file_source import FileSource

        return FileSource(url)
    if scheme in ("http", "https"):
        from pdp.sources.http_source import HttpSource

        return HttpSource(url, options)
    if scheme in ("redis", "rediss", "redis+sentinel"):
        from pdp.sources.redis_source import RedisSource

        return RedisSource(url, options)
    raise ValueError(f"{url!r}: snapshot URLs are file://, http(s):// or redis:// (redis+sentinel:// with Sentinel)")
