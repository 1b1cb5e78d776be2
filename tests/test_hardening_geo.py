"""The GeoIP database and addresses under attack: files written in place, unusual address forms.

Issue #12, items 2 and 9. Every test here runs against a real server (in this process or a
real `pdp serve`) and MaxMind's test databases.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from pdp.client import Client
from pdp.geo import GeoDatabase
from pdp.model import Verdict
from pdp.policy import PolicyHolder
from pdp.reload import GeoWatcher

from .conftest import CITY_DB, COUNTRY_DB, policy_from

PDP = [sys.executable, "-m", "pdp"]

CN_EVERYWHERE = """
version: 1
rules:
  - id: cn-all
    effect: deny
    jurisdiction: [CN]
    legal_basis: Order 17/2020
"""

# Mainland-China addresses of both test databases (City and Country): 256 IPv4 and 256 IPv6,
# so that with a one-entry cache every Check is a database lookup.
CN_ADDRESSES = [f"175.16.199.{n}" for n in range(256)] + [f"2001:250::{n:x}" for n in range(1, 257)]


def wait_for(predicate: Callable[[], bool], what: str, deadline: float = 30.0) -> None:
    """Poll observable state until ``predicate`` holds; fail naming ``what`` after ``deadline``."""
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline:.0f} s waiting for {what}")
        time.sleep(0.005)


@dataclass
class CnStream:
    """A thread sending Checks for mainland-China addresses until stopped; it records
    every answer that is not a DENY by cn-all, and every failed call."""

    client: Client
    checks: int = 0
    escaped: list[str] = field(default_factory=list)  # ALLOW (or another rule) for a CN address
    failures: list[str] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def __enter__(self) -> CnStream:
        self.thread = threading.Thread(target=self._run, name="cn-stream", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exception: object) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def _run(self) -> None:
        position = 0
        while not self.stopping.is_set():
            address = CN_ADDRESSES[position % len(CN_ADDRESSES)]
            position += 1
            try:
                result = self.client.check(address, "m-1", timeout=10)
            except grpc.RpcError as error:
                self.failures.append(f"{address}: {error.code()} {error.details()}")
                if len(self.failures) > 20:
                    return
                continue
            if result.verdict != Verdict.DENY or result.rule_id != "cn-all":
                self.escaped.append(f"{address}: {result.verdict.name} {result.location}")
            self.checks += 1

    def advanced(self, since: int, by: int = 50) -> Callable[[], bool]:
        return lambda: self.checks >= since + by or bool(self.failures)


def serve(tmp_path: Path, database: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """A real `pdp serve` on a Unix socket, returned once it prints where it listens."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(CN_EVERYWHERE)
    target = f"unix:{tmp_path}/pdp.sock"
    process = subprocess.Popen(
        [*PDP, "serve", "--listen", target, "--snapshot", str(rules), "--geoip-db", str(database), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    banner = process.stdout.readline()
    assert f"listening on {target}" in banner, (banner, process.stderr.read() if process.stderr else "")
    return process, target


def memfd_mappings(pid: int) -> set[str]:
    """The private database copies (memfds) mapped into process ``pid``, by inode."""
    inodes = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/memfd:pdp-geoip"):
            inodes.add(parts[4])
    return inodes


# --------------------------------------------------------------------------- item 2: files written in place


def test_database_overwritten_in_place_in_chunks_and_truncated_never_reaches_the_serving_reader(
    tmp_path: Path,
) -> None:
    """`cp new.mmdb db.mmdb` and friends over the served file, one state at a time, each held
    until the watcher has judged it and a stream of CN checks has run against it."""
    live = tmp_path / "GeoIP2-City.mmdb"
    shutil.copy(CITY_DB, live)
    old, new = CITY_DB.read_bytes(), COUNTRY_DB.read_bytes()
    assert len(new) < len(old)
    process, target = serve(tmp_path, live, "--geoip-poll-seconds", "0.05", "--cache-size", "1")
    client = Client(target, timeout=10)
    try:
        first = client.status()
        assert (first.geoip_type, first.geoip_rejections, first.geoip_reloads) == ("GeoIP2-City", 0, 0)
        with CnStream(client) as stream:
            wait_for(stream.advanced(0), "the first CN checks")

            def hold(state: str, write: Callable[[], None]) -> None:
                before = client.status().geoip_rejections
                write()
                since = stream.checks
                wait_for(lambda: client.status().geoip_rejections > before, f"the watcher to refuse {state}")
                wait_for(stream.advanced(since), f"CN checks while the file is {state}")
                status = client.status()
                # GetStatus says what serves: the loaded database, and why the file on disk is not it.
                serving = (status.geoip_type, status.geoip_build, status.geoip_reloads)
                assert serving == ("GeoIP2-City", first.geoip_build, 0), state
                assert str(live) in status.last_error, (state, status.last_error)
                assert "keeps serving" in status.last_error, (state, status.last_error)

            def write_at(offset: int, data: bytes, truncate: bool = False) -> Callable[[], None]:
                def write() -> None:
                    with live.open("r+b") as handle:
                        if truncate:
                            handle.truncate(0)
                        handle.seek(offset)
                        handle.write(data)

                return write

            # In place without truncating (dd conv=notrunc, rsync --inplace): new bytes over old ones.
            for start in range(0, len(new), 4096):
                hold(f"new[:{start + 4096}] over the old file", write_at(start, new[start : start + 4096]))
            # cp: truncate, then write in chunks.
            hold("truncated to nothing", write_at(0, b"", truncate=True))
            hold("half written", write_at(0, new[: len(new) // 2]))
            write_at(len(new) // 2, new[len(new) // 2 :])()
            wait_for(lambda: client.status().geoip_reloads == 1, "the complete new file to be loaded")
            since = stream.checks
            wait_for(stream.advanced(since), "CN checks on the new database")
        status = client.status()
        assert (status.geoip_type, status.geoip_rejections) == ("GeoIP2-Country", 7)
        # The old copy is released once no call uses it: one private copy stays mapped.
        wait_for(lambda: len(memfd_mappings(process.pid)) == 1, "the old database copy to be unmapped")
        assert stream.failures == []
        assert stream.escaped == []
        assert process.poll() is None, "the server died"
    finally:
        client.close()
        died = process.poll()  # a signal number here is the crash itself (SIGBUS is -7)
        process.terminate()
        _, stderr = process.communicate(timeout=30)
        if died is not None:
            pytest.fail(f"the server died with exit status {died}: {stderr[-2000:]}")
    assert process.returncode in (0, -15), (process.returncode, stderr[-3000:])


def test_bytes_written_over_the_file_never_reach_an_open_database(tmp_path: Path) -> None:
    live = tmp_path / "live.mmdb"
    shutil.copy(CITY_DB, live)
    geo = GeoDatabase(live, cache_size=1)
    probes = [*CN_ADDRESSES[:8], "81.2.69.142", "216.160.83.57", "2001:480:10::1", "2001:2e0::1"]
    expected = [geo.lookup_uncached(address) for address in probes]
    size = live.stat().st_size
    with live.open("r+b") as handle:  # same size: no SIGBUS, every byte different
        handle.write(b"\xff" * size)
    assert [geo.lookup_uncached(address) for address in probes] == expected
    live.write_bytes(b"")  # truncated: reading a mapped file beyond its end is SIGBUS
    assert [geo.lookup_uncached(address) for address in probes] == expected


def metadata_value_offset(data: bytes, key: bytes) -> int:
    """Offset of the last byte of the integer that follows ``key`` in the metadata section."""
    marker = data.rindex(b"\xab\xcd\xefMaxMind.com")
    start = data.index(key, marker)
    control = data[start + len(key)]
    size = control & 0x1F
    return start + len(key) + (2 if control >> 5 == 0 else 1) + size - 1


def test_an_in_place_change_that_keeps_size_and_mtime_is_still_seen(tmp_path: Path) -> None:
    live = tmp_path / "live.mmdb"
    shutil.copy(CITY_DB, live)
    holder = PolicyHolder()
    holder.activate(policy_from(CN_EVERYWHERE), GeoDatabase(live), "test")
    build = holder.active.geo.build_epoch if holder.active else 0
    watcher = GeoWatcher(holder, str(live), cache_size=10)
    data = bytearray(live.read_bytes())
    data[metadata_value_offset(bytes(data), b"build_epoch")] ^= 1  # a valid database of another build
    before = live.stat()
    with live.open("r+b") as handle:
        handle.write(data)
    os.utime(live, ns=(before.st_atime_ns, before.st_mtime_ns))  # what `touch -r` or a careful tool does
    after = live.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert watcher.run_once().startswith("reloaded")
    assert holder.active is not None
    assert holder.active.geo.build_epoch == build ^ 1


def test_a_changed_copy_claiming_the_serving_build_is_refused(tmp_path: Path) -> None:
    live = tmp_path / "live.mmdb"
    shutil.copy(CITY_DB, live)
    holder = PolicyHolder()
    holder.activate(policy_from(CN_EVERYWHERE), GeoDatabase(live), "test")
    serving = holder.active
    watcher = GeoWatcher(holder, str(live), cache_size=10)
    data = bytearray(live.read_bytes())
    data[data.index(b"Beijing") if b"Beijing" in data else data.index(b"London")] ^= 0x20  # a name, not the structure
    staged = tmp_path / "staged.mmdb"
    staged.write_bytes(data)
    staged.replace(live)
    result = watcher.run_once()
    assert result.startswith("rejected: "), result
    assert "same database" in result
    assert holder.active is serving
    assert holder.status.geoip_rejections == 1
    assert watcher.run_once() == "unchanged"  # refused until the file changes again
    shutil.copy(CITY_DB, staged)  # the serving bytes again are not refused
    staged.replace(live)
    assert watcher.run_once().startswith("reloaded")
    assert holder.status.geoip_rejections == 1


def test_a_replaced_database_is_released_only_after_the_last_call_using_it(tmp_path: Path) -> None:
    live = tmp_path / "live.mmdb"
    shutil.copy(CITY_DB, live)
    holder = PolicyHolder()
    holder.activate(policy_from(CN_EVERYWHERE), GeoDatabase(live, cache_size=1), "test")
    in_flight = holder.active  # what a request being decided holds
    assert in_flight is not None
    old = weakref.ref(in_flight.geo)
    watcher = GeoWatcher(holder, str(live), cache_size=1)
    staged = tmp_path / "staged.mmdb"
    shutil.copy(COUNTRY_DB, staged)
    staged.replace(live)
    assert watcher.run_once().startswith("reloaded")
    assert holder.active is not None
    assert holder.active.geo.database_type == "GeoIP2-Country"
    # The request still finishes on the database it started with.
    assert [in_flight.geo.lookup_uncached(a).country for a in CN_ADDRESSES[:3]] == ["CN"] * 3
    assert in_flight.geo.lookup_uncached("81.2.69.142").subdivisions == ("GB-ENG",)  # City data
    del in_flight
    gc.collect()
    assert old() is None, "the replaced database outlived the last call using it"
