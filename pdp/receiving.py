"""Receiving requests without letting a silent client hold the server's threads.

grpcio's sync server gives a call a thread from its pool as soon as the call's
headers arrive, and that thread then waits for the request message. A client that
opens calls and never sends their messages (a bug, or an attack) would take every
thread, and Check and health would stop answering. Here every wait for a request
message goes through a :class:`ReceiveGuard`:

- a call that waits longer than ``timeout`` is ended by a watchdog thread;
- while ``limit`` calls wait (the pool has that many threads beside those that
  decide), each new one ends the one that has waited longest, if it waited longer
  than a later call that has received its message, or longer than
  :data:`PATIENCE`; the watchdog does the same every few milliseconds. So silent
  calls hold the waiting threads for a moment at a time, and never the others.
- that patience is counted in the watchdog's ticks, not read off the wall clock,
  and a tick that wakes late (the process was paused, throttled by its CPU quota,
  or starved) does not count: nobody's message could be handed over meanwhile.
  Read off the wall clock, a pause of 300 ms (a pod at its CPU limit sees such
  pauses) made the calls whose messages grpcio had not yet handed over look silent:
  36 complete calls of 3,000 were cancelled (``tests/test_hardening_transport.py``
  pauses a real server with SIGSTOP and SIGCONT under 200 calls in flight).

Calls whose message was sent are never ended for waiting their turn: gRPC clients
send a request with its headers, and grpcio hands the messages over in the order
the calls began to wait, so under load such calls wait, but none is overtaken for
long. Ended calls are cancelled (the client sees CANCELLED, with why). A call
costs two dictionary operations and a comparison here.

To get hold of the call before its message arrives, every method is served with a
streaming request (:func:`guarded`): the wire is the same, and the handler reads
the one message itself, through the guard.

A listener's threads (:class:`CallThreads`): ``workers`` decide, four times as many
more may wait for messages (a steady flood of silent calls needs that many to be
absorbed at :data:`PATIENCE` each), and methods that answer with a stream, which
hold their thread while it is open, run on threads of their own and never take one
that unary calls need. A pool as small as ``workers`` answered about 5 % more
Checks under load, and lost to 200 silent calls a second (README, "Fewer threads, tried and not kept").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

__all__ = ["CallThreads", "GuardedHandlers", "ReceiveGuard", "guarded"]

log = logging.getLogger("pdp.server")
_monotonic = time.monotonic
# How far apart two calls may begin to wait and still receive their messages in either order.
_REORDERING = 0.05
PATIENCE = 0.1
"""How long a call may wait for its message while ``limit`` calls wait. When that
many wait, at most the deciding threads run, so grpcio's one thread handing
messages over is never starved that long: only silent calls wait so long then."""
_TICK = PATIENCE / 4  # the watchdog's period while ``limit`` calls wait


class ReceiveGuard:
    """Bounds how many calls wait for a request message and for how long."""

    def __init__(self, *, limit: int, timeout: float, name: str = "pdp-receive-guard") -> None:
        self.limit = max(1, limit)
        self.timeout = timeout
        self.timed_out = 0  # calls ended by the timeout
        self.crowded_out = 0  # calls ended as the longest waiting of too many
        # In the order they began to wait: when (monotonic time), and at which tick.
        self._waiting: dict[grpc.ServicerContext, tuple[float, int]] = {}
        self._ticks = 0  # the watchdog's on-time ticks while ``limit`` calls waited
        self._received_since = 0.0  # when the latest call that received its message began to wait
        self._received_tick = 0  # and at which tick
        self._ended: set[grpc.ServicerContext] = set()
        self._stopping = False
        self._wake = threading.Event()  # stop, or crowded while the watchdog sleeps long
        self._sleeping_long = False
        self._thread = threading.Thread(target=self._watch, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def receive(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """The next request message of ``requests``, the call's request stream.

        :raises StopIteration: the client sent no (further) message.
        :raises grpc.RpcError: the client cancelled the call.
        :raises Exception: the call was ended by the guard (through ``context.abort``,
            which grpcio expects from a handler and does not log).
        """
        waiting = self._waiting
        if len(waiting) >= self.limit:
            self._end_longest_waiting(patient=False)  # the watchdog alone counts patience
            if self._sleeping_long:
                self._wake.set()
        since, tick = _monotonic(), self._ticks
        waiting[context] = (since, tick)
        try:
            message = next(requests)
        except (StopIteration, grpc.RpcError):
            if context in self._ended:
                self._ended.discard(context)
                context.abort(grpc.StatusCode.CANCELLED, "the request message did not arrive in time")
            raise
        finally:
            waiting.pop(context, None)
        if since > self._received_since:
            self._received_since, self._received_tick = since, tick
        return message

    def _end_longest_waiting(self, *, patient: bool = True) -> None:
        try:
            longest, (since, tick) = next(iter(self._waiting.items()))
        except (StopIteration, RuntimeError):  # emptied, or changed, by another thread meanwhile
            return
        # Overtaken on both clocks: a pause of the process parts two calls on the wall clock
        # only, and the threads it paused may take their messages in any order after it.
        overtaken = since < self._received_since - _REORDERING and tick < self._received_tick - 1
        out_of_patience = patient and (self._ticks - tick) * _TICK >= PATIENCE
        if (overtaken or out_of_patience) and self._end(longest):
            self.crowded_out += 1

    def _end(self, context: grpc.ServicerContext) -> bool:
        if self._waiting.pop(context, None) is None:
            return False  # its message came, or another thread ended it
        self._ended.add(context)
        context.cancel()  # wakes the thread waiting in receive()
        return True

    def _watch(self) -> None:
        """End the calls that waited longer than the timeout, and while ``limit`` wait,
        the longest waiting; say how many were ended."""
        reported = (0, 0)
        while not self._stopping:
            crowded = len(self._waiting) >= self.limit
            interval = _TICK if crowded else self.timeout / 4
            self._sleeping_long = not crowded
            start = _monotonic()
            self._wake.wait(interval)
            self._wake.clear()
            self._sleeping_long = False
            if self._stopping:
                break
            # A tick counts when it took its interval and no more: the process ran throughout.
            if crowded and interval <= _monotonic() - start < interval + _TICK:
                self._ticks += 1
            while len(self._waiting) >= self.limit:
                before = self.crowded_out
                self._end_longest_waiting()
                if self.crowded_out == before:
                    break  # the longest waiting may still wait
            oldest_allowed = time.monotonic() - self.timeout
            try:
                waiting = list(self._waiting.items())
            except RuntimeError:  # changed while copied: look again at the next round
                continue
            for context, (since, _) in waiting:
                if since > oldest_allowed:
                    break  # the rest began to wait later
                if self._end(context):
                    self.timed_out += 1
            counts = (self.timed_out, self.crowded_out)
            if counts != reported:
                log.warning(
                    "ended calls whose request message did not come: %d after %.2f s, %d as the longest waiting"
                    " of %d (totals since start)",
                    counts[0], self.timeout, counts[1], self.limit,
                )  # fmt: skip
                reported = counts


@dataclass(frozen=True)
class CallThreads:
    """The threads a listener serves its calls on, and the guard they receive through.

    ``calls`` runs unary calls: ``workers`` threads that decide whatever silent
    clients do, beside the guard's limit of threads that wait for request messages.
    ``streams`` runs the methods that answer with a stream (WatchPolicy, health's
    Watch, reflection), which hold their thread while the stream is open.
    """

    guard: ReceiveGuard
    calls: futures.ThreadPoolExecutor
    streams: futures.ThreadPoolExecutor

    @classmethod
    def start(cls, workers: int, timeout: float, *, name: str = "pdp") -> CallThreads:
        """``workers`` deciding threads and four times as many that may wait, for
        unary calls; ``workers`` threads for streams; the guard's watchdog started."""
        guard = ReceiveGuard(limit=4 * workers, timeout=timeout, name=f"{name}-receive-guard")
        calls = futures.ThreadPoolExecutor(max_workers=workers + guard.limit, thread_name_prefix=f"{name}-rpc")
        streams = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-stream")
        guard.start()
        return cls(guard, calls, streams)

    def stop(self, *, wait: bool) -> None:
        """Stop the watchdog and both pools (gRPC never shuts down the pools it is given)."""
        self.guard.stop()
        self.calls.shutdown(wait=wait)
        self.streams.shutdown(wait=wait)


class _Requests:
    """A call's request stream, each message received through the guard."""

    __slots__ = ("_context", "_guard", "_requests")

    def __init__(self, requests: Iterator[Any], context: grpc.ServicerContext, guard: ReceiveGuard) -> None:
        self._requests, self._context, self._guard = requests, context, guard

    def __iter__(self) -> _Requests:
        return self

    def __next__(self) -> Any:
        return self._guard.receive(self._requests, self._context)


def _one(guard: ReceiveGuard, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
    """The one request message of a unary-request method."""
    try:
        return guard.receive(requests, context)
    except StopIteration:
        _no_message(context)


def _no_message(context: grpc.ServicerContext) -> NoReturn:
    # What grpcio answers when a client half-closes a unary call without a message.
    context.abort(grpc.StatusCode.UNIMPLEMENTED, "the method requires exactly one request message")
    raise AssertionError("unreachable: abort raises")


def guarded(
    handler: grpc.RpcMethodHandler[Any, Any],
    guard: ReceiveGuard,
    streams: futures.ThreadPoolExecutor | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same method, served with a streaming request so that its messages are
    received through ``guard``; non-blocking streams and their thread pools kept.
    A method answering with a stream runs on ``streams``, when given and it names
    no pool of its own."""
    behaviour: Callable[..., Any]
    deserializer, serializer = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        unary_unary, receive = handler.unary_unary, guard.receive

        def unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            # _one, spelled out: the call most served pays one Python call less.
            try:
                request = receive(requests, context)
            except StopIteration:
                _no_message(context)
            return unary_unary(request, context)

        behaviour, inner = unary, unary_unary
        made = grpc.stream_unary_rpc_method_handler(unary, deserializer, serializer)
    elif handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        def stream(requests: Iterator[Any], context: grpc.ServicerContext, *callback: Any) -> Any:
            return unary_stream(_one(guard, requests, context), context, *callback)

        behaviour, inner = stream, unary_stream
        made = grpc.stream_stream_rpc_method_handler(stream, deserializer, serializer)
    else:
        streaming = handler.stream_unary or handler.stream_stream
        assert streaming is not None

        def streamed(requests: Iterator[Any], context: grpc.ServicerContext, *callback: Any) -> Any:
            return streaming(_Requests(requests, context, guard), context, *callback)

        behaviour, inner = streamed, streaming
        make = grpc.stream_unary_rpc_method_handler if handler.stream_unary else grpc.stream_stream_rpc_method_handler
        made = make(streamed, deserializer, serializer)
    for attribute in ("experimental_non_blocking", "experimental_thread_pool"):
        if hasattr(inner, attribute):
            setattr(behaviour, attribute, getattr(inner, attribute))
    if streams is not None and handler.response_streaming and getattr(inner, "experimental_thread_pool", None) is None:
        behaviour.experimental_thread_pool = streams  # type: ignore[attr-defined]  # grpcio reads it off the callable
    return made


class GuardedHandlers(grpc.GenericRpcHandler):
    """``handlers``' methods, each :func:`guarded` (streams on ``streams``); built
    once per method name."""

    def __init__(
        self,
        handlers: Sequence[grpc.GenericRpcHandler],
        guard: ReceiveGuard,
        streams: futures.ThreadPoolExecutor | None = None,
    ) -> None:
        self._handlers = tuple(handlers)
        self._guard = guard
        self._streams = streams
        self._methods: dict[str, grpc.RpcMethodHandler[Any, Any] | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        try:
            return self._methods[method]
        except KeyError:
            pass
        found = None
        for handlers in self._handlers:
            handler = handlers.service(handler_call_details)
            if handler is not None:
                found = guarded(handler, self._guard, self._streams)
                break
        if len(self._methods) < 1024:  # unknown method names are not remembered without end
            self._methods[method] = found
        return found
