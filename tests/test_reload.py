"""Hot reload from real stores: files, an HTTP server, redis-server; signing; persistence."""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from pdp.config import ServeConfig
from pdp.geo import GeoDatabase
from pdp.geo_watch import GeoWatcher
from pdp.model import Verdict
from pdp.publish import publish
from pdp.reload import Reloader, StartupError
from pdp.server import start_server
from pdp.signing import TrustedKeys, generate_keypair, load_private_key, sign
from pdp.sources import SourceOptions, open_source
from pdp.state import Active, PolicyHolder

from .conftest import BAD_DATA, CITY_DB, COUNTRY_DB, replace_file
from .servers import HttpStore, RedisServer, start_redis

CN = "175.16.199.1"


def snapshot(version: int, effect: str = "deny", rule_id: str = "") -> bytes:
    """A one-rule snapshot for CN whose verdict is ``effect``."""
    rule_id = rule_id or f"cn-{effect}-{version}"
    basis = "legal_basis: Order 17, " if effect == "deny" else ""
    return (
        f"version: {version}\nrules:\n  - {{id: {rule_id}, effect: {effect}, {basis}jurisdiction: [CN], priority: 1}}\n"
    ).encode()


def tamper(envelope: bytes, **changes: object) -> bytes:
    """A signed envelope with some fields replaced, the signature left as it was."""
    return json.dumps({**json.loads(envelope), **changes}).encode()


def flip(version: int) -> bytes:
    """Odd versions deny CN, even versions allow it."""
    return snapshot(version, "deny" if version % 2 else "allow", rule_id=f"r{version}")


@pytest.fixture
def holder() -> PolicyHolder:
    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    return holder


def version_of(holder: PolicyHolder) -> int | None:
    return holder.policy.version if holder.policy else None


def verdict_for_cn(holder: PolicyHolder) -> Verdict:
    from pdp.model import Action, Meeting

    active = holder.active
    assert active is not None
    return active.policy.decide(active.geo.locate(CN), Action.JOIN, Meeting("m"), 0.0).verdict


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "k.key", tmp_path / "k.pub"
    generate_keypair(private, public)
    return private, public


def activation_event(holder: PolicyHolder, version: int) -> threading.Event:
    """An event set when ``version`` becomes active: the tests wait on it, never sleep."""
    reached = threading.Event()

    def listener(active: Active) -> None:
        if active.policy.version == version:
            reached.set()

    holder.subscribe(listener)
    return reached


# --------------------------------------------------------------------------- file source


def test_file_source_sees_rewrites_renames_and_configmap_swaps(tmp_path: Path, holder: PolicyHolder) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(snapshot(1))
    reloader = Reloader(holder, open_source(path.as_uri()))
    assert reloader.run_once() == "activated version 1"
    assert reloader.run_once() == "unchanged"

    path.touch()  # a new mtime, the same bytes
    assert reloader.run_once() == "unchanged"

    replacement = tmp_path / "new.yaml"
    replacement.write_bytes(snapshot(2))
    replacement.replace(path)  # mv: a new inode
    assert reloader.run_once() == "activated version 2"

    # Kubernetes mounts a ConfigMap as rules.yaml -> ..data/rules.yaml, ..data -> ..2026_v1.
    mount = tmp_path / "mount"
    (mount / "..v1").mkdir(parents=True)
    (mount / "..v1" / "rules.yaml").write_bytes(snapshot(3))
    (mount / "..data").symlink_to("..v1")
    (mount / "rules.yaml").symlink_to("..data/rules.yaml")
    watched = Reloader(holder, open_source((mount / "rules.yaml").as_uri()))
    assert watched.run_once() == "activated version 3"
    (mount / "..v2").mkdir()
    (mount / "..v2" / "rules.yaml").write_bytes(snapshot(4))
    (mount / "..data_tmp").symlink_to("..v2")
    (mount / "..data_tmp").replace(mount / "..data")
    assert watched.run_once() == "activated version 4"


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("truncated", lambda k: snapshot(9)[:30], "invalid YAML"),
        ("invalid YAML", lambda k: b"version: 9\nrules: [\n", "invalid YAML"),
        ("schema error", lambda k: b"version: 9\nrules: {}\n", "rules: must be a list"),
        ("no jurisdiction", lambda k: b"version: 9\nrules:\n  - {id: x, effect: allow}\n", "jurisdiction: required"),
        ("lower version", lambda k: snapshot(1), "version 1 is lower than the active 5 (replay)"),
        ("same version, other content", lambda k: snapshot(5, "allow"), "already active with other content"),
    ],
)
def test_rejections_keep_the_last_good_policy(
    tmp_path: Path, holder: PolicyHolder, name: str, make: Callable[[object], bytes], reason: str
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(snapshot(5))
    reloader = Reloader(holder, open_source(path.as_uri()))
    assert reloader.run_once() == "activated version 5"
    replace_file(path, make(None))
    result = reloader.run_once()
    assert result.startswith("rejected: ")
    assert reason in result
    assert version_of(holder) == 5
    assert reason in holder.status.last_error
    assert holder.status.rejections == 1
    # The rejected bytes are fetched again but not parsed again, and do not log again.
    assert reloader.run_once() == "unchanged (still rejected)"
    replace_file(path, snapshot(6))
    assert reloader.run_once() == "activated version 6"
    assert holder.status.last_error == ""


def test_same_content_again_is_a_no_op(tmp_path: Path, holder: PolicyHolder) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(snapshot(5))
    first = Reloader(holder, open_source(path.as_uri()))
    first.run_once()
    activated_at = holder.active.activated_at if holder.active else 0
    second = Reloader(holder, open_source(path.as_uri()))
    assert second.run_once() == "unchanged content (version 5)"
    assert holder.active is not None
    assert holder.active.activated_at == activated_at


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("unsigned", "not signed: a trusted key is configured"),
        ("bad signature", "bad signature"),
        ("unknown key", "signed with unknown key"),
        ("version swapped", "bad signature"),
        ("payload version differs", "envelope says version 8, the rules inside say 7"),
    ],
)
def test_signature_rejections(
    tmp_path: Path, holder: PolicyHolder, keys: tuple[Path, Path], name: str, reason: str
) -> None:
    private, public = keys
    key = load_private_key(private)
    path = tmp_path / "rules.yaml"
    path.write_bytes(sign(snapshot(5), 5, key))
    reloader = Reloader(holder, open_source(path.as_uri()), keys=TrustedKeys.from_files([public]))
    assert reloader.run_once() == "activated version 5"

    if name == "unsigned":
        data = snapshot(7)
    elif name == "bad signature":
        data = tamper(sign(snapshot(7), 7, key), payload=base64.b64encode(snapshot(7, "allow")).decode())
    elif name == "unknown key":
        generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
        data = sign(snapshot(7), 7, load_private_key(tmp_path / "other.key"))
    elif name == "version swapped":
        data = tamper(sign(snapshot(7), 7, key), version=8)
    else:
        data = sign(snapshot(7), 8, key)
    replace_file(path, data)
    result = reloader.run_once()
    assert result.startswith("rejected: ")
    assert reason in result
    assert version_of(holder) == 5


def test_key_rotation_accepts_either_trusted_key(tmp_path: Path, holder: PolicyHolder) -> None:
    for name in ("old", "new"):
        generate_keypair(tmp_path / f"{name}.key", tmp_path / f"{name}.pub")
    trusted = TrustedKeys.from_files([tmp_path / "old.pub", tmp_path / "new.pub"])
    path = tmp_path / "rules.yaml"
    reloader = Reloader(holder, open_source(path.as_uri()), keys=trusted)
    for version, name in ((1, "old"), (2, "new")):
        replace_file(path, sign(snapshot(version), version, load_private_key(tmp_path / f"{name}.key")))
        assert reloader.run_once() == f"activated version {version}"


# --------------------------------------------------------------------------- persistence and outages


def test_store_down_at_start_serves_persisted_snapshot_marked_stale(
    tmp_path: Path, keys: tuple[Path, Path], http_store: HttpStore
) -> None:
    private, public = keys
    trusted = TrustedKeys.from_files([public])
    http_store.store.files["/rules"] = sign(snapshot(3), 3, load_private_key(private))
    state = tmp_path / "state"
    first = PolicyHolder()
    first.activate_geo(GeoDatabase(CITY_DB))
    Reloader(first, open_source(http_store.url("/rules")), keys=trusted, state_dir=state).initial()
    assert version_of(first) == 3
    assert (state / "snapshot").is_file()

    http_store.store.status_override = 503
    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    reloader = Reloader(holder, open_source(http_store.url("/rules")), keys=trusted, state_dir=state)
    reloader.initial()
    assert version_of(holder) == 3
    assert holder.status.stale
    assert "HTTP 503" in holder.status.last_error

    http_store.store.status_override = 0
    http_store.store.files["/rules"] = sign(snapshot(4), 4, load_private_key(private))
    assert reloader.run_once() == "activated version 4"
    assert not holder.status.stale


def test_persisted_snapshot_is_reverified_at_start(
    tmp_path: Path, keys: tuple[Path, Path], http_store: HttpStore
) -> None:
    private, public = keys
    trusted = TrustedKeys.from_files([public])
    http_store.store.files["/rules"] = sign(snapshot(3), 3, load_private_key(private))
    state = tmp_path / "state"
    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    Reloader(holder, open_source(http_store.url("/rules")), keys=trusted, state_dir=state).initial()
    persisted = state / "snapshot"
    persisted.write_bytes(tamper(persisted.read_bytes(), payload=base64.b64encode(snapshot(9)).decode()))

    http_store.store.status_override = 503
    fresh = PolicyHolder()
    fresh.activate_geo(GeoDatabase(CITY_DB))
    Reloader(fresh, open_source(http_store.url("/rules")), keys=trusted, state_dir=state).initial()
    assert fresh.active is None  # the tampered file is not served


def test_nothing_to_serve_means_unavailable_with_a_clear_message(tmp_path: Path) -> None:
    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    Reloader(holder, open_source((tmp_path / "absent.yaml").as_uri())).initial()
    running = start_server(ServeConfig(listen=f"unix:{tmp_path}/s.sock"), holder)
    try:
        from pdp.client import Client

        with Client(running.address, timeout=5) as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.check(CN, "m")
            error = caught.value
            assert isinstance(error, grpc.Call)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "no policy" in (error.details() or "")
            status = client.status()
            assert not status.serving
            assert "absent.yaml" in status.last_error
    finally:
        running.stop(grace=0)


def test_invalid_snapshot_with_nothing_persisted_refuses_to_start(tmp_path: Path, holder: PolicyHolder) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(b"version: 1\nrules:\n  - {id: x, effect: deny, jurisdiction: [XX]}\n")
    with pytest.raises(StartupError, match="'XX' is not an ISO 3166-1"):
        Reloader(holder, open_source(path.as_uri())).initial()


def test_unwritable_state_dir_still_activates_and_says_so(tmp_path: Path, holder: PolicyHolder) -> None:
    # A regular file where the directory should be: unwritable even for root.
    state = tmp_path / "state"
    state.write_text("not a directory")
    path = tmp_path / "rules.yaml"
    path.write_bytes(snapshot(2))
    reloader = Reloader(holder, open_source(path.as_uri()), state_dir=state)
    assert reloader.run_once() == "activated version 2"
    assert version_of(holder) == 2
    assert "cannot persist the snapshot" in holder.status.last_error


def test_rejection_reason_is_visible_in_get_status(tmp_path: Path, holder: PolicyHolder) -> None:
    from pdp.client import Client

    path = tmp_path / "rules.yaml"
    path.write_bytes(snapshot(4))
    reloader = Reloader(holder, open_source(path.as_uri()))
    reloader.run_once()
    replace_file(path, snapshot(3))
    reloader.run_once()
    running = start_server(ServeConfig(listen=f"unix:{tmp_path}/s.sock"), holder)
    try:
        with Client(running.address, timeout=5) as client:
            status = client.status()
        assert status.policy_version == 4
        assert "version 3 is lower than the active 4 (replay)" in status.last_error
        assert status.last_fetch_result.startswith("rejected: ")
        assert (status.activations, status.rejections) == (1, 1)
    finally:
        running.stop(grace=0)


# --------------------------------------------------------------------------- HTTP


def test_http_polls_get_304_and_rejected_etags_are_not_remembered(http_store: HttpStore, holder: PolicyHolder) -> None:
    store = http_store.store
    store.files["/rules.yaml"] = snapshot(1)
    good_etag = store.etag(snapshot(1))
    reloader = Reloader(holder, open_source(http_store.url("/rules.yaml")))
    assert reloader.run_once() == "activated version 1"
    for _ in range(3):
        assert reloader.run_once() == "unchanged"
    assert store.requests["304"] == 3
    assert store.if_none_match[1:] == [good_etag] * 3

    store.files["/rules.yaml"] = b"version: 2\nrules: [\n"  # corrupt body, new ETag
    assert reloader.run_once().startswith("rejected: ")
    assert reloader.run_once() == "unchanged (still rejected)"
    # The second poll still asked with the last *good* ETag and got the body again.
    assert store.if_none_match[-1] == good_etag
    assert store.requests["200"] == 3

    store.files["/rules.yaml"] = snapshot(2)
    assert reloader.run_once() == "activated version 2"
    assert version_of(holder) == 2


def test_http_errors_backoff_and_bearer_token(tmp_path: Path, http_store: HttpStore, holder: PolicyHolder) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    http_store.store.files["/r"] = snapshot(1)
    source = open_source(http_store.url("/r"), SourceOptions(bearer_token_file=str(token), timeout=5))
    reloader = Reloader(holder, source, poll_seconds=1.0, max_backoff_seconds=8.0)
    assert reloader.run_once() == "activated version 1"
    assert http_store.store.authorization[-1] == "Bearer s3cret"
    http_store.store.status_override = 500
    waits = []
    for _ in range(6):
        assert reloader.run_once().startswith("error: ")
        waits.append(reloader.next_wait())
    assert holder.status.stale
    assert 1.6 <= waits[0] <= 2.4  # doubled once, with ±20% jitter
    assert all(wait <= 8.0 * 1.2 for wait in waits)  # capped
    assert version_of(holder) == 1
    http_store.store.status_override = 0
    assert reloader.run_once() == "unchanged"
    assert not holder.status.stale
    assert 0.8 <= reloader.next_wait() <= 1.2


# --------------------------------------------------------------------------- Redis


def start_following(holder: PolicyHolder, url: str, poll_seconds: float) -> Reloader:
    reloader = Reloader(holder, open_source(url), poll_seconds=poll_seconds)
    reloader.start()
    return reloader


def test_redis_publication_is_followed_through_pubsub(redis_server: RedisServer, holder: PolicyHolder) -> None:
    url = redis_server.url("pdp:test")
    publish(snapshot(1, "allow"), url, 1)
    reloader = Reloader(holder, open_source(url), poll_seconds=60)
    reloader.initial()
    assert verdict_for_cn(holder) == Verdict.ALLOW
    reloader.start()
    try:
        reached = activation_event(holder, 2)
        publish(snapshot(2, "deny"), url, 2)
        # The poll is a minute away: only the pub/sub notice (or, had the publication come
        # before the subscription, the wake-up once subscribed) can have woken the reloader.
        assert reached.wait(timeout=10.0)
        assert verdict_for_cn(holder) == Verdict.DENY
    finally:
        reloader.stop()


def test_redis_lost_notices_are_caught_by_the_poll(redis_server: RedisServer, holder: PolicyHolder) -> None:
    url = redis_server.url("pdp:lost")
    publish(snapshot(1), url, 1)
    reloader = start_following(holder, url, poll_seconds=0.3)
    try:
        reached = activation_event(holder, 2)
        publish(snapshot(2), url, 2, notify=False)
        assert reached.wait(timeout=0.3 * 1.2 * 2 + 2)  # within the (jittered) poll interval, with slack
    finally:
        reloader.stop()


def test_redis_down_mid_run_keeps_serving_and_recovers(tmp_path: Path, holder: PolicyHolder) -> None:
    server = start_redis(tmp_path / "r1")
    url = server.url("pdp:outage")
    publish(snapshot(1), url, 1)
    reloader = Reloader(holder, open_source(url), poll_seconds=0.2)
    reloader.initial()
    server.stop()
    assert reloader.run_once().startswith("error: ")
    assert holder.status.stale
    assert version_of(holder) == 1
    restarted = start_redis(tmp_path / "r2", port=server.port)
    try:
        publish(snapshot(2), url, 2)
        assert reloader.run_once() == "activated version 2"
        assert not holder.status.stale
    finally:
        reloader.stop()
        restarted.stop()


def test_fan_out_fifty_sidecars_follow_one_publish(redis_server: RedisServer) -> None:
    url = redis_server.url("pdp:fanout")
    publish(snapshot(1), url, 1)
    geo = GeoDatabase(CITY_DB)
    holders, reloaders, events = [], [], []
    for _ in range(50):
        holder = PolicyHolder()
        holder.activate_geo(geo)
        reloader = Reloader(holder, open_source(url), poll_seconds=60)
        reloader.initial()
        holders.append(holder)
        reloaders.append(reloader)
        events.append(activation_event(holder, 2))
    for reloader in reloaders:
        reloader.start()
    try:
        # Every subscriber must be listening before the notice goes out: ask Redis.
        import redis

        client = redis.Redis(port=redis_server.port)
        deadline = time.monotonic() + 10
        while client.pubsub_numsub("pdp:fanout:updates")[0][1] < 50:
            assert time.monotonic() < deadline, "the 50 subscribers never all registered"
            threading.Event().wait(0.01)
        client.close()
        publish(snapshot(2), url, 2)
        published = time.monotonic()
        assert all(event.wait(timeout=2.0) for event in events)
        spread = time.monotonic() - published
        print(f"fan-out: 50 sidecars activated version 2 within {spread * 1000:.0f} ms of the publish")
    finally:
        with ThreadPoolExecutor(max_workers=50) as pool:  # stopping is a wait each; wait together
            list(pool.map(lambda reloader: reloader.stop(), reloaders))


# --------------------------------------------------------------------------- under load


Finish = Callable[[], list[BaseException]]


def hammer(call: Callable[[], None], count: int) -> Finish:
    """Run ``call`` in ``count`` threads until the returned function is called;
    that function stops and joins them and returns every failure."""
    stop = threading.Event()
    failures: list[BaseException] = []

    def loop() -> None:
        calls = 0
        while not stop.is_set() or calls < 10:
            calls += 1
            try:
                call()
            except BaseException as error:  # every failure is the finding
                failures.append(error)

    threads = [threading.Thread(target=loop) for _ in range(count)]
    for thread in threads:
        thread.start()

    def finish() -> list[BaseException]:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        return failures

    return finish


def test_no_torn_state_under_100_alternating_publications(tmp_path: Path) -> None:
    from pdp.client import Client

    path = tmp_path / "rules.yaml"
    path.write_bytes(flip(0))
    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    reloader = Reloader(holder, open_source(path.as_uri()))
    reloader.initial()
    running = start_server(ServeConfig(listen=f"unix:{tmp_path}/s.sock"), holder)
    client = Client(running.address, timeout=10)
    mismatches: list[str] = []
    versions_seen: set[int] = set()

    calling = threading.Event()

    def check() -> None:
        result = client.check(CN, "m")
        calling.set()
        versions_seen.add(result.policy_version)
        expected = Verdict.DENY if result.policy_version % 2 else Verdict.ALLOW
        if result.verdict != expected or result.rule_id != f"r{result.policy_version}":
            mismatches.append(f"v{result.policy_version}: {result.verdict.name} {result.rule_id}")

    finish = hammer(check, 4)
    try:
        assert calling.wait(timeout=30)
        for version in range(1, 101):
            replace_file(path, flip(version))
            assert reloader.run_once() == f"activated version {version}"
    finally:
        failures = finish()
    running.stop(grace=5)
    client.close()
    assert failures == []
    assert mismatches == []
    assert len(versions_seen) > 1


def test_geoip_reload_under_load_then_corrupt_file_is_rejected(tmp_path: Path) -> None:
    from pdp.client import Client

    database = tmp_path / "GeoIP2-City.mmdb"
    shutil.copy(CITY_DB, database)
    holder = PolicyHolder()
    holder.activate(
        __import__("pdp.rules", fromlist=["parse_policy"]).parse_policy(snapshot(1), "s"),
        GeoDatabase(database),
        "s",
    )
    watcher = GeoWatcher(holder, str(database), cache_size=100)
    running = start_server(ServeConfig(listen=f"unix:{tmp_path}/s.sock"), holder)
    client = Client(running.address, timeout=10)
    subdivisions: list[tuple[str, ...]] = []
    calling = threading.Event()

    def check() -> None:
        subdivisions.append(client.check(CN, "m").location.subdivisions)
        calling.set()

    assert client.check(CN, "m").location.subdivisions == ("CN-22",)  # the City database first
    finish = hammer(check, 4)
    try:
        assert calling.wait(timeout=30)  # the swap happens while calls are in flight
        # A Country database (valid, no subdivisions) renamed in, as geoipupdate does.
        staged = tmp_path / "staged.mmdb"
        shutil.copy(COUNTRY_DB, staged)
        staged.replace(database)
        assert watcher.run_once().startswith("reloaded build")
        # Then a corrupt one: refused, the Country database keeps serving.
        shutil.copy(BAD_DATA / "libmaxminddb" / "libmaxminddb-deep-nesting.mmdb", staged)
        staged.replace(database)
        assert watcher.run_once().startswith("rejected: ")
        assert watcher.run_once() == "unchanged"  # the same bad file is not retried
        assert client.check(CN, "m").location.subdivisions == ()
    finally:
        failures = finish()
    running.stop(grace=5)
    client.close()
    assert failures == []
    assert holder.status.geoip_reloads == 1
    assert holder.status.geoip_rejections == 1
    assert holder.active is not None
    assert holder.active.geo.database_type == "GeoIP2-Country"


def test_replaced_database_is_released_once_unused(tmp_path: Path, holder: PolicyHolder) -> None:
    import gc
    import weakref

    old = holder.active.geo if holder.active else GeoDatabase(CITY_DB)
    holder.activate_policy(__import__("pdp.rules", fromlist=["parse_policy"]).parse_policy(snapshot(1), "s"), "s")
    assert holder.active is not None
    old = holder.active.geo
    gone = weakref.ref(old)
    del old
    holder.activate_geo(GeoDatabase(CITY_DB))
    gc.collect()
    assert gone() is None
