"""Compressed snapshots through file, HTTP and Redis; corrupt gzip and a 1 GiB bomb refused in bounded memory."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import redis

from pdp.compression import CompressionError, compress, decode_content_encoding, inflate
from pdp.geo import GeoDatabase
from pdp.publish import publish
from pdp.reload import Reloader
from pdp.rules import MAX_SNAPSHOT_BYTES
from pdp.signing import TrustedKeys, generate_keypair, load_private_key, sign
from pdp.sources import SourceOptions, open_source
from pdp.state import PolicyHolder

from .conftest import CITY_DB
from .fleet_data import canonical, initial
from .servers import HttpStore, RedisServer

GIB = 1 << 30


def bomb(mebibytes: int) -> bytes:
    """A valid gzip member of ``mebibytes`` MiB of zeros, about 1 KB per MiB, built
    in well under a second: after a full flush, every MiB of zeros compresses to
    the same block."""
    zeros = bytes(1 << 20)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflater.compress(zeros)
    deflater.flush(zlib.Z_FULL_FLUSH)
    block = deflater.compress(zeros) + deflater.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mebibytes):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + block * mebibytes + deflater.flush() + struct.pack("<II", crc, (mebibytes << 20) & 0xFFFFFFFF)


@pytest.fixture
def holder() -> PolicyHolder:
    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    return holder


@pytest.fixture
def signed(tmp_path: Path) -> tuple[bytes, TrustedKeys]:
    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    return sign(canonical(initial(500)), 1, load_private_key(tmp_path / "k.key")), TrustedKeys.from_files(
        [tmp_path / "k.pub"]
    )


def test_the_bomb_helper_makes_real_gzip() -> None:
    assert gzip.decompress(bomb(3)) == bytes(3 << 20)


def test_inflate_passes_plain_bytes_and_refuses_broken_gzip() -> None:
    assert inflate(b"version: 1\n", 100, "x") == b"version: 1\n"
    packed = compress(b"a" * 5000, "gzip")
    assert len(packed) < 100
    assert inflate(packed, 5000, "x") == b"a" * 5000
    assert compress(b"same", "gzip") == compress(b"same", "gzip")  # no timestamp: same bytes each time
    for broken, reason in [
        (packed[:-9], "truncated"),
        (packed + b"junk", "bytes after the end"),
        (packed + packed, "bytes after the end"),  # a second member is refused, not silently read
        (packed[:10] + b"\xff" * (len(packed) - 10), "corrupt gzip"),
    ]:
        with pytest.raises(CompressionError, match=reason):
            inflate(broken, 5000, "x")
    with pytest.raises(CompressionError, match="inflates to more than 4999 bytes"):
        inflate(packed, 4999, "x")
    with pytest.raises(CompressionError, match="'br' is not supported"):
        decode_content_encoding(packed, "br", 5000, "x")
    with pytest.raises(ValueError, match="unknown compression 'lz4'"):
        compress(b"", "lz4")


BOMB_PROBE = """
import resource, sys, tracemalloc
from pathlib import Path
from pdp.compression import CompressionError, inflate
from pdp.rules import MAX_SNAPSHOT_BYTES
from pdp.sources import SourceError, open_source

path = Path(sys.argv[1])
data = path.read_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
try:
    inflate(data, MAX_SNAPSHOT_BYTES, str(path))
    raise SystemExit("inflated a bomb")
except CompressionError as error:
    refused = str(error)
try:
    open_source(path.as_uri()).fetch()
    raise SystemExit("a source fetched a bomb")
except SourceError as error:
    through_source = str(error)
peak = tracemalloc.get_traced_memory()[1]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(refused, through_source, peak, (after - before) * 1024, sep="\\n")
"""


def test_a_1_gib_bomb_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "rules.json.gz"
    path.write_bytes(bomb(1024))
    assert path.stat().st_size < 1.1 * (1 << 20)  # 1 MiB on disk, 1 GiB inflated
    result = subprocess.run(
        [sys.executable, "-c", BOMB_PROBE, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    refused, through_source, peak, grown = result.stdout.splitlines()
    assert "inflates to more than 67108864 bytes; refused" in refused
    assert "inflates to more than" in through_source
    print(f"bomb: traced peak {int(peak) / 2**20:.0f} MiB, max RSS grew {int(grown) / 2**20:.0f} MiB")
    # At most the limit (a real 64 MiB snapshot must fit) plus slack, never the gigabyte.
    assert int(peak) < MAX_SNAPSHOT_BYTES * 1.3
    assert int(grown) < MAX_SNAPSHOT_BYTES * 2 < GIB // 4


def test_compressed_snapshot_through_a_file(
    tmp_path: Path, holder: PolicyHolder, signed: tuple[bytes, TrustedKeys]
) -> None:
    data, keys = signed
    path = tmp_path / "rules.signed.gz"
    publish(data, path.as_uri(), 1, compression="gzip")
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert len(path.read_bytes()) < len(data) / 5
    reloader = Reloader(holder, open_source(path.as_uri()), keys=keys, state_dir=tmp_path / "state")
    assert reloader.run_once() == "activated version 1"
    assert (tmp_path / "state" / "snapshot").read_bytes() == data  # persisted as verified, uncompressed
    publish(bomb(100), path.as_uri(), 2)  # renamed in, so read at the next poll
    result = reloader.run_once()
    assert result.startswith("error: ")
    assert "inflates to more than" in result
    assert holder.policy is not None
    assert holder.policy.version == 1


@pytest.mark.parametrize("header", ["", "gzip"])
def test_compressed_snapshot_over_http(
    http_store: HttpStore, holder: PolicyHolder, signed: tuple[bytes, TrustedKeys], header: str
) -> None:
    """By magic bytes (an object stored as .gz), and by Content-Encoding (a server compressing on the fly)."""
    data, keys = signed
    http_store.store.files["/rules"] = compress(data, "gzip")
    if header:
        http_store.store.content_encoding["/rules"] = header
    reloader = Reloader(holder, open_source(http_store.url("/rules")), keys=keys)
    assert reloader.run_once() == "activated version 1"
    assert reloader.run_once() == "unchanged"
    http_store.store.files["/rules"] = bomb(200)
    result = reloader.run_once()
    assert result.startswith("error: ")
    assert "inflates to more than" in result
    assert holder.policy is not None
    assert holder.policy.version == 1


def test_compressed_snapshot_and_deltas_through_redis(
    tmp_path: Path, redis_server: RedisServer, holder: PolicyHolder, signed: tuple[bytes, TrustedKeys]
) -> None:
    data, keys = signed
    url = redis_server.url("pdp:gz")
    key = load_private_key(tmp_path / "k.key")
    publish(data, url, 1, key=key, compression="gzip")
    client = redis.Redis(port=redis_server.port)
    stored = client.get("pdp:gz")
    assert isinstance(stored, bytes)
    assert stored[:2] == b"\x1f\x8b"
    reloader = Reloader(holder, open_source(url, SourceOptions(keys=keys)), keys=keys)
    try:
        assert reloader.run_once() == "activated version 1"
        second = json.loads(canonical(initial(500)))
        second["version"] = 2
        second["rules"][7]["priority"] = 999
        publish(sign(canonical(second), 2, key), url, 2, key=key, compression="gzip")
        assert reloader.run_once() == "activated version 2 (from 1 delta)"
        client.set("pdp:gz", bomb(100))
        client.set("pdp:gz:head", "3 " + "0" * 64 + " -")
        result = reloader.run_once()
        assert result.startswith("error: ")
        assert "inflates to more than" in result
        assert holder.policy is not None
        assert holder.policy.version == 2
    finally:
        reloader.stop()
        client.close()
