"""``redis://host:port/db?key=K&channel=C``: GET, with pub/sub change notices.

A notice on the channel wakes the reloader at once; the regular poll stays as
the safety net for notices lost while disconnected. The subscriber reconnects
with backoff and, after reconnecting, wakes the reloader too, since notices
sent meanwhile are gone.
"""

from __future__ import annotations

import hashlib
import random
import threading
from urllib.parse import parse_qs, urlencode, urlparse, urlunparse

import redis

from pdp.sources.base import Fetched, Source, SourceError, SourceOptions

DEFAULT_KEY = "pdp:snapshot"


def redis_target(url: str) -> tuple[str, str, str]:
    """(connection URL without pdp's query, key, channel) from a snapshot URL."""
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    key = query.pop("key", [DEFAULT_KEY])[0]
    channel = query.pop("channel", [f"{key}:updates"])[0]
    rest = urlencode({name: values[0] for name, values in query.items()})
    return urlunparse(parsed._replace(query=rest)), key, channel


class RedisSource(Source):
    def __init__(self, url: str, options: SourceOptions) -> None:
        super().__init__(url)
        self.options = options
        connection_url, self.key, self.channel = redis_target(url)
        self._client = redis.Redis.from_url(
            connection_url, socket_timeout=options.timeout, socket_connect_timeout=options.timeout
        )
        self._closed = threading.Event()
        self._subscriber = threading.Thread(target=self._listen, name="pdp-redis-notices", daemon=True)
        self._subscriber.start()

    def fetch(self) -> Fetched | None:
        try:
            value = self._client.get(self.key)
        except redis.RedisError as error:
            raise SourceError(f"{self.url}: {error}") from None
        if value is None:
            raise SourceError(f"{self.url}: key {self.key!r} does not exist")
        if not isinstance(value, bytes):
            raise SourceError(f"{self.url}: key {self.key!r} holds no string value")
        if len(value) > self.options.max_bytes:
            raise SourceError(f"{self.url}: snapshot larger than {self.options.max_bytes} bytes")
        digest = hashlib.sha256(value).hexdigest()
        return None if digest == self.committed else Fetched(value, digest, digest)

    def _listen(self) -> None:
        failures = 0
        while not self._closed.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            try:
                pubsub.subscribe(self.channel)
                if failures:
                    self.wake()  # notices sent while we were away are lost: look now
                failures = 0
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=0.25)  # bounds how long close() waits
                    if message is not None and message.get("type") == "message":
                        self.wake()
            except (redis.RedisError, OSError, ValueError):
                failures += 1
                # Exponential backoff with jitter, capped, and cut short by close().
                self._closed.wait(min(30.0, 0.2 * 2**failures) * random.uniform(0.8, 1.2))  # noqa: S311
            finally:
                pubsub.close()

    def close(self) -> None:
        self._closed.set()
        super().close()
        self._subscriber.join(timeout=5)
        self._client.close()
