"""Snapshots, stores and the state directory under attack (issue 12, items 1, 5, 8, 10, 11).

Every test runs against a real store: an HTTP server on loopback written on sockets
(so that it can cut a body, drip bytes or redirect), files written in place,
redis-server, and `pdp serve` itself where the guarantee is about a restart.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from pdp.geo import GeoDatabase
from pdp.model import Action, Meeting, Verdict
from pdp.reload import Reloader
from pdp.signing import generate_keypair, load_private_key, sign
from pdp.sources import SourceError, SourceOptions, open_source
from pdp.state import Active, PolicyHolder

from .conftest import CITY_DB
from .servers import HttpStore, RedisServer, start_http_store
from .test_hardening import make_certificates

PDP = [sys.executable, "-m", "pdp"]
CN = "175.16.199.1"
NOBODY = 65534

V1 = b"version: 1\nrules:\n  - {id: cn-deny, effect: deny, legal_basis: Order 17, jurisdiction: [CN]}\n"
# Version 2 keeps the CN rule, after a harmless one: a cut after the first rule is valid
# YAML that admits every mainland-China participant.
V2 = (
    b"version: 2\nrules:\n"
    b"  - {id: hk-press, effect: deny, legal_basis: Order 3, jurisdiction: [HK], meetings: {tags: [press]}}\n"
    b"  - {id: cn-deny, effect: deny, legal_basis: Order 17, jurisdiction: [CN]}\n"
)
PREFIX = V2[: V2.index(b"  - {id: cn-deny")]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def holder() -> PolicyHolder:
    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    return holder


def verdict_for_cn(holder: PolicyHolder) -> Verdict:
    active = holder.active
    assert active is not None
    return active.policy.decide(active.geo.locate(CN), Action.JOIN, Meeting("m"), 0.0).verdict


def record_activations(holder: PolicyHolder) -> list[tuple[int, int]]:
    """(version, rule count) of every activation from now on."""
    seen: list[tuple[int, int]] = []

    def listener(active: Active) -> None:
        seen.append((active.policy.version, len(active.policy.rules)))

    holder.subscribe(listener)
    return seen


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Truncate and write ``path`` without a new inode, as ``cp`` or a shell redirect do."""
    with path.open("r+b") as handle:
        handle.truncate(0)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def append_in_place(path: Path, data: bytes) -> None:
    with path.open("ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


Respond = Callable[[socket.socket, str], None]


class RawStore:
    """An HTTP store on loopback written on sockets, so that it can break HTTP the way a
    broken store or network does. ``respond`` answers each request; ``requests`` records
    (path, headers) and ``sent`` the body bytes each answer got out before it ended."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.sent: list[int] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = connection.recv(4096)
                if not chunk:
                    return
                received += chunk
            head = received.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            path = head[0].split(" ")[1]
            headers = {name.strip().lower(): value.strip() for name, value in (h.split(":", 1) for h in head[1:])}
            self.requests.append((path, headers))
            try:
                self.respond(connection, path)
                connection.shutdown(socket.SHUT_WR)  # a clean end: the client sees EOF, not a reset
            except OSError:
                pass  # the client hung up first

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def raw_store() -> Iterator[Callable[[Respond], RawStore]]:
    started: list[RawStore] = []

    def start(respond: Respond) -> RawStore:
        started.append(RawStore(respond))
        return started[-1]

    yield start
    for store in started:
        store.close()


def complete(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)


def cut(body: bytes, how: str) -> bytes:
    """An answer for ``body`` whose connection ends after PREFIX's length of it."""
    keep = body[: len(PREFIX)]
    if how == "content-length":
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), keep)
    if how == "chunked":
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(keep), keep)
    return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + keep  # the end is the connection's end


# --------------------------------------------------------------------------- 1: truncated snapshots


@pytest.mark.parametrize("how", ["content-length", "chunked", "no-length"])
def test_http_body_cut_short_is_a_fetch_error_and_the_complete_one_then_activates(
    holder: PolicyHolder, raw_store: Callable[[Respond], RawStore], how: str
) -> None:
    answer = [complete(V1)]
    store = raw_store(lambda connection, path: connection.sendall(answer[0]))
    activations = record_activations(holder)
    reloader = Reloader(holder, open_source(store.url("/rules.yaml")))
    assert reloader.run_once() == "activated version 1"

    answer[0] = cut(V2, how)
    result = reloader.run_once()
    assert result.startswith("error: "), result
    expected = {
        "content-length": f"ended after {len(PREFIX)} of the {len(V2)} bytes",
        "chunked": "chunked body ended before its last chunk",
        "no-length": "neither Content-Length nor chunked",
    }[how]
    assert expected in result
    assert holder.status.stale
    assert verdict_for_cn(holder) == Verdict.DENY

    answer[0] = complete(V2)
    assert reloader.run_once() == "activated version 2"
    assert verdict_for_cn(holder) == Verdict.DENY
    assert activations == [(1, 1), (2, 2)]  # the prefix was never active


def test_a_file_written_in_place_is_read_once_it_is_the_same_at_two_looks(tmp_path: Path, holder: PolicyHolder) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(V1)
    activations = record_activations(holder)
    reloader = Reloader(holder, open_source(path.as_uri()))
    assert reloader.run_once() == "activated version 1"

    rewrite_in_place(path, PREFIX)  # the writer is half-way: the first look sees the prefix
    assert reloader.run_once() == "unchanged"
    append_in_place(path, V2[len(PREFIX) :])
    assert reloader.run_once() == "unchanged"  # changed again since the last look: not settled yet
    assert reloader.run_once() == "activated version 2"
    assert verdict_for_cn(holder) == Verdict.DENY
    assert activations == [(1, 1), (2, 2)]

    # A rename is a complete file the moment it appears: read at the first look.
    staged = tmp_path / "staged.yaml"
    staged.write_bytes(V2.replace(b"version: 2", b"version: 3"))
    staged.replace(path)
    assert reloader.run_once() == "activated version 3"


@pytest.fixture(params=["file", "redis"])
def same_version_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Reloader, Callable[[bytes], None]]]:
    """A reloader on a file or a Redis key holding V1, and a function that publishes there
    so that the next two polls see what was published (a writer that pauses longer than a poll)."""
    if request.param == "file":
        path = tmp_path / "rules.yaml"
        path.write_bytes(V1)
        url = path.as_uri()

        def put(data: bytes) -> None:
            rewrite_in_place(path, data)

    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        client = redis.Redis(port=server.port)
        client.set("pdp:prefix", V1)
        url = server.url("pdp:prefix")

        def put(data: bytes) -> None:
            client.set("pdp:prefix", data)

    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    reloader = Reloader(holder, open_source(url))
    assert reloader.run_once() == "activated version 1"
    yield reloader, put
    reloader.stop()  # the Redis subscriber thread ends with it


def test_a_complete_snapshot_replaces_its_own_truncated_prefix_of_the_same_version(
    same_version_store: tuple[Reloader, Callable[[bytes], None]],
) -> None:
    reloader, put = same_version_store
    holder = reloader.holder
    put(PREFIX)  # a writer that pauses longer than a poll: nothing can tell this prefix from a snapshot
    reloader.run_once()
    reloader.run_once()
    assert holder.policy is not None
    assert (holder.policy.version, len(holder.policy.rules)) == (2, 1)

    put(V2)
    results = [reloader.run_once(), reloader.run_once()]
    assert "activated version 2 (it completes the truncated version 2 that was active)" in results, results
    assert len(holder.policy.rules) == 2
    assert verdict_for_cn(holder) == Verdict.DENY


def test_a_truncated_copy_never_replaces_the_complete_snapshot_of_the_same_version(
    same_version_store: tuple[Reloader, Callable[[bytes], None]],
) -> None:
    reloader, put = same_version_store
    holder = reloader.holder
    put(V2)
    assert "activated version 2" in [reloader.run_once(), reloader.run_once()]
    assert holder.policy is not None
    assert (holder.policy.version, len(holder.policy.rules)) == (2, 2)

    put(PREFIX)  # the same object rewritten, caught half-way at two looks
    results = [reloader.run_once(), reloader.run_once()]
    assert any("already active with other content (conflict)" in result for result in results), results
    assert len(holder.policy.rules) == 2
    assert verdict_for_cn(holder) == Verdict.DENY
    put(V2)
    reloader.run_once()
    assert len(holder.policy.rules) == 2


# --------------------------------------------------------------------------- 8: redirects and the deadline


def test_a_redirect_to_another_origin_is_refused_and_gets_no_token(
    tmp_path: Path, holder: PolicyHolder, http_store: HttpStore, raw_store: Callable[[Respond], RawStore]
) -> None:
    token = tmp_path / "token"
    token.write_text("TOKEN-for-the-store-only\n")
    http_store.store.files["/rules.yaml"] = V1.replace(b"effect: deny", b"effect: allow").replace(
        b"version: 1", b"version: 9"
    )
    elsewhere = http_store.url("/rules.yaml")
    answer = [complete(V1)]
    store = raw_store(lambda connection, path: connection.sendall(answer[0]))
    reloader = Reloader(holder, open_source(store.url("/rules.yaml"), SourceOptions(bearer_token_file=str(token))))
    assert reloader.run_once() == "activated version 1"

    answer[0] = f"HTTP/1.1 302 Found\r\nLocation: {elsewhere}\r\nContent-Length: 0\r\n\r\n".encode()
    result = reloader.run_once()
    assert result.startswith("error: "), result
    assert "redirected to another origin" in result
    assert f"127.0.0.1:{http_store.server.server_address[1]}" in result
    assert http_store.store.authorization == []  # not even a request, so no token
    assert verdict_for_cn(holder) == Verdict.DENY
    assert holder.policy is not None
    assert holder.policy.version == 1


def test_a_redirect_within_the_origin_is_followed_with_the_token(
    tmp_path: Path, holder: PolicyHolder, raw_store: Callable[[Respond], RawStore]
) -> None:
    token = tmp_path / "token"
    token.write_text("TOKEN-same-origin\n")

    def respond(connection: socket.socket, path: str) -> None:
        if path == "/latest":
            connection.sendall(b"HTTP/1.1 302 Found\r\nLocation: /v2/rules.yaml\r\nContent-Length: 0\r\n\r\n")
        else:
            connection.sendall(complete(V2))

    store = raw_store(respond)
    reloader = Reloader(holder, open_source(store.url("/latest"), SourceOptions(bearer_token_file=str(token))))
    assert reloader.run_once() == "activated version 2"
    assert [(path, headers.get("authorization")) for path, headers in store.requests] == [
        ("/latest", "Bearer TOKEN-same-origin"),
        ("/v2/rules.yaml", "Bearer TOKEN-same-origin"),
    ]


def drip(data: bytes, every: float, sent: list[int], done: threading.Event) -> Respond:
    """Send ``data`` a byte at a time, ``every`` seconds apart: each read is quick, the
    whole is not. ``sent`` gets how many bytes went out before the client hung up."""

    def respond(connection: socket.socket, path: str) -> None:
        count = 0
        try:
            for index in range(len(data)):
                connection.sendall(data[index : index + 1])
                count += 1
                time.sleep(every)  # the behaviour under test, not a synchronisation
        finally:
            sent.append(count)
            done.set()

    return respond


@pytest.mark.parametrize("part", ["headers", "body"])
def test_http_timeout_bounds_the_whole_fetch_not_each_read(
    holder: PolicyHolder, raw_store: Callable[[Respond], RawStore], part: str
) -> None:
    answer = complete(V1)
    head, body = answer.split(b"\r\n\r\n", 1)
    sent: list[int] = []
    done = threading.Event()
    if part == "headers":
        respond = drip(answer, 0.02, sent, done)
    else:

        def respond(connection: socket.socket, path: str) -> None:
            connection.sendall(head + b"\r\n\r\n")
            drip(body, 0.05, sent, done)(connection, path)

    store = raw_store(respond)
    reloader = Reloader(holder, open_source(store.url("/rules.yaml"), SourceOptions(timeout=0.5)))
    result = reloader.run_once()
    assert result.startswith("error: "), result
    assert "no complete answer within 0.5 s (--http-timeout)" in result
    assert holder.policy is None
    assert done.wait(30)  # the store notices the hang-up at its next byte
    assert sent[0] < len(answer if part == "headers" else body)


def test_https_store_is_verified_and_a_stalled_handshake_meets_the_deadline(
    tmp_path: Path, holder: PolicyHolder, raw_store: Callable[[Respond], RawStore]
) -> None:
    certificates = make_certificates(tmp_path)
    running = start_http_store()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates["server.crt"], certificates["server.key"])
    running.server.socket = context.wrap_socket(running.server.socket, server_side=True)
    running.store.files["/rules.yaml"] = V1
    url = running.url("/rules.yaml").replace("http:", "https:")
    ca = SourceOptions(ca_bundle=str(certificates["ca.crt"]), timeout=0.5)
    try:
        assert "certificate verify failed" in Reloader(holder, open_source(url)).run_once()
        assert Reloader(holder, open_source(url, ca)).run_once() == "activated version 1"
    finally:
        running.stop()
    silent = raw_store(lambda connection, path: None)  # accepts, and never answers the ClientHello
    result = Reloader(holder, open_source(silent.url("/rules.yaml").replace("http:", "https:"), ca)).run_once()
    assert "no complete answer within 0.5 s (--http-timeout)" in result


# --------------------------------------------------------------------------- pdp serve across restarts


class Sidecar:
    """`pdp serve` on a Unix socket, started and stopped by a test."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.target = f"unix:{tmp_path}/pdp.sock"
        self.process = subprocess.Popen(
            [*PDP, "serve", "--listen", self.target, "--geoip-db", str(CITY_DB), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.banner = self.process.stdout.readline()  # blocks until it listens, or has exited

    def status(self) -> dict[str, object]:
        result = run("status", "--target", self.target, "--json")
        document: dict[str, object] = json.loads(result.stdout)
        return document

    def check_cn(self) -> int:
        return run("check", "--target", self.target, "--ip", CN, "--meeting", "m").returncode

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
        _, stderr = self.process.communicate(timeout=30)
        return stderr


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PDP, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def sidecars(tmp_path: Path) -> Iterator[Callable[..., Sidecar]]:
    started: list[Sidecar] = []

    def start(*args: str) -> Sidecar:
        started.append(Sidecar(tmp_path, *args))
        return started[-1]

    yield start
    for sidecar in started:
        sidecar.stop()


def test_restart_keeps_the_persisted_version_as_the_replay_floor(
    tmp_path: Path, redis_server: RedisServer, sidecars: Callable[..., Sidecar]
) -> None:
    generate_keypair(tmp_path / "ops.key", tmp_path / "ops.pub")
    key = load_private_key(tmp_path / "ops.key")
    signed_v2 = sign(V2, 2, key)
    signed_v1 = sign(V1.replace(b"effect: deny", b"effect: allow"), 1, key)  # validly signed, and older
    client = redis.Redis(port=redis_server.port)
    client.set("pdp:floor", signed_v2)
    state = tmp_path / "state"
    args = ("--snapshot", redis_server.url("pdp:floor"), "--snapshot-pubkey", str(tmp_path / "ops.pub"),
            "--state-dir", str(state))  # fmt: skip
    first = sidecars(*args)
    assert "policy version 2 (2 rules)" in first.banner, first.banner
    first.stop()

    client.set("pdp:floor", signed_v1)  # a replay of an older, validly signed snapshot
    second = sidecars(*args)
    assert "policy version 2 (2 rules)" in second.banner, second.banner + second.stop()
    status = second.status()
    assert status["policy_version"] == "2"
    assert "version 1 is lower than the active 2 (replay)" in str(status["last_error"])
    assert second.check_cn() == 3  # DENY
    second.stop()
    assert (state / "snapshot").read_bytes() == signed_v2  # never overwritten by the replay


def test_flow_style_yaml_from_a_yaml_url_is_read_back_as_yaml_after_a_restart(
    tmp_path: Path, http_store: HttpStore, sidecars: Callable[..., Sidecar]
) -> None:
    flow = b"{version: 4, rules: [{id: cn-deny, effect: deny, legal_basis: Order 17, jurisdiction: [CN]}]}\n"
    http_store.store.files["/rules.yaml"] = flow
    args = ("--snapshot", http_store.url("/rules.yaml"), "--state-dir", str(tmp_path / "state"))
    first = sidecars(*args)
    assert "policy version 4 (1 rules)" in first.banner, first.banner
    first.stop()

    http_store.store.status_override = 503
    second = sidecars(*args)
    assert "policy version 4 (1 rules)" in second.banner, second.banner + second.stop()
    assert second.status()["stale"] is True
    assert second.check_cn() == 3
    assert json.loads((tmp_path / "state" / "snapshot.meta.json").read_text())["format"] == "yaml"


# --------------------------------------------------------------------------- 10: the state directory


def plant(state: Path, url: str, data: bytes) -> None:
    """A persisted snapshot as pdp writes it, for ``url``."""
    import hashlib

    state.mkdir(mode=0o700, exist_ok=True)
    (state / "snapshot").write_bytes(data)
    meta = {"source": url, "version": 999, "sha256": hashlib.sha256(data).hexdigest(), "format": "yaml"}
    (state / "snapshot.meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("world-writable directory", "writable by group or others (mode 0777)"),
        ("group-writable directory", "writable by group or others (mode 0770)"),
        ("directory of another user", f"owned by uid {NOBODY}"),
        ("planted file of another user", f"owned by uid {NOBODY}"),
        ("world-writable file", "writable by group or others (mode 0666)"),
        ("symbolic link file", "a symbolic link, which pdp does not follow here"),
    ],
)
def test_serve_refuses_a_state_dir_or_file_others_can_write(
    tmp_path: Path, sidecars: Callable[..., Sidecar], case: str, why: str
) -> None:
    url = (tmp_path / "store-is-down.yaml").as_uri()
    state = tmp_path / "state"
    plant(state, url, b"version: 999\nrules: []\n")  # what another local user would leave there
    culprit = state / "snapshot" if "file" in case else state
    if case == "world-writable directory":
        state.chmod(0o777)
    elif case == "group-writable directory":
        state.chmod(0o770)
    elif case == "world-writable file":
        culprit.chmod(0o666)
    elif case == "symbolic link file":
        culprit.replace(tmp_path / "elsewhere")
        culprit.symlink_to(tmp_path / "elsewhere")
    else:
        os.chown(culprit, NOBODY, NOBODY)
    sidecar = sidecars("--snapshot", url, "--state-dir", str(state))
    stderr = sidecar.stop()
    assert sidecar.banner == "", sidecar.banner  # it never listened
    assert sidecar.process.returncode == 2
    assert "refusing to start" in stderr
    assert f"{culprit}: {why}" in stderr, stderr


def test_temporary_files_left_by_a_kill_are_removed_at_start(tmp_path: Path, sidecars: Callable[..., Sidecar]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_bytes(V2)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    # What atomic_write leaves when the process is killed between mkstemp and rename,
    # named with the writer's pid (a process that has exited) and, from older releases, without.
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)
    left = [Path(tempfile.mkstemp(dir=state, prefix=f".{name}.{pid}")[1])
            for name in ("snapshot", "snapshot.meta.json") for pid in (f"{dead}.", "")]  # fmt: skip
    # A sibling worker sharing the directory, mid-write: this test's process is running.
    writing = Path(tempfile.mkstemp(dir=state, prefix=f".snapshot.{os.getpid()}.")[1])
    other = state / "notes.txt"
    other.write_text("not pdp's")
    sidecar = sidecars("--snapshot", str(rules), "--state-dir", str(state))
    assert "policy version 2" in sidecar.banner, sidecar.banner + sidecar.stop()
    assert [path for path in left if path.exists()] == []
    assert writing.exists()
    writing.unlink()
    assert other.exists()
    # "snapshots": the activated ones, kept for replays (pdp.archive)
    assert sorted(path.name for path in state.iterdir()) == ["notes.txt", "snapshot", "snapshot.meta.json", "snapshots"]


def test_a_failed_persist_is_retried_at_the_next_poll(tmp_path: Path, holder: PolicyHolder) -> None:
    rules, state = tmp_path / "rules.yaml", tmp_path / "state"
    rules.write_bytes(V1)
    reloader = Reloader(holder, open_source(rules.as_uri()), state_dir=state)
    reloader.initial()
    assert (state / "snapshot").read_bytes() == V1
    (state / "snapshot").unlink()
    (state / "snapshot").mkdir()  # a directory in the way: the rename onto it fails
    (state / "snapshot" / "keep").write_text("x")
    staged = tmp_path / "staged.yaml"
    staged.write_bytes(V2)
    staged.replace(rules)
    assert reloader.run_once() == "activated version 2"
    assert "cannot persist the snapshot" in holder.status.last_error

    (state / "snapshot" / "keep").unlink()
    (state / "snapshot").rmdir()
    assert reloader.run_once() == "unchanged"
    assert (state / "snapshot").read_bytes() == V2
    assert json.loads((state / "snapshot.meta.json").read_text())["version"] == 2
    assert holder.status.last_error == ""


# --------------------------------------------------------------------------- review mends (issue 13)


def test_the_file_source_honours_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(V2)
    source = open_source(path.as_uri(), SourceOptions(max_bytes=len(V2) - 1))
    with pytest.raises(SourceError, match=f"larger than {len(V2) - 1} bytes"):
        source.fetch()
    assert open_source(path.as_uri(), SourceOptions(max_bytes=len(V2))).fetch() is not None


def test_sources_are_light_and_own_the_one_scheme_list() -> None:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, pdp.sources, pdp.config; print(sorted(m for m in sys.modules if m.startswith('pdp.rules')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "[]"

    from pdp.config import ConfigError, resolve
    from pdp.rules import MAX_SNAPSHOT_BYTES
    from pdp.sources import SCHEMES
    from pdp.sources.base import MAX_SNAPSHOT_BYTES as SOURCE_LIMIT

    assert SOURCE_LIMIT == MAX_SNAPSHOT_BYTES  # one bound for the parser and the stores
    for scheme in SCHEMES:
        assert resolve({"snapshot": f"{scheme}://localhost/x"}, {}).snapshot.startswith(scheme)
    with pytest.raises(ConfigError, match="snapshot URLs are"):
        resolve({"snapshot": "ftp://store/rules.yaml"}, {})
