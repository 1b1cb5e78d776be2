"""Publishing snapshots to a store: ``file://`` (atomic rename) and ``redis://`` / ``redis+sentinel://``.

To Redis, one ``MULTI/EXEC`` writes, all or nothing:

- the full snapshot at the key (gzip-compressed with ``compress="gzip"``);
- the head, ``"<version> <sha256> <base version or ->"``: what a sidecar's
  poll reads instead of the snapshot (about 80 bytes), naming the version, the
  SHA-256 of the snapshot as stored before compression (envelope included, so
  a snapshot signed again with another key is a change), and the version the
  delta written with it applies to;
- when the store held an earlier canonical snapshot, one delta entry
  (:mod:`pdp.delta`, signed with the same key) appended to the stream with id
  ``<version>-0``, the stream capped with ``MAXLEN ~``;
- the notice on the channel: the delta itself when it is at most 64 KB (a sidecar
  at its base applies it with no request at all), else the version.

``WATCH`` on the key and head makes a concurrent publication retry instead of
writing a delta against a snapshot that is no longer the stored one.

HTTP object stores are written with their own tools (``curl -T``, the
store's CLI); README.md shows how.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import redis
from redis.typing import EncodableT, FieldT

from pdp.compression import compress, inflate
from pdp.delta import encode_delta, make_delta
from pdp.errors import PdpError
from pdp.files import atomic_write
from pdp.signing import SignatureError, is_envelope, open_envelope
from pdp.sources.base import MAX_SNAPSHOT_BYTES
from pdp.sources.file_source import file_path
from pdp.sources.redis_url import SCHEMES, RedisTarget, redis_target

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["DEFAULT_STREAM_MAXLEN", "PublishError", "head_value", "publish"]

DEFAULT_STREAM_MAXLEN = 1000
NOTICE_DELTA_BYTES = 64 * 1024  # deltas up to this size travel in the notice too
_ATTEMPTS = 10


class PublishError(PdpError):
    """The store could not be written."""


@dataclass(frozen=True, slots=True)
class _Options:
    notify: bool
    key: Ed25519PrivateKey | None
    compression: str
    deltas: bool
    stream_maxlen: int


def head_value(version: int, sha256: str, delta_base: int | None) -> str:
    """The head a publication writes: version, SHA-256 of the uncompressed
    snapshot, base version of its delta or ``-``."""
    return f"{version} {sha256} {'-' if delta_base is None else delta_base}"


def publish(
    data: bytes,
    url: str,
    version: int,
    *,
    notify: bool = True,
    key: Ed25519PrivateKey | None = None,
    compression: str = "none",
    deltas: bool = True,
    stream_maxlen: int = DEFAULT_STREAM_MAXLEN,
) -> str:
    """Store ``data`` (a snapshot, plain or in a signed envelope, of ``version``) at ``url``.

    For Redis, also the head, a delta against the stored snapshot when both are
    canonical JSON (:mod:`pdp.canonical`) and ``deltas`` is set (signed with
    ``key``, which a signed ``data`` requires for a delta), and with ``notify``
    the notice (``notify=False``: sidecars find it at their next poll; tests use
    it to show that the poll is a safety net). Returns what was done, in words.

    :raises PublishError: the store refused or could not be reached.
    :raises ValueError: the URL's scheme cannot be published to, or an unknown compression.
    """
    stored = compress(data, compression)
    scheme = urlparse(url).scheme
    if scheme == "file":
        path = file_path(url)
        try:
            atomic_write(path, stored)
        except OSError as error:
            raise PublishError(f"{path}: {error.strerror or error}") from None
        return f"wrote {len(stored)} bytes to {path}"
    if scheme in SCHEMES:
        target = redis_target(url)
        client = target.connect(10.0)
        options = _Options(notify, key, compression, deltas, stream_maxlen)
        try:
            return _publish_redis(client, target, data, stored, version, options)
        except redis.RedisError as error:
            raise PublishError(f"{url}: {error}") from None
        finally:
            client.close()
    if scheme in ("http", "https"):
        raise ValueError(f"{url}: upload to HTTP stores with their own tools (see README, 'Publishing')")
    raise ValueError(f"{url!r}: publish to file://, redis:// or redis+sentinel:// URLs")


def _publish_redis(
    client: redis.Redis,
    target: RedisTarget,
    data: bytes,
    stored: bytes,
    version: int,
    options: _Options,
) -> str:
    payload, signature = _opened(data)
    sha256 = hashlib.sha256(data).hexdigest()
    with client.pipeline(transaction=True) as pipeline:
        for _ in range(_ATTEMPTS):
            try:
                pipeline.watch(target.key, target.head)  # type: ignore[no-untyped-call]  # unannotated in redis-py
                previous = pipeline.get(target.key)
                last = pipeline.xrevrange(target.stream, count=1)
                delta, about = (
                    _delta(previous, last, payload, signature, version, options)
                    if options.deltas
                    else (None, "no delta (turned off)")
                )
                pipeline.multi()
                pipeline.set(target.key, stored)
                pipeline.set(target.head, head_value(version, sha256, delta[0] if delta else None))
                if delta:
                    fields: dict[FieldT, EncodableT] = {"delta": delta[1]}
                    pipeline.xadd(
                        target.stream, fields, id=f"{version}-0", maxlen=options.stream_maxlen, approximate=True
                    )
                if options.notify:
                    # The delta itself is the notice when small: a sidecar at its base needs no request.
                    carried = delta is not None and len(delta[1]) <= NOTICE_DELTA_BYTES
                    pipeline.publish(target.channel, delta[1] if delta is not None and carried else str(version))
                results = pipeline.execute()
                break
            except redis.WatchError:
                continue
        else:
            raise PublishError(f"{target.key!r} changed under {_ATTEMPTS} attempts in a row; try again")
    listeners = f", {results[-1]} sidecars notified on {target.channel!r}" if options.notify else ", no notice sent"
    return f"set {target.key!r} ({len(stored)} bytes), {about}{listeners}"


def _opened(data: bytes) -> tuple[bytes, tuple[str, bytes] | None]:
    """The rules inside ``data`` and, when signed, (key id, signature)."""
    if not is_envelope(data):
        return data, None
    opened = open_envelope(data)
    return opened.payload, (opened.key_id, opened.signature)


def _delta(
    previous: object,
    last: object,
    payload: bytes,
    signature: tuple[str, bytes] | None,
    version: int,
    options: _Options,
) -> tuple[tuple[int, bytes] | None, str]:
    """((base version, the stream entry's bytes), words) or (None, why there is no delta)."""
    if not isinstance(previous, bytes):
        return None, "no delta (first publication)"
    if signature is not None and options.key is None:
        return None, "no delta (the snapshot is signed: pass the key to sign the delta too)"
    if isinstance(last, list) and last and int(last[0][0].split(b"-")[0]) >= version:
        return None, f"no delta (the stream already holds version {last[0][0].decode()} or later)"
    try:
        base = inflate(previous, MAX_SNAPSHOT_BYTES, "the stored snapshot")
        base = open_envelope(base).payload if is_envelope(base) else base
    except (ValueError, SignatureError) as error:
        return None, f"no delta (the stored snapshot cannot be read: {error})"
    delta = make_delta(base, payload, snapshot_signature=signature)
    if delta is None:
        return None, "no delta (the stored or the new snapshot is not canonical JSON, or not an earlier version)"
    entry = encode_delta(delta, options.key)
    smaller = compress(entry, options.compression)
    entry = smaller if len(smaller) < len(entry) else entry
    if len(entry) >= len(payload):
        return None, "no delta (it would be larger than the snapshot)"
    return (delta.base_version, entry), (
        f"delta {delta.base_version} -> {version} ({len(entry)} bytes, {delta.rule_count} rules) appended"
    )
