"""Following a real redis-server through heads and deltas: chains, every fallback, catching up, idle cost."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from pdp.delta import encode_delta, open_delta
from pdp.geo import GeoDatabase
from pdp.publish import publish
from pdp.reload import Reloader
from pdp.signing import TrustedKeys, generate_keypair, load_private_key, sign
from pdp.sources import SourceOptions, open_source
from pdp.sources.redis_source import RedisSource
from pdp.state import PolicyHolder

from .conftest import CITY_DB, ServerFactory
from .fleet_data import canonical, initial, mutate, seeded
from .servers import RedisServer

POLL_SECONDS = 2.0  # the default --poll-seconds
# 1 KB per sidecar per second at the default interval, at its shortest (-20 % jitter).
IDLE_BUDGET_PER_POLL = 1000 * POLL_SECONDS * 0.8


@dataclass
class Publisher:
    url: str
    key: Any  # Ed25519PrivateKey
    compression: str = "none"
    document: dict[str, Any] | None = None
    rng: random.Random = dataclasses.field(default_factory=lambda: seeded(5))

    def publish(self, document: dict[str, Any], **options: Any) -> bytes:
        """Publish ``document`` signed; returns the snapshot as stored before compression.

        Without a notice unless asked (``notify=True``): a notice carries the delta to the
        subscriber thread at a moment of its own, and these tests follow the store's path."""
        data = sign(canonical(document), document["version"], self.key)
        options.setdefault("notify", False)
        publish(data, self.url, document["version"], key=self.key, compression=self.compression, **options)
        self.document = document
        return data

    def next(self, edits: int = 3, **options: Any) -> bytes:
        assert self.document is not None
        return self.publish(mutate(self.document, self.rng, edits), **options)


@pytest.fixture
def key_files(tmp_path: Path) -> tuple[Path, Path]:
    generate_keypair(tmp_path / "ops.key", tmp_path / "ops.pub")
    return tmp_path / "ops.key", tmp_path / "ops.pub"


@pytest.fixture
def trusted(key_files: tuple[Path, Path]) -> TrustedKeys:
    return TrustedKeys.from_files([key_files[1]])


@pytest.fixture
def publisher(redis_server: RedisServer, key_files: tuple[Path, Path]) -> Publisher:
    return Publisher(redis_server.url("pdp:fleet"), load_private_key(key_files[0]))


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


@pytest.fixture
def follow(trusted: TrustedKeys) -> Iterator[Callable[..., Reloader]]:
    """``follow(url, holder=None, **reloader_options)``: a reloader driven by run_once (never started)."""
    made: list[Reloader] = []

    def factory(url: str, holder: PolicyHolder | None = None, **options: Any) -> Reloader:
        if holder is None:
            holder = PolicyHolder()
            holder.activate_geo(GeoDatabase(CITY_DB))
        source = open_source(url, SourceOptions(keys=trusted))
        reloader = Reloader(holder, source, keys=trusted, **options)
        made.append(reloader)
        return reloader

    yield factory
    for reloader in made:
        reloader.stop()


def stream_entries(store: redis.Redis) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return cast("list[tuple[bytes, dict[bytes, bytes]]]", store.xrange("pdp:fleet:deltas"))


def egress(client: redis.Redis) -> int:
    return int(client.info("stats")["total_net_output_bytes"])


def egress_of(client: redis.Redis, action: Callable[[], object]) -> int:
    """Bytes Redis sent while ``action`` ran, less the replies to the measuring INFO calls."""
    before = egress(client)
    action()
    after = egress(client)
    return after - before - (egress(client) - after)  # the last difference: one INFO reply


def payload_sha(stored: bytes, trusted: TrustedKeys) -> str:
    return hashlib.sha256(trusted.open(stored).payload).hexdigest()


# --------------------------------------------------------------------------- chains


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_twenty_publications_applied_as_deltas_equal_the_last_full_snapshot(
    tmp_path: Path,
    publisher: Publisher,
    store: redis.Redis,
    follow: Callable[..., Reloader],
    trusted: TrustedKeys,
    compression: str,
) -> None:
    publisher.compression = compression
    publisher.publish(initial(300))
    state = tmp_path / "state"
    reloader = follow(publisher.url, state_dir=state)
    assert reloader.run_once() == "activated version 1"
    for version in range(2, 22):
        stored = publisher.next(edits=seeded(version).randint(1, 8))
        assert reloader.run_once() == f"activated version {version} (from 1 delta)"
        assert reloader.run_once() == "unchanged"
    status = reloader.holder.status
    assert (status.delta_activations, status.delta_fallbacks, status.rejections) == (20, 0, 0)

    # The same as fetching the last full snapshot: the rules' bytes, and the snapshot persisted.
    full = follow(publisher.url)
    assert full.run_once() == "activated version 21"
    active, fetched = reloader.holder.policy, full.holder.policy
    assert active is not None
    assert fetched is not None
    assert active.sha256 == fetched.sha256 == payload_sha(stored, trusted)
    assert [rule.id for rule in active.rules] == [rule.id for rule in fetched.rules]
    assert active.unknown_location == fetched.unknown_location
    value = store.get("pdp:fleet")
    assert isinstance(value, bytes)
    assert (gzip.decompress(value) if compression == "gzip" else value) == stored
    assert (state / "snapshot").read_bytes() == stored  # a full signed snapshot, verifiable at start

    # That persisted copy is what a restart with the store gone serves, verified again.
    store.delete("pdp:fleet", "pdp:fleet:head")
    restarted = follow(publisher.url, state_dir=state)
    restarted.initial()
    assert restarted.holder.policy is not None
    assert restarted.holder.policy.sha256 == active.sha256
    assert restarted.holder.status.stale


def test_a_sidecar_down_for_100_publications_catches_up(
    publisher: Publisher, store: redis.Redis, follow: Callable[..., Reloader], trusted: TrustedKeys
) -> None:
    publisher.publish(initial(200))
    behind, trimmed = follow(publisher.url), follow(publisher.url)
    assert behind.run_once() == trimmed.run_once() == "activated version 1"
    for _ in range(100):
        stored = publisher.next(edits=2)
    assert behind.run_once() == "activated version 101 (from 100 deltas)"
    assert behind.holder.policy is not None
    assert behind.holder.policy.sha256 == payload_sha(stored, trusted)

    store.xtrim("pdp:fleet:deltas", maxlen=10, approximate=False)  # what MAXLEN ~ does to a long stream
    assert trimmed.run_once() == "activated version 101"
    assert "an entry is missing (trimmed stream?)" in trimmed.holder.status.last_delta_fallback
    assert trimmed.holder.policy is not None
    assert trimmed.holder.policy.sha256 == payload_sha(stored, trusted)
    # Caught up: the next change is a delta again.
    publisher.next()
    assert trimmed.run_once() == "activated version 102 (from 1 delta)"


# --------------------------------------------------------------------------- fallbacks


def _rewrite_last(store: redis.Redis, change: Callable[[bytes], bytes]) -> None:
    """Replace the stream's only entry by ``change(entry)``, under the same id."""
    ((entry_id, fields),) = stream_entries(store)
    store.delete("pdp:fleet:deltas")
    store.xadd("pdp:fleet:deltas", {"delta": change(fields[b"delta"])}, id=entry_id)


def _tampered(raw: bytes) -> bytes:
    envelope = json.loads(raw)
    delta = json.loads(base64.b64decode(envelope["payload"]))
    delta["changed"] = [{**rule, "priority": 1} for rule in delta["changed"]] or [{"id": "x"}]
    envelope["payload"] = base64.b64encode(json.dumps(delta).encode()).decode()
    return json.dumps(envelope).encode()


def _resigned(key: Any, **changes: Any) -> Callable[[bytes], bytes]:
    def change(raw: bytes) -> bytes:
        delta = open_delta(raw, TrustedKeys())  # read without verifying, to forge from it
        return encode_delta(dataclasses.replace(delta, **changes), key)

    return change


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("trimmed stream", "an entry is missing (trimmed stream?)"),
        ("missing entry", "delta 4-0 applies to version 3, the active one is 2"),
        ("tampered delta", "bad signature"),
        ("unknown key", "signed with unknown key"),
        ("unsigned delta", "only signed deltas are accepted"),
        ("wrong result hash", "does not hash to the announced SHA-256"),
        ("wrong carried signature", "is not the one the head names"),
    ],
)
def test_every_broken_delta_falls_back_to_the_full_snapshot_visibly(
    tmp_path: Path,
    publisher: Publisher,
    store: redis.Redis,
    follow: Callable[..., Reloader],
    trusted: TrustedKeys,
    start: ServerFactory,
    case: str,
    reason: str,
) -> None:
    _, holder, client = start(loaded=False)
    holder.activate_geo(GeoDatabase(CITY_DB))
    publisher.publish(initial(50))
    reloader = follow(publisher.url, holder)
    assert reloader.run_once() == "activated version 1"
    if case in ("trimmed stream", "missing entry"):
        publisher.next()
        assert reloader.run_once() == "activated version 2 (from 1 delta)"
        publisher.next()
        stored = publisher.next()
        if case == "trimmed stream":
            store.xtrim("pdp:fleet:deltas", maxlen=1, approximate=False)
        else:
            store.xdel("pdp:fleet:deltas", "3-0")
        expected = "activated version 4"
    else:
        store.delete("pdp:fleet:deltas")
        stored = publisher.next()
        generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
        _rewrite_last(
            store,
            {
                "tampered delta": _tampered,
                "unknown key": _resigned(load_private_key(tmp_path / "other.key")),
                "unsigned delta": _resigned(None),
                "wrong result hash": _resigned(publisher.key, sha256="0" * 64),
                "wrong carried signature": _resigned(publisher.key, snapshot_signature=("k", bytes(64))),
            }[case],
        )
        expected = "activated version 2"
    assert reloader.run_once() == expected
    status = client.status()
    assert status.policy_version == int(expected.split()[-1])
    assert status.policy_sha256 == payload_sha(stored, trusted)
    assert status.delta_fallbacks == 1
    assert reason in status.last_delta_fallback, status.last_delta_fallback
    assert status.last_error == ""  # the full snapshot was fine: nothing is wrong now
    assert status.rejections == 0


def test_a_publication_without_a_delta_is_fetched_whole_without_a_fallback(
    publisher: Publisher, follow: Callable[..., Reloader]
) -> None:
    publisher.publish(initial(20))
    reloader = follow(publisher.url)
    reloader.run_once()
    publisher.next(deltas=False)
    assert reloader.run_once() == "activated version 2"
    assert reloader.holder.status.delta_fallbacks == 0
    publisher.next()
    assert reloader.run_once() == "activated version 3 (from 1 delta)"


# --------------------------------------------------------------------------- idle and what a change costs


def test_idle_polls_cost_a_few_bytes_each(
    publisher: Publisher, store: redis.Redis, follow: Callable[..., Reloader], redis_server: RedisServer
) -> None:
    stored = publisher.publish(initial(2000))
    reloader = follow(publisher.url)
    assert reloader.run_once() == "activated version 1"
    polls = 100
    idle = egress_of(store, lambda: [reloader.run_once() for _ in range(polls)])
    per_poll = idle / polls
    print(f"idle: {per_poll:.0f} bytes per poll, {per_poll / POLL_SECONDS:.0f} bytes/s at the default interval")
    assert per_poll <= IDLE_BUDGET_PER_POLL

    # The same measurement of a store written without a head (older publishers): every poll is a GET.
    store.delete("pdp:fleet:head")
    legacy = follow(publisher.url)
    legacy.run_once()
    assert egress_of(store, legacy.run_once) > len(stored) > 100 * IDLE_BUDGET_PER_POLL


def test_a_change_costs_its_delta_and_a_rejected_snapshot_is_fetched_once(
    publisher: Publisher, store: redis.Redis, follow: Callable[..., Reloader], redis_server: RedisServer
) -> None:
    stored = publisher.publish(initial(2000))
    reloader = follow(publisher.url)
    reloader.run_once()
    publisher.next(edits=1)
    change = egress_of(store, reloader.run_once)
    print(f"one-rule change: {change} bytes of egress, a full fetch {len(stored)}: {change / len(stored):.2%}")
    assert reloader.holder.status.delta_activations == 1
    assert change <= 0.02 * len(stored)
    assert egress_of(store, reloader.run_once) <= IDLE_BUDGET_PER_POLL  # and then idle again

    # A snapshot the sidecar refuses (a replay) is fetched once, then only the head is asked.
    old = initial(2000)
    publish(sign(canonical(old), 1, publisher.key), publisher.url, 1)
    assert reloader.run_once().startswith("rejected: version 1 is lower")
    repeated = egress_of(store, lambda: [reloader.run_once() for _ in range(20)])
    assert repeated <= 20 * IDLE_BUDGET_PER_POLL
    assert reloader.run_once() == "unchanged (still rejected)"


def test_a_store_without_a_head_is_still_followed(redis_server: RedisServer, store: redis.Redis) -> None:
    store.set("pdp:plain", canonical(initial(3)))  # written by hand, or by an older publisher
    holder = PolicyHolder()
    reloader = Reloader(holder, open_source(redis_server.url("pdp:plain")))
    try:
        assert reloader.run_once() == "activated version 1"
        assert reloader.run_once() == "unchanged"
        store.set("pdp:plain", canonical(initial(3, version=2)))
        assert reloader.run_once() == "activated version 2"
    finally:
        reloader.stop()


def test_publish_writes_head_stream_and_notice_in_one_transaction(
    publisher: Publisher, store: redis.Redis, trusted: TrustedKeys
) -> None:
    first = publisher.publish(initial(10))
    assert store.get("pdp:fleet:head") == f"1 {hashlib.sha256(first).hexdigest()} -".encode()
    assert store.xlen("pdp:fleet:deltas") == 0
    second = publisher.next()
    assert store.get("pdp:fleet:head") == f"2 {hashlib.sha256(second).hexdigest()} 1".encode()
    ((entry_id, fields),) = stream_entries(store)
    assert entry_id == b"2-0"
    delta = open_delta(fields[b"delta"], trusted)
    assert (delta.base_version, delta.version) == (1, 2)
    assert delta.base_sha256 == payload_sha(first, trusted)
    assert delta.sha256 == payload_sha(second, trusted)
    # A YAML snapshot is stored as given, with a head and no delta.
    outcome = publish(b"version: 3\nrules: []\n", publisher.url, 3)
    assert "no delta (" in outcome
    assert "not canonical" in outcome
    head = store.get("pdp:fleet:head")
    assert isinstance(head, bytes)
    assert head.startswith(b"3 ")
    assert head.endswith(b" -")
    assert store.xlen("pdp:fleet:deltas") == 1


def test_a_source_without_keys_cannot_pass_an_unverified_delta_to_a_reloader_with_keys(
    tmp_path: Path, publisher: Publisher, store: redis.Redis, trusted: TrustedKeys
) -> None:
    """The reloader checks the rebuilt snapshot's signature itself: forgetting to give the
    source the keys (SourceOptions()) fails closed, it does not skip verification."""
    generate_keypair(tmp_path / "rogue.key", tmp_path / "rogue.pub")
    rogue = Publisher(publisher.url, load_private_key(tmp_path / "rogue.key"))
    publisher.publish(initial(20))
    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    reloader = Reloader(holder, open_source(publisher.url), keys=trusted)  # the source trusts nothing
    try:
        assert reloader.run_once() == "activated version 1"
        assert publisher.document is not None
        rogue.document = publisher.document
        rogue.next()  # a delta and a snapshot signed by a key the sidecar does not trust
        result = reloader.run_once()
        assert result.startswith("rejected: ")
        assert "signed with unknown key" in result
        assert holder.policy is not None
        assert holder.policy.version == 1
    finally:
        reloader.stop()


def test_a_delta_carried_by_the_notice_costs_no_request(
    publisher: Publisher, store: redis.Redis, follow: Callable[..., Reloader], trusted: TrustedKeys
) -> None:
    publisher.publish(initial(2000))
    reloader = follow(publisher.url)
    assert reloader.run_once() == "activated version 1"
    wait_until_subscribed(reloader)
    stored = publisher.next(notify=True)
    reloader.source.wait(10)  # the notice wakes the source (the reloader is driven by hand here)
    outcomes: list[str] = []
    cost = egress_of(store, lambda: outcomes.append(reloader.run_once()))
    assert outcomes == ["activated version 2 (from 1 delta)"]
    assert cost < 20  # nothing asked of Redis: the delta came with the notice (less INFO's own noise)
    policy = reloader.holder.policy
    assert policy is not None
    assert policy.sha256 == payload_sha(stored, trusted)
    assert reloader.run_once() == "unchanged"  # the head it derived is the head the publisher wrote


@pytest.mark.parametrize("notice", [b"garbage", b"not-a-delta-but-long-enough-to-look-like-one", "forged"])
def test_a_notice_that_is_no_good_delta_is_only_a_wake_up(
    tmp_path: Path,
    publisher: Publisher,
    store: redis.Redis,
    follow: Callable[..., Reloader],
    trusted: TrustedKeys,
    notice: bytes | str,
) -> None:
    publisher.publish(initial(50))
    reloader = follow(publisher.url)
    assert reloader.run_once() == "activated version 1"
    wait_until_subscribed(reloader)
    if notice == "forged":  # a well-formed delta from the active version, signed by a key nobody trusts
        generate_keypair(tmp_path / "rogue.key", tmp_path / "rogue.pub")
        rogue = Publisher(publisher.url, load_private_key(tmp_path / "rogue.key"), document=publisher.document)
        rogue.next()
        ((_, fields),) = stream_entries(store)
        notice = fields[b"delta"]
        store.delete("pdp:fleet:deltas")
        publisher.publish(initial(50))  # the store back at version 1, as published by the real key
    stored = publisher.next()
    assert isinstance(notice, bytes)
    store.publish("pdp:fleet:updates", notice)
    reloader.source.wait(10)
    assert reloader.run_once() == "activated version 2 (from 1 delta)"  # from the stream, as at any poll
    assert reloader.holder.status.delta_fallbacks == 0
    assert reloader.holder.policy is not None
    assert reloader.holder.policy.sha256 == payload_sha(stored, trusted)


def wait_until_subscribed(reloader: Reloader) -> None:
    """Until the source has subscribed, its wake-up for that used up: the next is a notice's."""
    source = reloader.source
    assert isinstance(source, RedisSource)
    assert source.subscribed.wait(30), "the source never subscribed"
    source.wait(0)


def test_the_publish_and_sign_commands(tmp_path: Path, redis_server: RedisServer, store: redis.Redis) -> None:
    import subprocess
    import sys

    pdp = [sys.executable, "-m", "pdp"]
    url = redis_server.url("pdp:cli")
    key = tmp_path / "ops.key"
    generate_keypair(key, tmp_path / "ops.pub")
    outcomes = []
    for version, extra in ((1, []), (2, []), (3, ["--no-delta"]), (4, ["--compress", "gzip", "--stream-maxlen", "5"])):
        document = initial(40, version=version)
        document["rules"][7]["priority"] = version
        rules = tmp_path / f"v{version}.yaml"  # JSON is YAML: stored as canonical JSON all the same
        rules.write_text(json.dumps(document, indent=2))
        result = subprocess.run(
            [*pdp, "snapshot", "publish", str(rules), "--to", url, "--key", str(key), *extra],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        outcomes.append(result.stdout)
    assert "no delta (first publication)" in outcomes[0]
    assert "delta 1 -> 2" in outcomes[1]
    assert "no delta (turned off)" in outcomes[2]
    assert "delta 3 -> 4" in outcomes[3]
    stored = store.get("pdp:cli")
    assert isinstance(stored, bytes)
    assert stored[:2] == b"\x1f\x8b"
    assert [entry_id for entry_id, _ in cast("list[tuple[bytes, Any]]", store.xrange("pdp:cli:deltas"))] == [
        b"2-0",
        b"4-0",
    ]

    signed = tmp_path / "v4.signed.gz"
    result = subprocess.run(
        [*pdp, "snapshot", "sign", str(tmp_path / "v4.yaml"), "--key", str(key), "--out", str(signed),
         "--compress", "gzip"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    holder = PolicyHolder()
    reloader = Reloader(holder, open_source(signed.as_uri()), keys=TrustedKeys.from_files([tmp_path / "ops.pub"]))
    assert reloader.run_once() == "activated version 4"
