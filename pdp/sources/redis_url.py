"""What a ``redis://`` or ``redis+sentinel://`` snapshot URL names: where to connect, and the keys.

::

    redis://[:password@]host:port/db?key=K&channel=C&head=H&stream=S
    rediss://...                                        (TLS)
    redis+sentinel://[:password@]host:port,host:port/service?db=0&key=K...

``key`` holds the full snapshot (default ``pdp:snapshot``); ``head``, a few
bytes naming the version and SHA-256 the key holds, written in the same
transaction (default ``K:head``); ``stream``, the deltas (default ``K:deltas``);
``channel``, the change notices (default ``K:updates``). ``deltas=off`` makes
a sidecar ignore the stream and fetch every change whole. With Sentinel, the
connection goes to whichever server the sentinels name master of ``service``
(sentinels on port 26379 unless given); the password, if any, is the master's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from urllib.parse import parse_qs, unquote, urlencode, urlparse, urlunparse

import redis

__all__ = ["DEFAULT_KEY", "RedisTarget", "redis_target"]

DEFAULT_KEY = "pdp:snapshot"
SCHEMES = ("redis", "rediss", "redis+sentinel")
_SENTINEL_PORT = 26379


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed URL; :meth:`connect` opens a client to it (to the current master with Sentinel)."""

    key: str
    channel: str
    head: str
    stream: str
    follow_deltas: bool = True  # deltas=off: always fetch the full snapshot
    connection_url: str = ""  # redis:// and rediss://, without pdp's query parameters
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    password: str | None = field(default=None, repr=False)

    def connect(self, timeout: float) -> redis.Redis:
        """A client; with Sentinel, each new connection asks the sentinels for the master.

        Nothing is sent until the first command, so this never fails on an unreachable store.
        """
        if not self.sentinels:
            return redis.Redis.from_url(self.connection_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        from redis.sentinel import Sentinel

        # redis-py leaves Sentinel unannotated.
        sentinel = Sentinel(list(self.sentinels), socket_timeout=timeout, socket_connect_timeout=timeout)  # type: ignore[no-untyped-call]
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            self.service,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            db=self.db,
            password=self.password,
        )
        close = client.close

        def close_with_sentinels() -> None:
            close()
            for server in sentinel.sentinels:
                server.close()

        client.close = close_with_sentinels  # type: ignore[method-assign]  # this instance only
        return client


def redis_target(url: str) -> RedisTarget:
    """Parse a snapshot URL.

    :raises ValueError: not a Redis URL, or a Sentinel URL without sentinels, a
        service name, or with a malformed port or db.
    """
    parsed = urlparse(url)
    if parsed.scheme not in SCHEMES:
        raise ValueError(f"{url!r}: not a redis://, rediss:// or redis+sentinel:// URL")
    query = parse_qs(parsed.query)
    key = query.pop("key", [DEFAULT_KEY])[0]
    names = RedisTarget(
        key,
        channel=query.pop("channel", [f"{key}:updates"])[0],
        head=query.pop("head", [f"{key}:head"])[0],
        stream=query.pop("stream", [f"{key}:deltas"])[0],
        follow_deltas=query.pop("deltas", ["on"])[0] not in ("off", "0", "false", "no"),
    )
    if parsed.scheme != "redis+sentinel":
        rest = urlencode({name: values[0] for name, values in query.items()})
        return replace(names, connection_url=urlunparse(parsed._replace(query=rest)))
    return _sentinel_target(url, parsed.netloc, parsed.path, query, names)


def _sentinel_target(url: str, netloc: str, path: str, query: dict[str, list[str]], names: RedisTarget) -> RedisTarget:
    credentials, _, hosts = netloc.rpartition("@")
    password = unquote(credentials.partition(":")[2]) or None
    sentinels = [_host_port(host, url) for host in hosts.split(",") if host]
    service = path.strip("/")
    if not sentinels or not service:
        raise ValueError(
            f"{url!r}: name the sentinels and the service, like redis+sentinel://h1:26379,h2:26379/mymaster"
        )
    try:
        db = int(query.pop("db", ["0"])[0])
    except ValueError:
        raise ValueError(f"{url!r}: db must be a number") from None
    return replace(names, sentinels=tuple(sentinels), service=service, db=db, password=password)


def _host_port(host: str, url: str) -> tuple[str, int]:
    """``host:port``, ``host`` or ``[v6]:port``."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        name, _, port = host.partition(":")
    try:
        return name, int(port) if port else _SENTINEL_PORT
    except ValueError:
        raise ValueError(f"{url!r}: sentinel {host!r} has a malformed port") from None
