"""Snapshots, stores and the state directory under attack (issue 12, items 1, 5, 8, 10, 11).

Every test runs against a real store: an HTTP server on loopback written on sockets
(so that it can cut a body, drip bytes or redirect), files written in place,
redis-server, and `pdp serve` itself where the guarantee is about a restart.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pdp.geo import GeoDatabase
from pdp.model import Action, Meeting, Verdict
from pdp.policy import Active, PolicyHolder
from pdp.reload import Reloader
from pdp.sources import SourceError, SourceOptions, open_source

from .conftest import CITY_DB
from .servers import HttpStore, start_http_store
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
