"""Where snapshots come from: ``file://``, ``http(s)://`` and ``redis://`` (or ``redis+sentinel://``) sources.

Every source answers :meth:`Source.fetch` with new bytes, or None when nothing
changed since the last :meth:`Source.commit`; the reloader commits only after
a snapshot was verified and activated, so a rejected one is fetched again.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

from pdp.sources.base import Fetched, Source, SourceError, SourceOptions

__all__ = [
    "SCHEMES",
    "Fetched",
    "Source",
    "SourceError",
    "SourceOptions",
    "check_scheme",
    "open_source",
    "snapshot_format",
]

SCHEMES = ("file", "http", "https", "redis", "rediss", "redis+sentinel")
"""Every scheme :func:`open_source` opens; ``pdp.config`` checks ``--snapshot`` against it."""


def check_scheme(url: str) -> None:
    """:raises ValueError: ``url``'s scheme is not one of :data:`SCHEMES`."""
    if urlparse(url).scheme not in SCHEMES:
        raise ValueError(
            f"{url!r}: snapshot URLs are file://, http(s):// or redis:// (redis+sentinel:// with Sentinel)"
        )


def snapshot_format(url: str) -> str | None:
    """``"json"`` or ``"yaml"`` when the URL's path says so by its suffix, else None:
    the rules parser then tells them apart by the first character."""
    suffix = PurePosixPath(unquote(urlparse(url).path)).suffix.lower()
    return {".json": "json", ".yaml": "yaml", ".yml": "yaml"}.get(suffix)


def open_source(url: str, options: SourceOptions | None = None) -> Source:
    """The source for ``url``.

    :raises ValueError: an unsupported scheme or a malformed URL (the message says which).
    """
    check_scheme(url)
    options = options or SourceOptions()
    scheme = urlparse(url).scheme
    if scheme == "file":
        from pdp.sources.file_source import FileSource

        return FileSource(url, options)
    if scheme in ("http", "https"):
        from pdp.sources.http_source import HttpSource

        return HttpSource(url, options)
    from pdp.sources.redis_source import RedisSource

    return RedisSource(url, options)
