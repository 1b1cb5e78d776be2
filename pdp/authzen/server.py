"""The AuthZEN HTTP listener: routes, HTTP rules, and uvicorn in a thread of its own.

uvicorn with a bare ASGI callable and the httptools parser, chosen by
measurement (README, "AuthZEN"): it spent the least server CPU per evaluation
of the candidates, binds sockets pdp made (so ``--http-listen`` follows the
rules of ``--listen``: :mod:`pdp.listen`) and takes pdp's own TLS context.
It runs on its own event loop in one thread, next to the sync gRPC server's
threads; decisions are microseconds of CPU, so they run on the loop itself.

Routes (Authorization API 1.0, section 10.1): ``POST /access/v1/evaluation``,
``POST /access/v1/evaluations``, ``GET /.well-known/authzen-configuration``.
Every answer echoes ``X-Request-ID`` (section 10.1.3). An unknown path is 404,
another method 405 with ``Allow``, a body that is not ``application/json`` 400
(as the AuthZEN certification scenario, C-2-4-3, requires), a body over
:data:`MAX_BODY_BYTES` 413 (checked against ``Content-Length`` before reading,
and while reading), no policy yet 503, anything unexpected 500.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from pdp.authzen.answer import EVALUATION_PATH, EVALUATIONS_PATH, METADATA_PATH, error_body, metadata
from pdp.authzen.protocol import MAX_HEAD_BYTES, bounded_protocol
from pdp.authzen.service import AuthZen, Reply
from pdp.config import ServeConfig, parse_listen
from pdp.decisions import DecisionPath
from pdp.listen import SOCKET_UMASK, prepare_unix_socket, refuse_insecure_remote, tls_files

__all__ = ["MAX_BODY_BYTES", "MAX_CONNECTIONS", "MAX_HEAD_BYTES", "RunningHttp", "start_http"]

log = logging.getLogger("pdp")

# 1 MiB: a batch at the default --batch-limit (1000 items) with a subject and a
# resource in each is about 250 KB; JSON parsing a full 1 MiB on the loop takes ms.
MAX_BODY_BYTES = 1024 * 1024
# Open connections plus requests in progress; beyond, uvicorn answers 503 and closes (after
# pdp.authzen.protocol has ended the connection waiting longest for its request, if any).
MAX_CONNECTIONS = 1024

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_JSON = (b"content-type", b"application/json")
_NO_STORE = (b"cache-control", b"no-store")
_METADATA_CACHE = (b"cache-control", b"max-age=300")  # section 11.9: let PEPs cache the metadata
_POST = {EVALUATION_PATH: "evaluation", EVALUATIONS_PATH: "evaluations"}
_HOST = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


class _App:
    """The ASGI callable: HTTP rules here, AuthZEN in :class:`AuthZen`."""

    def __init__(self, authzen: AuthZen, scheme: str, fallback_host: str) -> None:
        self._authzen = authzen
        self._routes: dict[str, Callable[[bytes], Reply]] = {
            EVALUATION_PATH: authzen.evaluation,
            EVALUATIONS_PATH: authzen.evaluations,
        }
        self._scheme = scheme
        self._fallback_host = fallback_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)  # the first of repeated headers
        extra: Headers = [(b"x-request-id", headers[b"x-request-id"])] if b"x-request-id" in headers else []
        try:
            status, body, more = await self._answer(scope, headers, receive)
        except Exception:  # a bug: say so, keep serving
            log.exception("AuthZEN request failed")
            status, body, more = 500, error_body(500, "internal error"), [(b"connection", b"close")]
        response = [_JSON, (b"content-length", str(len(body)).encode()), *extra, *more]
        await send({"type": "http.response.start", "status": status, "headers": response})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    async def _answer(self, scope: Scope, headers: dict[bytes, bytes], receive: Receive) -> tuple[int, bytes, Headers]:
        path, method = scope["path"], scope["method"]
        route = self._routes.get(path)
        if path == METADATA_PATH:
            if method not in ("GET", "HEAD"):
                return 405, error_body(405, f"{method} is not allowed here; use GET"), [(b"allow", b"GET, HEAD")]
            return 200, metadata(self._base_url(headers)), [_METADATA_CACHE]
        if route is None:
            return 404, error_body(404, f"no such endpoint: {path}"), []
        if method != "POST":
            return 405, error_body(405, f"{method} is not allowed here; use POST"), [(b"allow", b"POST")]
        media_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if media_type != b"application/json":
            shown = headers.get(b"content-type", b"").decode("latin-1") or "missing"
            return 400, error_body(400, f"Content-Type must be application/json, not {shown}", "Content-Type"), []
        body = await _read_body(headers, receive)
        if body is None:
            message = f"request body larger than {MAX_BODY_BYTES} bytes"
            return 413, error_body(413, message), [(b"connection", b"close")]
        status, answer = route(body)
        return status, answer, [_NO_STORE]

    def _base_url(self, headers: dict[bytes, bytes]) -> str:
        """``policy_decision_point``: the URL this request reached (section 9.2.3
        wants it identical to the one the PEP used), from a well-formed Host."""
        host = headers.get(b"host", b"").decode("latin-1")
        return f"{self._scheme}://{host if _HOST.fullmatch(host) else self._fallback_host}"


async def _read_body(headers: dict[bytes, bytes], receive: Receive) -> bytes | None:
    """The whole body, or None when it is longer than :data:`MAX_BODY_BYTES`."""
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None  # refused before a byte of it is read
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


# --------------------------------------------------------------------------- the listener


class _Server(uvicorn.Server):
    """uvicorn's server, telling the starting thread when it listens (or failed to)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.ready.set()


@dataclass
class RunningHttp:
    """A started AuthZEN listener; ``address`` is what clients dial (port
    resolved), ``url`` its base URL (``unix:/path`` for a Unix socket)."""

    address: str
    url: str
    _server: _Server
    _thread: threading.Thread
    _socket: socket.socket

    def request_stop(self, grace: float) -> None:
        """Stop accepting; requests in flight may finish for up to ``grace`` seconds (see :meth:`wait`)."""
        self._server.config.timeout_graceful_shutdown = max(1, round(grace))
        self._server.should_exit = True

    def wait(self) -> None:
        """Until the listener has stopped, then close its socket."""
        self._thread.join(timeout=(self._server.config.timeout_graceful_shutdown or 0) + 5)
        self._socket.close()

    def stop(self, grace: float) -> None:
        self.request_stop(grace)
        self.wait()


def start_http(config: ServeConfig, path: DecisionPath) -> RunningHttp:
    """Serve AuthZEN on ``config.http_listen`` from a thread of its own.

    :raises OSError: the address cannot be bound, would be reachable from other
        hosts without TLS (and ``--allow-insecure-remote`` is not set), or the
        TLS files cannot be read or used.
    """
    listen = config.http_listen
    sock, address, context = _bind(listen, config)
    authzen = AuthZen(path, config.batch_limit)
    scheme = "https" if context else "http"
    unix = address.startswith("unix:")
    app = _App(authzen, scheme, "localhost" if unix else address)
    uvicorn_config = uvicorn.Config(
        app,
        http=bounded_protocol(config.receive_timeout, MAX_CONNECTIONS),
        loop="asyncio",  # never uvloop implicitly
        lifespan="off",
        interface="asgi3",
        log_config=None,  # pdp configures logging; uvicorn only says what went wrong
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # the participant's address is in the body, never a header
        server_header=False,
        ssl_context_factory=(lambda _config, _default: context) if context else None,
        timeout_graceful_shutdown=max(1, round(config.grace_seconds)),
        limit_concurrency=MAX_CONNECTIONS,
    )
    server = _Server(uvicorn_config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="pdp-authzen", daemon=True)
    thread.start()
    server.ready.wait()
    if not server.started:
        thread.join(timeout=5)
        sock.close()
        raise OSError(f"--http-listen {listen}: the HTTP server did not start (see the log)")
    return RunningHttp(address, address if unix else f"{scheme}://{address}", server, thread, sock)


def _bind(listen: str, config: ServeConfig) -> tuple[socket.socket, str, ssl.SSLContext | None]:
    """A listening socket for ``listen``, the address it is reachable at, and the TLS context (TCP only)."""
    host, port = parse_listen(listen)
    if port is None:
        path = Path(host)
        prepare_unix_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(SOCKET_UMASK)
        try:
            sock.bind(host)
        except OSError as error:
            sock.close()
            raise OSError(f"--http-listen {listen}: cannot listen ({error.strerror})") from None
        finally:
            os.umask(previous)
        sock.listen(2048)
        return sock, f"unix:{host}", None
    context = _tls_context(config)
    refuse_insecure_remote(listen, host, context is not None, config, "--http-listen")
    try:
        family, kind, protocol, _, target = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, protocol)
    except OSError as error:
        raise OSError(f"--http-listen {listen}: {error}") from None
    try:
        # SO_REUSEADDR only lets a restart bind past TIME_WAIT; never SO_REUSEPORT,
        # with which a second server on the same port would silently share it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(target)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise OSError(f"--http-listen {listen}: cannot listen ({error.strerror})") from None
    bound = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host.strip("[]") else host
    return sock, f"{shown}:{bound}", context


def _tls_context(config: ServeConfig) -> ssl.SSLContext | None:
    """The same certificate, key and client CA as gRPC's, for HTTP/1.1 over TLS 1.2+."""
    tls = tls_files(config)  # the same checks and messages as --listen
    if tls is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if tls.client_ca is not None:
            context.load_verify_locations(cadata=tls.client_ca.decode("ascii", "replace"))
            context.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, ValueError) as error:
        raise OSError(f"--http-listen: TLS: {error}") from None
    return context
