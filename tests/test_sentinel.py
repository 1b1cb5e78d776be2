"""High availability through Redis itself: a sidecar follows a Sentinel failover under load, failing no Check."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pdp.client import Client
from pdp.sources.redis_url import redis_target

from .conftest import CITY_DB
from .fleet_data import canonical, initial
from .sentinels import SERVICE, SentinelSet, sentinel_set, wait_for  # noqa: F401  # the fixture

PDP = [sys.executable, "-m", "pdp"]
CN = "175.16.199.1"


def test_sentinel_urls_name_every_sentinel_and_the_service() -> None:
    target = redis_target("redis+sentinel://:s3cret@10.0.0.1:26380,10.0.0.2,[::1]:26381/pdp-ha?key=pdp:x&db=2")
    assert target.sentinels == (("10.0.0.1", 26380), ("10.0.0.2", 26379), ("::1", 26381))
    assert (target.service, target.db, target.password, target.key, target.head) == (
        "pdp-ha", 2, "s3cret", "pdp:x", "pdp:x:head"
    )  # fmt: skip
    assert "s3cret" not in repr(target)
    for bad, reason in [
        ("redis+sentinel:///pdp-ha", "name the sentinels"),
        ("redis+sentinel://h:1", "name the sentinels"),
        ("redis+sentinel://h:port/s", "malformed port"),
        ("redis+sentinel://h:1/s?db=x", "db must be a number"),
    ]:
        with pytest.raises(ValueError, match=reason):
            redis_target(bad)


def publish(path: Path, url: str, key: Path) -> str:
    result = subprocess.run(
        [*PDP, "snapshot", "publish", str(path), "--to", url, "--key", str(key), "--compress", "gzip"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


class Load:
    """Checks in a loop against a real sidecar, counting outcomes and the versions answered."""

    def __init__(self, target: str) -> None:
        self.client = Client(target, timeout=5)
        self.versions: list[int] = []
        self.failures: Counter[str] = Counter()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.versions.append(self.client.check(CN, "m-1", tags=["memorial"]).policy_version)
            except grpc.RpcError as error:
                self.failures[str(error.code())] += 1

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        self.client.close()


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    result = subprocess.run(
        [*PDP, "keygen", "--out", str(tmp_path / "ops")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return tmp_path / "ops.key", tmp_path / "ops.pub"


@pytest.fixture
def sidecar(tmp_path: Path, sentinel_set: SentinelSet, keys: tuple[Path, Path]) -> Iterator[str]:  # noqa: F811
    rules = tmp_path / "v1.json"
    rules.write_bytes(canonical(initial(200)))
    publish(rules, sentinel_set.url("pdp:ha"), keys[0])
    target = f"unix:{tmp_path}/pdp.sock"
    process = subprocess.Popen(
        [*PDP, "serve", "--listen", target, "--snapshot", sentinel_set.url("pdp:ha"), "--geoip-db", str(CITY_DB),
         "--snapshot-pubkey", str(keys[1]), "--poll-seconds", "0.5", "--log-format", "text"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None
    banner = process.stdout.readline()
    assert "policy version 1" in banner, (banner, process.stderr.read() if process.stderr else "")
    yield target
    process.terminate()
    process.communicate(timeout=30)


def test_failover_under_load_fails_no_check(
    tmp_path: Path,
    sentinel_set: SentinelSet,  # noqa: F811
    sidecar: str,
    keys: tuple[Path, Path],
) -> None:
    load = Load(sidecar)
    try:
        wait_for(lambda: len(load.versions) >= 200, "checks before the failover")
        new_master = sentinel_set.failover()
        assert new_master == sentinel_set.replica.port
        # The old master goes away: the sidecar can only be reading the new one from here on.
        sentinel_set.master.stop()
        served_during_failover = len(load.versions)
        second = initial(200, version=2)
        second["rules"][17]["priority"] = 999
        (tmp_path / "v2.json").write_bytes(canonical(second))
        outcome = publish(tmp_path / "v2.json", sentinel_set.url("pdp:ha"), keys[0])
        assert "delta 1 -> 2" in outcome  # written to the new master, which had version 1 replicated
        wait_for(lambda: load.versions[-1] == 2, "the sidecar to serve version 2 from the new master")
        wait_for(lambda: len(load.versions) >= served_during_failover + 200, "checks after the failover")
    finally:
        load.stop()
    assert not load.failures, load.failures
    assert set(load.versions) == {1, 2}
    assert load.versions == sorted(load.versions)  # never back to version 1 once 2 was served
    with Client(sidecar) as client:
        status = client.status()
    assert status.policy_version == 2
    assert status.delta_activations == 1
    assert SERVICE in status.policy_source
    print(f"failover: {len(load.versions)} checks, none failed; version 2 via delta from the new master")
