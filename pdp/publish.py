"""Publishing snapshots to a store: ``file://`` (atomic rename) and ``redis://`` (SET and PUBLISH in one transaction).

HTTP object stores are written with their own tools (``curl -T``, the
store's CLI); README.md shows how.
"""

from __future__ import annotations

from urllib.parse import urlparse

import redis

from pdp.errors import PdpError
from pdp.files import atomic_write
from pdp.sources.file_source import file_path
from pdp.sources.redis_source import redis_target

__all__ = ["PublishError", "publish"]


class PublishError(PdpError):
    """The store could not be written."""


def publish(data: bytes, url: str, version: int, *, notify: bool = True) -> str:
    """Store ``data`` at ``url`` and, for Redis, announce ``version`` on the channel.

    ``notify=False`` skips the announcement (sidecars then find the snapshot at
    their next poll); tests use it to show that the poll is a safety net.

    :raises PublishError: the store refused or could not be reached.
    :raises ValueError: the URL's scheme cannot be published to.
    """
    scheme = urlparse(url).scheme
    if scheme == "file":
        path = file_path(url)
        try:
            atomic_write(path, data)
        except OSError as error:
            raise PublishError(f"{path}: {error.strerror or error}") from None
        return f"wrote {len(data)} bytes to {path}"
    if scheme in ("redis", "rediss"):
        connection_url, key, channel = redis_target(url)
        client = redis.Redis.from_url(connection_url, socket_timeout=10, socket_connect_timeout=10)
        try:
            with client.pipeline(transaction=True) as pipeline:
                pipeline.set(key, data)
                if notify:
                    pipeline.publish(channel, str(version))
                results = pipeline.execute()
        except redis.RedisError as error:
            raise PublishError(f"{url}: {error}") from None
        finally:
            client.close()
        listeners = f", {results[1]} sidecars notified on {channel!r}" if notify else ", no notice sent"
        return f"set {key!r} ({len(data)} bytes){listeners}"
    if scheme in ("http", "https"):
        raise ValueError(f"{url}: upload to HTTP stores with their own tools (see README, 'Publishing')")
    raise ValueError(f"{url!r}: publish to file:// or redis:// URLs")
