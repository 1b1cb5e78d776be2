"""``http(s)://``: conditional GET against any static server, object store or CDN.

``If-None-Match`` and ``If-Modified-Since`` carry the validators of the last
*activated* snapshot, so a 304 costs no parsing and a rejected body is fetched
again on the next poll.

Only a body known to be whole is handed on: one shorter than its
``Content-Length``, a chunked body without its last chunk, or one whose end only
the connection's closing could tell, is a fetch error. Redirects are followed
only within the URL's origin (scheme, host, port), so the bearer token never
reaches another host. ``timeout`` is one deadline for the whole fetch (connect,
TLS, headers, body, redirects): when it passes, the socket is shut down, which
ends any read blocked on it. No proxies from the environment: a sidecar talks
to its store.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import socket
import ssl
import threading
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from pdp.compression import CompressionError, decode_content_encoding, inflate
from pdp.sources.base import Fetched, Source, SourceError, SourceOptions

MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_PIECE = 64 * 1024

Origin = tuple[str, str, int]


def origin_of(url: str) -> Origin:
    """(scheme, host, port) of ``url``, the port filled in from the scheme.

    :raises ValueError: the port is not a number.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def _origin_text(origin: Origin) -> str:
    scheme, host, port = origin
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


class _DeadlinePassedError(Exception):
    """The fetch's deadline has passed."""


class _Deadline:
    """One deadline for a whole fetch: when it passes, the socket in use is shut
    down, which ends a connect, handshake or read blocked on it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._ends = time.monotonic() + seconds
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        """:raises _DeadlinePassedError: no time is left."""
        left = self._ends - time.monotonic()
        if left <= 0 or self.expired:
            raise _DeadlinePassedError
        return left

    def passed(self) -> bool:
        return self.expired or time.monotonic() >= self._ends

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._socket = sock
            if self.expired:
                self._cut()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._cut()

    def _cut(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                # The plain socket's shutdown, also under TLS: it only wakes the blocked reader.
                socket.socket.shutdown(self._socket, socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


class HttpSource(Source):
    def __init__(self, url: str, options: SourceOptions) -> None:
        """:raises ValueError: the URL's port is not a number."""
        super().__init__(url)
        self.options = options
        self.origin = origin_of(url)
        self._context = (
            ssl.create_default_context(cafile=options.ca_bundle or None) if url.startswith("https:") else None
        )

    def _headers(self) -> dict[str, str]:
        headers = {
            "Accept": "application/json, application/yaml, */*",
            "Accept-Encoding": "gzip",
            "User-Agent": "pdp-sidecar",
        }
        if self.committed:
            validators = json.loads(self.committed)
            if validators.get("etag"):
                headers["If-None-Match"] = validators["etag"]
            if validators.get("last_modified"):
                headers["If-Modified-Since"] = validators["last_modified"]
        if self.options.bearer_token_file:
            try:
                token = Path(self.options.bearer_token_file).read_text().strip()
            except OSError as error:
                raise SourceError(f"bearer token file {self.options.bearer_token_file}: {error.strerror}") from None
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def fetch(self) -> Fetched | None:
        """:raises SourceError: unreachable, an error status, a redirect to another
        origin, a body cut short or too large, or the deadline passed."""
        headers = self._headers()
        deadline = _Deadline(self.options.timeout)
        try:
            status, reason, answer, data = self._follow(headers, deadline)
        except (_DeadlinePassedError, OSError, http.client.HTTPException, ValueError, SourceError) as error:
            if deadline.passed() or isinstance(error, _DeadlinePassedError):
                raise SourceError(
                    f"{self.url}: no complete answer within {self.options.timeout:g} s (--http-timeout)"
                ) from None
            if isinstance(error, SourceError):
                raise
            raise SourceError(f"{self.url}: {_describe(error)}") from None
        finally:
            deadline.cancel()
        if status == 304:
            return None
        if status != 200:
            raise SourceError(f"{self.url}: HTTP {status} {reason}")
        limit = self.options.max_bytes
        try:  # a store or CDN compressing on the fly, then a .gz object told by its magic bytes
            data = inflate(
                decode_content_encoding(data, answer.get("Content-Encoding", ""), limit, self.url), limit, self.url
            )
        except CompressionError as error:
            raise SourceError(str(error)) from None
        digest = hashlib.sha256(data).hexdigest()
        etag, last_modified = answer.get("ETag", ""), answer.get("Last-Modified", "")
        tag = json.dumps({"etag": etag, "last_modified": last_modified, "sha256": digest}, sort_keys=True)
        if self.committed and json.loads(self.committed).get("sha256") == digest:
            # A server without validators (or a lying one) resent what is active.
            self.committed = tag
            return None
        return Fetched(data, tag, digest)

    def _follow(self, headers: dict[str, str], deadline: _Deadline) -> tuple[int, str, http.client.HTTPMessage, bytes]:
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            status, reason, answer, data = self._exchange(url, headers, deadline)
            if status not in _REDIRECTS:
                return status, reason, answer, data
            url = self._redirect(url, answer.get("Location", ""))
        raise SourceError(f"{self.url}: more than {MAX_REDIRECTS} redirects")

    def _redirect(self, url: str, location: str) -> str:
        if not location:
            raise SourceError(f"{self.url}: a redirect without a Location")
        target = urljoin(url, location)
        if origin_of(target) != self.origin:
            raise SourceError(
                f"{self.url}: redirected to another origin ({_origin_text(origin_of(target))}); pdp follows "
                f"redirects only within {_origin_text(self.origin)}, so that its token goes nowhere else: "
                "point --snapshot at the final URL"
            )
        return target

    def _exchange(
        self, url: str, headers: dict[str, str], deadline: _Deadline
    ) -> tuple[int, str, http.client.HTTPMessage, bytes]:
        """One request; the body is read only for a 200."""
        parts = urlsplit(url)
        _, host, port = origin_of(url)
        connection = http.client.HTTPConnection(host, port)
        # Connected here and watched by the deadline: http.client only speaks HTTP on it.
        # The socket's own timeout is a backstop only: the deadline's watchdog fires first.
        connection.sock = socket.create_connection((host, port), timeout=deadline.remaining() + 1)
        try:
            deadline.watch(connection.sock)
            if self._context is not None:
                tls = self._context.wrap_socket(connection.sock, server_hostname=host, do_handshake_on_connect=False)
                connection.sock = tls
                deadline.watch(tls)
                tls.do_handshake()
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
            data = self._body(response) if response.status == 200 else b""
            return response.status, response.reason, response.headers, data
        finally:
            connection.close()

    def _body(self, response: http.client.HTTPResponse) -> bytes:
        limit = self.options.max_bytes
        declared = response.length  # None when chunked, absent or malformed
        if declared is None and not response.chunked:
            raise SourceError(
                f"{self.url}: the store sent neither Content-Length nor chunked encoding, so a cut "
                "connection could not be told from the end of the snapshot"
            )
        if declared is not None and declared > limit:
            raise SourceError(f"{self.url}: snapshot larger than {limit} bytes ({declared} announced)")
        pieces: list[bytes] = []
        total = 0
        while True:
            try:
                piece = response.read(min(_PIECE, limit + 1 - total))
            except http.client.IncompleteRead as error:
                if response.chunked:
                    raise SourceError(f"{self.url}: the chunked body ended before its last chunk") from None
                piece, total = b"", total + len(error.partial)
            if not piece:
                break
            total += len(piece)
            if total > limit:
                raise SourceError(f"{self.url}: snapshot larger than {limit} bytes")
            pieces.append(piece)
        if declared is not None and total != declared:
            raise SourceError(
                f"{self.url}: the body ended after {total} of the {declared} bytes its Content-Length announced"
            )
        return b"".join(pieces)


def _describe(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        return str(error)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
