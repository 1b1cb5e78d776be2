"""uvicorn's httptools protocol, bounded: what a client sends, and for how long.

httptools bounds nothing, and uvicorn bounds neither the time a request takes to
arrive nor who holds its connection slots: before this module, 1,024 connections
that sent half a request line (and nothing more) held every slot of
``limit_concurrency`` for good, and every evaluation after them was 503. So:

- a request's line and headers are at most :data:`MAX_HEAD_BYTES` (431 beyond);
- a request must arrive whole within ``--receive-timeout`` of its connection or
  of its first byte (408 and close beyond: the gRPC listener's rule, pdp.receiving);
- when every slot is taken, a new connection ends the one that has waited longest
  for its request (408, or a plain close when it had not begun one), so a crowd of
  clients that send nothing never keeps out one that does. Connections whose
  request is complete are never ended for that: their answer is pdp's to give.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pdp.authzen.answer import error_body

__all__ = ["MAX_HEAD_BYTES", "BoundedProtocol", "bounded_protocol"]

# A request's line and headers: bearer tokens and trace headers fit many times over. httptools
# itself has no bound, so without this one a client could grow the sidecar by the gigabyte.
MAX_HEAD_BYTES = 64 * 1024
# After a 431 or 408, how long what the client still sends is read and dropped before closing:
# closing with unread data would reset the connection and could destroy the answer.
_LINGER_SECONDS = 2.0


class _HeadTooLargeError(Exception):
    """Raised from a parser callback: httptools reports it as a parser error."""


class BoundedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of the module docstring.

    Use :func:`bounded_protocol` for a listener's own subclass: the waiting
    connections and the deadline are per listener.
    """

    receive_seconds: ClassVar[float] = 2.0
    connection_limit: ClassVar[int] = 1024
    # Connections waiting for (the rest of) a request, longest-waiting first. A dict keeps
    # insertion order and removes in O(1); the values mean nothing.
    waiting: ClassVar[dict[BoundedProtocol, None]]

    _head_bytes = 0
    _too_large = False
    _begun = False
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # uvicorn answers 503 when the connections, this one included, reach the limit.
        if len(self.connections) + 1 >= self.connection_limit and self.waiting:
            self._shed(next(iter(self.waiting)))
        super().connection_made(transport)
        self._wait()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._too_large:
            super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._begun = True
        if self not in self.waiting:  # the next request on a kept-alive connection
            self._wait()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._begun = False
        self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Between requests uvicorn's keep-alive timeout applies; the connection is waiting
        # again, so it is also the first to go when the slots run out.
        if not self.transport.is_closing():
            self.waiting[self] = None

    def on_url(self, url: bytes) -> None:
        self._grow(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _grow(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._too_large = True
            raise _HeadTooLargeError

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error; 431 when the error is the bound's."""
        if not self._too_large:
            super().send_400_response(msg)
            return
        message = f"request line and headers longer than {MAX_HEAD_BYTES} bytes"
        self._end(431, "Request Header Fields Too Large", message)

    def _wait(self) -> None:
        self.waiting.pop(self, None)
        self.waiting[self] = None
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.receive_seconds, self._receive_expired)

    def _stop_waiting(self) -> None:
        self.waiting.pop(self, None)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _receive_expired(self) -> None:
        self._deadline = None
        if self in self.waiting and not self.transport.is_closing():
            self._shed(self)

    def _shed(self, victim: BoundedProtocol) -> None:
        """End ``victim``, which is waiting for a request: 408 when it has begun one."""
        victim._stop_waiting()
        self.connections.discard(victim)  # its slot is free now, not when the loop next runs
        if victim._begun and not (victim.cycle and victim.cycle.response_started):
            seconds = f"{self.receive_seconds:g}"
            victim._end(408, "Request Timeout", f"the request did not arrive whole within {seconds} s")
        else:
            victim.transport.close()

    def _end(self, status: int, phrase: str, message: str) -> None:
        body = error_body(status, message)
        head = f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        self._too_large = True  # read and drop what still comes
        self.transport.write(head.encode() + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_SECONDS, self.transport.close)


def bounded_protocol(receive_seconds: float, connection_limit: int) -> type[BoundedProtocol]:
    """A :class:`BoundedProtocol` of one listener: its own deadline, limit and waiting connections."""
    return type(
        "ListenerProtocol",
        (BoundedProtocol,),
        {"receive_seconds": receive_seconds, "connection_limit": connection_limit, "waiting": {}},
    )
