"""A lean gRPC client for load generation: HTTP/2 connections on plain
sockets (one, or a :class:`Pool` of several), request frames encoded once, one
thread, no grpc runtime.

Used by ``pdp loadtest`` and the benchmark suite; needs the ``loadtest`` extra (hpack).

Why not grpcio's client: on this machine it spends about 230 µs of CPU per unary
call, so at 3,500 calls/s it kept its own core 80 % busy and above about 6,500/s
it, not the server under test, set the pace (and its queueing showed up in both
the floor's and pdp's percentiles). This client spends a few tens of µs a call.

It speaks just enough HTTP/2 for unary gRPC calls to one server: the preface and
SETTINGS, PING and SETTINGS acknowledgements, flow control in both directions
(receive windows opened wide once; the server's send window respected, requests
queued until it opens), HPACK decoding of responses (the ``hpack`` package, with
a memo for blocks made only of indexed fields, which change no table), and
RST_STREAM and GOAWAY reported as errors. No TLS: benchmarks use loopback TCP
and Unix sockets, as meeting nodes do.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc
import hpack

__all__ = ["Connection", "Pool", "ProtocolError", "grpc_message"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x4, 0x5
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
FRAME_HEAD = struct.Struct(">HBBBI")  # 24-bit length as 16 + 8 bits, type, flags, stream
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class ProtocolError(RuntimeError):
    """The server broke the protocol or closed the connection."""


def grpc_message(request: Any) -> bytes:
    """The length-prefixed gRPC message for a protobuf request."""
    body: bytes = request.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return FRAME_HEAD.pack(size >> 8, size & 0xFF, kind, flags, stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal_block(headers: list[tuple[str, str]]) -> bytes:
    """A header block of literals without indexing: it changes no HPACK table,
    so the same bytes can open every stream."""
    block = bytearray()
    for name, value in headers:
        block += b"\x00"
        for text in (name.encode(), value.encode()):
            block += _hpack_int(len(text), 7, 0) + text
    return bytes(block)


class Connection:
    """One HTTP/2 connection carrying unary calls to one method.

    ``on_done(stream_latency_start, status_name)`` is called once per call, with
    the start time given to :meth:`call` and the gRPC status name (or
    ``RST_STREAM``/``GOAWAY``). Call :meth:`poll` often; it reads and dispatches.
    """

    def __init__(self, target: str, path: str, on_done: Callable[[float, str], None], *, timeout_s: int = 10) -> None:
        if target.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(target.removeprefix("unix:").removeprefix("//"))
        else:
            host, _, port = target.rpartition(":")
            self.sock = socket.create_connection((host.strip("[]"), int(port)))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.on_done = on_done
        self.headers = _literal_block(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("grpc-timeout", f"{timeout_s}S"),
            ]
        )
        self.decoder = hpack.Decoder()
        self.decoded: dict[bytes, list[tuple[bytes, bytes]]] = {}  # memo for all-indexed blocks
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.next_stream = 1
        self.open: dict[int, float] = {}  # stream -> start time
        self.statuses: dict[int, str] = {}  # stream -> grpc-status seen before END_STREAM
        self.blocked: deque[tuple[bytes, float]] = deque()  # waiting for the server's window
        self.send_window = DEFAULT_WINDOW
        self.stream_window = DEFAULT_WINDOW
        self.max_frame = 16_384
        self.received = 0
        self.header_stream = 0  # stream of a header block continued in CONTINUATION frames
        self.header_flags = 0
        self.header_block = bytearray()
        settings = struct.pack(">HIHI", SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW, SETTINGS_MAX_FRAME_SIZE, 2**24 - 1)
        self.sock.sendall(
            PREFACE
            + _frame(SETTINGS, 0, 0, settings)
            + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW))
        )

    @property
    def in_flight(self) -> int:
        return len(self.open) + len(self.blocked)

    def call(self, message: bytes, started: float) -> None:
        """Queue one call; it leaves at the next :meth:`flush` (or when the window opens)."""
        if self.blocked or len(message) > self.send_window:
            self.blocked.append((message, started))
            return
        self._start(message, started)

    def _start(self, message: bytes, started: float) -> None:
        if len(message) > self.stream_window:
            raise ProtocolError(
                f"a {len(message)}-byte request exceeds the server's stream window {self.stream_window}"
            )
        stream = self.next_stream
        self.next_stream += 2
        self.open[stream] = started
        self.send_window -= len(message)
        out = self.outbox
        out += _frame(HEADERS, END_HEADERS, stream, self.headers)
        for offset in range(0, len(message), self.max_frame):
            chunk = message[offset : offset + self.max_frame]
            last = offset + self.max_frame >= len(message)
            out += _frame(DATA, END_STREAM if last else 0, stream, chunk)

    def flush(self) -> None:
        if self.outbox:
            self.sock.sendall(self.outbox)
            self.outbox.clear()

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for data, then handle what arrived."""
        self.flush()
        readable, _, _ = select.select((self.sock,), (), (), max(timeout, 0.0))
        if readable:
            self.receive()

    def abandon(self, now: float) -> None:
        """Report every call still out as UNFINISHED and forget it."""
        for started in [*self.open.values(), *(started for _, started in self.blocked)]:
            self.on_done(now - started, "UNFINISHED")
        self.open.clear()
        self.blocked.clear()

    def receive(self) -> None:
        """Read what the socket holds (it is readable) and handle it."""
        data = self.sock.recv(1 << 20)
        if not data:
            raise ProtocolError("the server closed the connection")
        self.inbox += data
        self._dispatch(time.perf_counter())
        self.flush()

    def _dispatch(self, now: float) -> None:
        inbox = self.inbox
        position = 0
        while len(inbox) - position >= 9:
            high, low, kind, flags, stream = FRAME_HEAD.unpack_from(inbox, position)
            size = (high << 8) | low
            end = position + 9 + size
            if end > len(inbox):
                break
            payload = bytes(inbox[position + 9 : end])
            position = end
            self._frame(kind, flags, stream & MAX_WINDOW, payload, now)
        del inbox[:position]

    def _frame(self, kind: int, flags: int, stream: int, payload: bytes, now: float) -> None:
        if kind == DATA:
            self.received += len(payload)
            if self.received > MAX_WINDOW // 2:  # top the connection window up again
                self.outbox += _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.received))
                self.received = 0
            if flags & END_STREAM:
                self._finish(stream, self.statuses.pop(stream, "INTERNAL"), now)
        elif kind in (HEADERS, CONTINUATION):
            if kind == HEADERS:
                payload = _strip_headers_padding(flags, payload)
                self.header_stream, self.header_flags = stream, flags
                self.header_block = bytearray(payload)
            else:
                self.header_block += payload
            if flags & END_HEADERS:
                self._headers(self.header_stream, self.header_flags, bytes(self.header_block), now)
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
                self.outbox += _frame(SETTINGS, ACK, 0)
        elif kind == PING:
            if not flags & ACK:
                self.outbox += _frame(PING, ACK, 0, payload)
        elif kind == WINDOW_UPDATE:
            if stream == 0:
                self.send_window += int.from_bytes(payload[:4], "big") & MAX_WINDOW
                while self.blocked and len(self.blocked[0][0]) <= self.send_window:
                    self._start(*self.blocked.popleft())
        elif kind == RST_STREAM:
            self.statuses.pop(stream, None)
            self._finish(stream, "RST_STREAM", now)
        elif kind == GOAWAY:
            for stream_id in list(self.open):
                self._finish(stream_id, "GOAWAY", now)
            raise ProtocolError(f"GOAWAY from the server: {payload[8:].decode(errors='replace')}")

    def _settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload) - 5, 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                self.stream_window = value
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self.max_frame = value

    def _headers(self, stream: int, flags: int, block: bytes, now: float) -> None:
        headers = self.decoded.get(block)
        if headers is None:
            headers = [(bytes(name), bytes(value)) for name, value in self.decoder.decode(block, raw=True)]
            if all(byte & 0x80 for byte in block):
                self.decoded[block] = headers
            else:
                self.decoded.clear()  # the dynamic table changed: indexes may mean other fields now
        status = None
        for name, value in headers:
            if name == b"grpc-status":
                status = STATUS_NAMES.get(int(value), f"STATUS_{int(value)}")
        if flags & END_STREAM:
            self._finish(stream, status or "UNKNOWN", now)
        elif status is not None:
            self.statuses[stream] = status

    def _finish(self, stream: int, status: str, now: float) -> None:
        started = self.open.pop(stream, None)
        if started is not None:
            self.on_done(now - started, status)

    def close(self) -> None:
        self.sock.close()


class Pool:
    """Several connections to one target, used as one :class:`Connection`: each call
    goes to the connection with the fewest calls out. Several TCP connections let
    the kernel spread them over the workers of ``pdp serve --processes N``
    (SO_REUSEPORT balances connections, not calls)."""

    def __init__(self, members: list[Connection]) -> None:
        self.members = members
        self._sockets = {member.sock: member for member in members}

    @property
    def in_flight(self) -> int:
        return sum(member.in_flight for member in self.members)

    @property
    def on_done(self) -> Callable[[float, str], None]:
        return self.members[0].on_done

    @on_done.setter
    def on_done(self, callback: Callable[[float, str], None]) -> None:
        for member in self.members:
            member.on_done = callback

    def call(self, message: bytes, started: float) -> None:
        min(self.members, key=_calls_out).call(message, started)

    def poll(self, timeout: float) -> None:
        for member in self.members:
            member.flush()
        readable, _, _ = select.select(list(self._sockets), (), (), max(timeout, 0.0))
        for sock in readable:
            self._sockets[sock].receive()

    def abandon(self, now: float) -> None:
        for member in self.members:
            member.abandon(now)

    def close(self) -> None:
        for member in self.members:
            member.close()


def _calls_out(connection: Connection) -> int:
    return connection.in_flight


def _strip_headers_padding(flags: int, payload: bytes) -> bytes:
    if flags & PADDED:
        pad = payload[0]
        payload = payload[1 : len(payload) - pad]
    if flags & PRIORITY:
        payload = payload[5:]
    return payload
