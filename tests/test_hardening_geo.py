"""The GeoIP database and addresses under attack: files written in place, unusual address forms.

Issue #12, items 2 and 9. Every test here runs against a real server (in this process or a
real `pdp serve`) and MaxMind's test databases.
"""

from __future__ import annotations

import gc
import ipaddress
import json
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
from pdp.geo_watch import GeoWatcher
from pdp.model import Location, Verdict
from pdp.state import PolicyHolder

from .conftest import CITY_DB, COUNTRY_DB, ServerFactory, policy_from

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


# --------------------------------------------------------------------------- item 9: addresses carrying IPv4 ones

CN_V4, GB_V4 = "175.16.199.1", "81.2.69.142"


def rfc6052(prefix: str, ipv4: str) -> str:
    """Encode ``ipv4`` under a NAT64 ``prefix`` as RFC 6052 2.2 lays it out (bits 64-71 zero)."""
    network = ipaddress.IPv6Network(prefix)
    bits = int(ipaddress.IPv4Address(ipv4))
    value = int(network.network_address)
    if network.prefixlen == 96:
        return str(ipaddress.IPv6Address(value | bits))
    before_u = 64 - network.prefixlen  # bits of the IPv4 address before the "u" octet
    after_u = 32 - before_u
    value |= (bits >> after_u) << 64
    value |= (bits & ((1 << after_u) - 1)) << (56 - after_u)
    return str(ipaddress.IPv6Address(value))


def teredo(server: str, client: str, port: int = 40000) -> str:
    """A Teredo address (RFC 4380 4): server, flags, then port and client address inverted."""
    value = (0x2001_0000 << 96) | (int(ipaddress.IPv4Address(server)) << 64) | (0x8000 << 48)
    value |= ((port ^ 0xFFFF) << 32) | (int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF)
    return str(ipaddress.IPv6Address(value))


def test_the_address_encoders_of_these_tests_match_rfc_6052s_examples() -> None:
    # RFC 6052 2.4: 192.0.2.33 under each prefix length.
    examples = {
        "2001:db8::/32": "2001:db8:c000:221::",
        "2001:db8:100::/40": "2001:db8:1c0:2:21::",
        "2001:db8:122::/48": "2001:db8:122:c000:2:2100::",
        "2001:db8:122:300::/56": "2001:db8:122:3c0:0:221::",
        "2001:db8:122:344::/64": "2001:db8:122:344:c0:2:2100:0",
        "2001:db8:122:344::/96": "2001:db8:122:344::c000:221",
        "64:ff9b::/96": "64:ff9b::c000:221",
    }
    assert {prefix: rfc6052(prefix, "192.0.2.33") for prefix in examples} == examples
    # RFC 4380 4: the client 192.0.2.45 behind port 40000, server 65.54.227.120.
    assert teredo("65.54.227.120", "192.0.2.45") == "2001:0:4136:e378:8000:63bf:3fff:fdd2"


WELL_KNOWN_FORMS: dict[str, Callable[[str], str]] = {
    "NAT64 well-known prefix 64:ff9b::/96, RFC 6052": lambda v4: rfc6052("64:ff9b::/96", v4),
    "NAT64 local-use prefix 64:ff9b:1::/48, RFC 8215, read as /96": lambda v4: rfc6052("64:ff9b:1::/96", v4),
    "NAT64 local-use prefix 64:ff9b:1::/48, RFC 8215, read as /96 (a /96 inside it)": lambda v4: rfc6052(
        "64:ff9b:1:a:b:c::/96", v4
    ),
    "SIIT IPv4-translated ::ffff:0:0:0/96, RFC 7915": lambda v4: f"::ffff:0:{v4}",
    "IPv4-mapped ::ffff:0:0/96": lambda v4: f"::ffff:{v4}",
    "6to4 2002::/16, RFC 3056": lambda v4: str(
        ipaddress.IPv6Address((0x2002 << 112) | (int(ipaddress.IPv4Address(v4)) << 80) | 1)
    ),
    "Teredo 2001::/32, RFC 4380: the client's address": lambda v4: teredo("65.54.227.120", v4),
}


@pytest.mark.parametrize("form", sorted(WELL_KNOWN_FORMS))
def test_well_known_forms_are_located_by_the_ipv4_address_they_carry(start: ServerFactory, form: str) -> None:
    _, _, client = start(CN_EVERYWHERE)
    encode = WELL_KNOWN_FORMS[form]
    denied = client.check(encode(CN_V4), "m-1")
    assert (denied.verdict, denied.rule_id) == (Verdict.DENY, "cn-all")
    assert denied.location == Location("CN", ("CN-22",))
    # A real lookup, not "CN" for everything in the form: GB stays GB, with its subdivision.
    assert client.check(encode(GB_V4), "m-1").location == Location("GB", ("GB-ENG",))
    batch = client.check_batch("m-1", [encode(CN_V4), encode(GB_V4), encode("10.0.0.1")])
    assert [result.location.country for result in batch] == ["CN", "GB", ""]
    assert [result.verdict for result in batch] == [Verdict.DENY, Verdict.ALLOW, Verdict.ALLOW]


def test_teredo_locates_the_client_not_the_teredo_server(start: ServerFactory) -> None:
    _, _, client = start(CN_EVERYWHERE)
    # A client in mainland China through a server in GB, and the other way round.
    assert client.check(teredo(GB_V4, CN_V4), "m-1").location.country == "CN"
    assert client.check(teredo(CN_V4, GB_V4), "m-1").verdict == Verdict.ALLOW


def test_the_cache_stays_keyed_by_the_text_and_counts_embedded_forms_once() -> None:
    geo = GeoDatabase(CITY_DB, cache_size=10)
    address = rfc6052("64:ff9b::/96", CN_V4)
    assert geo.locate(address) == geo.locate(address) == geo.locate(CN_V4)
    assert (geo.hits, geo.misses, geo.cache_entries) == (1, 2, 2)


OPERATOR_PREFIXES = ("2001:db8:64::/96", "2001:db8:100::/40", "2001:db8:122:300::/56")


def test_operator_nat64_prefixes_through_pdp_serve_and_pdp_check(tmp_path: Path) -> None:
    flags = [arg for prefix in OPERATOR_PREFIXES[:2] for arg in ("--nat64-prefix", prefix)]
    process, target = serve(tmp_path, CITY_DB, *flags)
    environment = {**os.environ, "PDP_NAT64_PREFIX": ""}
    try:
        for prefix in OPERATOR_PREFIXES:
            result = subprocess.run(
                [*PDP, "check", "--target", target, "--ip", rfc6052(prefix, CN_V4), "--meeting", "m-1", "--json"],
                capture_output=True,
                text=True,
                timeout=60,
                env=environment,
                check=False,
            )
            answer = json.loads(result.stdout)
            if prefix in OPERATOR_PREFIXES[:2]:  # configured: located by the address inside
                assert (result.returncode, answer["rule_id"], answer["location"]["country"]) == (3, "cn-all", "CN")
            else:  # not configured: the documentation range is located nowhere
                assert (result.returncode, answer["verdict"], answer["location"]["found"]) == (0, "ALLOW", False)
    finally:
        process.terminate()
        process.communicate(timeout=30)


@pytest.mark.parametrize(
    ("flag", "env", "message"),
    [
        (["--nat64-prefix", "2001:db8:64::1/96"], {}, "--nat64-prefix: '2001:db8:64::1/96' has host bits set"),
        (["--nat64-prefix", "2001:db8::/57"], {}, "is /32, /40, /48, /56, /64 or /96 bits long"),
        (["--nat64-prefix", "::/32"], {}, "overlaps ::/96"),
        (["--nat64-prefix", "10.0.0.0/8"], {}, "'10.0.0.0/8' is not an IPv6 prefix"),
        ([], {"PDP_NAT64_PREFIX": "2001:db8:64::/96,nonsense"}, "environment variable PDP_NAT64_PREFIX: 'nonsense'"),
    ],
)
def test_bad_nat64_prefixes_stop_the_start_naming_the_setting(
    tmp_path: Path, flag: list[str], env: dict[str, str], message: str
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(CN_EVERYWHERE)
    result = subprocess.run(
        [*PDP, "serve", "--listen", f"unix:{tmp_path}/s.sock", "--snapshot", str(rules), "--geoip-db", str(CITY_DB),
         *flag],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def pdp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PDP_NAT64_PREFIX": "", **(env or {})}
    return subprocess.run([*PDP, *args], capture_output=True, text=True, timeout=60, env=environment, check=False)


def test_geo_lookup_and_explain_say_which_address_was_located(tmp_path: Path) -> None:
    nat64 = rfc6052("64:ff9b::/96", CN_V4)
    operator = rfc6052("2001:db8:64::/96", CN_V4)
    lookup = pdp(
        "geo", "lookup", "--geoip-db", str(CITY_DB), nat64, CN_V4, operator, "--nat64-prefix", "2001:db8:64::/96"
    )
    assert lookup.returncode == 0, lookup.stderr
    lines = lookup.stdout.splitlines()[1:]
    assert lines[0].split() == [nat64, "CN", "(CN-22)", "located", "as", f"{CN_V4}:", "NAT64", "well-known", "prefix",
                                "64:ff9b::/96,", "RFC", "6052"]  # fmt: skip
    assert lines[1].split() == [CN_V4, "CN", "(CN-22)"]  # the address itself: nothing to say
    assert lines[2].endswith(f"located as {CN_V4}: NAT64 prefix 2001:db8:64::/96 from --nat64-prefix")
    as_json = pdp(
        "geo", "lookup", "--json", operator, env={"PDP_GEOIP_DB": str(CITY_DB), "PDP_NAT64_PREFIX": "2001:db8:64::/96"}
    )
    (row,) = json.loads(as_json.stdout)
    assert {key: row[key] for key in ("ip", "found", "country", "located", "via")} == {
        "ip": operator, "found": True, "country": "CN", "located": CN_V4,
        "via": "NAT64 prefix 2001:db8:64::/96 from --nat64-prefix",
    }  # fmt: skip

    rules = tmp_path / "rules.yaml"
    rules.write_text(CN_EVERYWHERE)
    explained = pdp("explain", "--rules", str(rules), "--geoip-db", str(CITY_DB), "--ip", teredo(GB_V4, CN_V4),
                    "--meeting", "m-1")  # fmt: skip
    assert explained.returncode == 3, explained.stderr
    assert explained.stdout.splitlines()[0] == "DENY  cn-all"
    assert (
        f"  located as   {CN_V4} (inside {teredo(GB_V4, CN_V4)}: Teredo 2001::/32, RFC 4380: the client's address)"
        in (explained.stdout.splitlines())
    )
    as_json = pdp(
        "explain", "--rules", str(rules), "--geoip-db", str(CITY_DB), "--ip", nat64, "--meeting", "m", "--json"
    )
    assert json.loads(as_json.stdout)["located"] == {
        "ip": nat64, "address": CN_V4, "via": "NAT64 well-known prefix 64:ff9b::/96, RFC 6052"
    }  # fmt: skip
