"""A real Sentinel-managed Redis: a master, a replica and three redis-sentinel processes on free ports."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import redis

from .servers import RedisServer, _drain, free_port, require_binary, start_redis

SERVICE = "pdp-ha"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        threading.Event().wait(0.05)


@dataclass
class Sentinel:
    process: subprocess.Popen[str]
    port: int

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=5)

    def master_port(self) -> int:
        with self.client() as client:
            _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            return int(port)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=30)


def start_sentinel(folder: Path, master_port: int, quorum: int) -> Sentinel:
    binary = require_binary("redis-sentinel", "redis-sentinel")
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "sentinel.conf"  # sentinel rewrites its config: a file of its own
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} {quorum}\n"
        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
        f"sentinel failover-timeout {SERVICE} 10000\n"
    )
    process = subprocess.Popen([binary, str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if "+monitor master" in line:
            break
    else:
        raise RuntimeError(f"redis-sentinel on port {port} did not start")
    threading.Thread(target=_drain, args=(process.stdout,), daemon=True).start()
    return Sentinel(process, port)


@dataclass
class SentinelSet:
    master: RedisServer
    replica: RedisServer
    sentinels: list[Sentinel] = field(default_factory=list)

    def url(self, key: str, **query: str) -> str:
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        extra = "".join(f"&{name}={value}" for name, value in query.items())
        return f"redis+sentinel://{hosts}/{SERVICE}?key={key}{extra}"

    def failover(self) -> int:
        """Promote the replica with ``SENTINEL FAILOVER``; returns once it is master everywhere."""
        with self.sentinels[0].client() as client:
            client.execute_command("SENTINEL", "FAILOVER", SERVICE)
        wait_for(lambda: all(s.master_port() == self.replica.port for s in self.sentinels), "the sentinels to agree")
        wait_for(lambda: _role(self.replica.port) == "master", "the replica to be master")
        return self.replica.port


def _role(port: int) -> str:
    with redis.Redis(port=port, decode_responses=True) as client:
        return str(client.info("replication")["role"])


def _replica_known(sentinel: Sentinel, port: int) -> bool:
    with sentinel.client() as client:
        replicas = client.execute_command("SENTINEL", "REPLICAS", SERVICE)
    return any(
        int(entry["port"]) == port and entry["flags"] == "slave" and entry.get("master-link-status") == "ok"
        for entry in replicas
    )


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    master = start_redis(tmp_path / "master")
    replica = start_redis(tmp_path / "replica", None, "--replicaof", "127.0.0.1", str(master.port))
    servers = SentinelSet(master, replica)
    try:
        with redis.Redis(port=replica.port, decode_responses=True) as client:
            wait_for(lambda: client.info("replication")["master_link_status"] == "up", "the replica to sync")
        servers.sentinels = [start_sentinel(tmp_path / f"sentinel-{n}", master.port, quorum=2) for n in range(3)]
        for sentinel in servers.sentinels:
            wait_for(partial(_replica_known, sentinel, replica.port), f"sentinel {sentinel.port} to see the replica")
        yield servers
    finally:
        for sentinel in servers.sentinels:
            sentinel.stop()
        replica.stop()
        master.stop()
