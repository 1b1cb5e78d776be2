"""``redis://`` and ``redis+sentinel://``: a few-byte head per poll, deltas from a stream, pub/sub notices.

The store (written by :mod:`pdp.publish`, see there and
:mod:`pdp.sources.redis_url` for the names) holds the full snapshot, a head
naming its version and the SHA-256 of its bytes, and a stream of signed deltas. One poll is one
``GET`` of the head (about 80 bytes); nothing more while nothing changes. When
the head moves, the deltas after the active version are read (``XRANGE``),
verified and applied in order to the active snapshot's text; the result must
hash to what the head and the last delta announce. A gap, a trimmed stream, a
bad or unknown signature, a wrong hash or any other failure falls back to the
full snapshot (``MGET`` of head and key, so the pair is consistent), and the
reason travels with it to the reloader and ``GetStatus``. The reloader then
verifies, validates and compiles the result exactly like a full snapshot.

A store written without a head (older publishers) is read whole at every poll,
as before, and compared by digest.

A notice on the channel wakes the reloader at once; the regular poll stays as
the safety net for notices lost while disconnected. Once subscribed, after a
fetch has begun (the first fetch usually begins before the subscription is in
place) or after reconnecting with backoff (with Sentinel, to the new master),
the subscriber wakes the reloader too, since notices sent before are gone: a
publication between the first fetch and the subscription is not left to the poll.
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
from dataclasses import dataclass
from typing import cast

import redis
from redis.client import Pipeline

from pdp.compression import CompressionError, inflate
from pdp.delta import Delta, DeltaError, apply_delta, open_delta, result_snapshot
from pdp.signing import Opened, SignatureError, is_envelope, open_envelope
from pdp.sources.base import Fetched, Source, SourceError, SourceOptions
from pdp.sources.redis_url import DEFAULT_KEY, redis_target

__all__ = ["DEFAULT_KEY", "MAX_CHAIN", "RedisSource"]

MAX_CHAIN = 1000  # deltas applied in one step; further behind, the full snapshot is cheaper
_CANONICAL_VERSION = re.compile(rb'\],"version":(\d+)\}')


@dataclass(frozen=True, slots=True)
class _Head:
    version: int
    sha256: str
    delta_base: int | None

    @classmethod
    def parse(cls, text: str) -> _Head | None:
        parts = text.split(" ")
        if len(parts) != 3 or not parts[0].isdigit() or len(parts[1]) != 64:
            return None
        base = None if parts[2] == "-" else int(parts[2]) if parts[2].isdigit() else -1
        return None if base == -1 else cls(int(parts[0]), parts[1], base)


class _Base:
    """The active snapshot, which the next delta applies to: its version, and its
    rules' canonical text with their SHA-256, opened from the stored snapshot on
    first use (a sidecar that never sees a delta never decodes it)."""

    __slots__ = ("_payload", "_sha256", "_stored", "version")

    def __init__(self, version: int, *, stored: bytes = b"", payload: bytes = b"", sha256: str = "") -> None:
        self.version = version
        self._stored, self._payload, self._sha256 = stored, payload, sha256

    def rules_text(self) -> tuple[bytes, str] | None:
        """(text, SHA-256), or None when the snapshot is not canonical JSON (deltas cannot apply)."""
        if self._stored:
            stored, self._stored = self._stored, b""
            try:
                payload = open_envelope(stored).payload if is_envelope(stored) else stored
            except SignatureError:
                payload = b""
            if _CANONICAL_VERSION.fullmatch(payload, max(0, payload.rfind(b'],"version":'))):
                self._payload, self._sha256 = payload, hashlib.sha256(payload).hexdigest()
        return (self._payload, self._sha256) if self._payload else None


class RedisSource(Source):
    # How often the subscriber, waiting for a notice, looks whether close() was called:
    # what close() may wait. A notice ends the wait at once whatever the value.
    close_check_seconds = 0.25

    def __init__(self, url: str, options: SourceOptions) -> None:
        super().__init__(url)
        self.options = options
        self.target = redis_target(url)
        self.key, self.channel = self.target.key, self.target.channel
        self._client = self.target.connect(options.timeout)
        self._base: _Base | None = None
        # The last fetch until committed, and the base it makes (None: computed at commit).
        self._pending: Fetched | None = None
        self._pending_base: _Base | None = None
        self._noticed: bytes | None = None  # the delta the last notice carried, not yet looked at
        # Whether a fetch has begun: one before a subscription may have missed a notice.
        self._fetched = False
        self._closed = threading.Event()
        # Set while subscribed, each time after the subscription's wake-up (if any): who
        # waits on it and then on wait() has used up that wake-up; the next is a notice's.
        self.subscribed = threading.Event()
        self._subscriber = threading.Thread(target=self._listen, name="pdp-redis-notices", daemon=True)
        self._subscriber.start()

    def fetch(self) -> Fetched | None:
        self._fetched = True
        noticed, self._noticed = self._noticed, None
        if noticed is not None and self._base is not None and self.target.follow_deltas:
            carried = self._from_notice(noticed, self._base)
            if carried is not None:
                return carried
        # One round trip per poll: the head and, when a delta could follow the active
        # snapshot, the entries after it (an empty reply while nothing changes).
        base = self._base if self.target.follow_deltas and self._pending is None else None
        try:
            with self._client.pipeline(transaction=False) as pipeline:
                pipeline.get(self.target.head)
                if base is not None:
                    self._ask_entries(pipeline, base)
                replies = pipeline.execute()
        except redis.RedisError as error:
            raise SourceError(f"{self.url}: {error}") from None
        raw_head, entries = replies[0], (replies[1] if base is not None else None)
        if not isinstance(raw_head, bytes):
            return self._full(False, "")  # no head: a store written by an older publisher
        head = raw_head.decode("ascii", "replace")
        if head == self.committed:
            return None
        if self._pending is not None and self._pending.tag == head:
            return self._pending  # fetched already and not activated (rejected): the head names these bytes
        announced = _Head.parse(head)
        fallback = ""
        base = self._base
        wanted = announced is not None and announced.delta_base is not None and self.target.follow_deltas
        if wanted and announced is not None and base is not None and announced.version > base.version:
            followed = self._from_deltas(base, entries, announced, head)
            if isinstance(followed, Fetched):
                return followed
            fallback = followed
        return self._full(True, fallback)

    def _from_notice(self, raw: bytes, base: _Base) -> Fetched | None:
        """The snapshot the delta a notice carried makes of ``base``, or None (then the
        store is asked, as at any poll: the notice may be forged, stale or from another base)."""
        try:
            delta = self._open({b"delta": raw})
        except (DeltaError, SignatureError, CompressionError):
            return None
        text = base.rules_text() if delta.base_version == base.version else None
        if text is None or delta.base_sha256 != text[1]:
            return None
        try:
            payload = apply_delta(text[0], delta, text[1])
        except DeltaError:
            return None
        data = result_snapshot(payload, delta)
        digest = delta.sha256 if data is payload else hashlib.sha256(data).hexdigest()
        head = f"{delta.version} {digest} {delta.base_version}"  # what the publisher wrote with it
        result = self._result(payload, delta, _Head(delta.version, digest, delta.base_version), head, 1)
        return result if isinstance(result, Fetched) else None

    def _ask_entries(self, client: redis.Redis | Pipeline, base: _Base) -> object:
        return client.xrange(self.target.stream, min=f"{base.version + 1}-0", max="+", count=MAX_CHAIN + 1)

    def _full(self, with_head: bool, fallback: str) -> Fetched | None:
        try:
            raw_head, value = self._client.mget(self.target.head, self.key)
        except redis.RedisError as error:
            raise SourceError(f"{self.url}: {error}") from None
        if value is None:
            raise SourceError(f"{self.url}: key {self.key!r} does not exist")
        if not isinstance(value, bytes):
            raise SourceError(f"{self.url}: key {self.key!r} holds no string value")
        if len(value) > self.options.max_bytes:
            raise SourceError(f"{self.url}: snapshot larger than {self.options.max_bytes} bytes")
        try:
            data = inflate(value, self.options.max_bytes, f"{self.url}: key {self.key!r}")
        except CompressionError as error:
            raise SourceError(str(error)) from None
        digest = hashlib.sha256(data).hexdigest()
        tag = raw_head.decode("ascii", "replace") if with_head and isinstance(raw_head, bytes) else digest
        if tag == self.committed:
            return None
        self._pending, self._pending_base = Fetched(data, tag, digest, fallback=fallback), None
        return self._pending

    def _from_deltas(self, base: _Base, read: object, announced: _Head, head: str) -> Fetched | str:
        """The snapshot ``announced`` from the deltas after ``base`` (``read`` with the
        head, or None: read them now), or why not (in words)."""
        stream = self.target.stream
        try:
            # Without decode_responses, ids and fields are bytes (redis-py types them loosely).
            entries = cast(
                "list[tuple[bytes, dict[bytes, bytes]]]",
                read if read is not None else self._ask_entries(self._client, base),
            )
        except redis.RedisError as error:
            return f"cannot read the stream {stream!r}: {error}"
        if not entries:
            return f"no delta after version {base.version} in {stream!r} (trimmed, or never written)"
        if len(entries) > MAX_CHAIN:
            return f"more than {MAX_CHAIN} deltas behind"
        text = base.rules_text()
        if text is None:
            return "the active snapshot is not canonical JSON: deltas cannot apply to it"
        (payload, sha256), version, last = text, base.version, None
        for entry_id, fields in entries:
            name = entry_id.decode("ascii", "replace")
            try:
                delta = self._open(fields)
                if (delta.base_version, delta.base_sha256) != (version, sha256):
                    return (
                        f"delta {name} applies to version {delta.base_version}, the active one is {version}:"
                        " an entry is missing (trimmed stream?)"
                    )
                payload = apply_delta(payload, delta, sha256)
            except (DeltaError, SignatureError, CompressionError) as error:
                return f"delta {name} refused: {error}"
            version, sha256, last = delta.version, delta.sha256, delta
            if version >= announced.version:
                break
        if last is None or version != announced.version:
            return f"the deltas end at version {version}, the store holds version {announced.version}"
        return self._result(payload, last, announced, head, len(entries))

    def _open(self, fields: dict[bytes, bytes]) -> Delta:
        raw = fields.get(b"delta")
        if not isinstance(raw, bytes):
            raise DeltaError("the stream entry holds no delta")
        return open_delta(inflate(raw, self.options.max_bytes, "delta"), self.options.keys)

    def _result(self, payload: bytes, last: Delta, announced: _Head, head: str, count: int) -> Fetched | str:
        data = result_snapshot(payload, last)
        digest = last.sha256 if data is payload else hashlib.sha256(data).hexdigest()
        if digest != announced.sha256:
            return f"the snapshot the deltas make is not the one the head names ({announced.sha256[:12]}...)"
        opened = None
        if last.snapshot_signature is not None:
            kid, signature = last.snapshot_signature
            opened = Opened(payload, last.version, kid, signature, last.sha256)
            try:  # a delta whose carried signature fails must fall back, not be refused for good
                if self.options.keys:
                    self.options.keys.check(kid, last.version, last.sha256, signature)
            except SignatureError as error:
                return f"the snapshot the deltas make is refused: {error}"
        self._pending = Fetched(data, head, digest, deltas=count, opened=opened)
        self._pending_base = _Base(last.version, payload=payload, sha256=last.sha256)
        return self._pending

    def commit(self, fetched: Fetched) -> None:
        super().commit(fetched)
        if self._pending is not None and self._pending.tag == fetched.tag:
            head = _Head.parse(fetched.tag)  # a full fetch: the head names the version of these bytes
            full = _Base(head.version, stored=fetched.data) if head and self.target.follow_deltas else None
            self._base = self._pending_base or full
            self._pending = self._pending_base = None

    def _listen(self) -> None:
        failures = 0
        while not self._closed.is_set():
            pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            try:
                # subscribe() only sends SUBSCRIBE: the subscription is in place once Redis confirms it.
                pubsub.subscribe(self.channel)
                while not self._closed.is_set():
                    confirmation = pubsub.get_message(timeout=self.close_check_seconds)
                    if confirmation is not None and confirmation.get("type") == "subscribe":
                        break
                if failures or self._fetched:  # notices sent before this subscription are lost: look now
                    self.wake()
                self.subscribed.set()
                failures = 0
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=self.close_check_seconds)
                    if message is not None and message.get("type") == "message":
                        data = message.get("data")
                        # A delta carried by the notice (a version alone is a plain wake-up); the
                        # reloader's thread opens it, and only the newest is kept.
                        self._noticed = data if isinstance(data, bytes) and not data.isdigit() else None
                        self.wake()
            except (redis.RedisError, OSError, ValueError):
                self.subscribed.clear()
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
