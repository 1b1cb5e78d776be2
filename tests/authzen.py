"""A real sidecar with its AuthZEN listener, and a plain HTTP/1.1 client for it."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdp.app import Sidecar
from pdp.config import ServeConfig
from pdp.state import Active

from .conftest import CITY_DB, CN_MEMORIAL

EVALUATION = "/access/v1/evaluation"
EVALUATIONS = "/access/v1/evaluations"
METADATA = "/.well-known/authzen-configuration"
JSON = {"Content-Type": "application/json"}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type") == "application/json", self.headers
        return json.loads(self.body)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class AuthZenClient:
    """One connection per request, to ``url`` (``http://``, ``https://`` or ``unix:/path``)."""

    def __init__(self, url: str, *, context: ssl.SSLContext | None = None, timeout: float = 10) -> None:
        self.url = url
        self._context = context
        self._timeout = timeout

    def connection(self) -> http.client.HTTPConnection:
        if self.url.startswith("unix:"):
            return _UnixConnection(self.url.removeprefix("unix:"), self._timeout)
        scheme, _, netloc = self.url.partition("://")
        if scheme == "https":
            return http.client.HTTPSConnection(netloc, timeout=self._timeout, context=self._context)
        return http.client.HTTPConnection(netloc, timeout=self._timeout)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Reply:
        connection = self.connection()
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            data = response.read()
            return Reply(response.status, {name.lower(): value for name, value in response.getheaders()}, data)
        finally:
            connection.close()

    def post(self, path: str, document: Any, headers: dict[str, str] | None = None) -> Reply:
        return self.request("POST", path, json.dumps(document).encode(), {**JSON, **(headers or {})})

    def evaluate(self, document: Any, headers: dict[str, str] | None = None) -> Any:
        """POST an evaluation, expecting 200; the Decision object."""
        reply = self.post(EVALUATION, document, headers)
        assert reply.status == 200, reply
        return reply.json()

    def evaluate_all(self, document: Any) -> list[Any]:
        """POST evaluations, expecting 200; the Decision objects."""
        reply = self.post(EVALUATIONS, document)
        assert reply.status == 200, reply
        items: list[Any] = reply.json()["evaluations"]
        return items


def subject(ip: str, user_id: str = "u-1", **properties: Any) -> dict[str, Any]:
    return {"type": "participant", "id": user_id, "properties": {"ip": ip, **properties}}


def resource(meeting_id: str = "m-1", tags: list[str] | None = None, host: str = "") -> dict[str, Any]:
    properties: dict[str, Any] = {"tags": tags or []}
    if host:
        properties["host_account_id"] = host
    return {"type": "meeting", "id": meeting_id, "properties": properties}


def action(name: str = "join") -> dict[str, Any]:
    return {"name": name}


def request(ip: str, meeting_id: str = "m-1", tags: list[str] | None = None, name: str = "join") -> dict[str, Any]:
    return {"subject": subject(ip), "action": action(name), "resource": resource(meeting_id, tags)}


SidecarFactory = Callable[..., Sidecar]


def running_sidecars(tmp_path: Path) -> Iterator[SidecarFactory]:
    """For a fixture: ``sidecars(rules=CN_MEMORIAL, environ=None, **settings)`` gives a started
    :class:`pdp.app.Sidecar` following a rules file, gRPC on a Unix socket and
    AuthZEN on 127.0.0.1 (unless ``http_listen`` says otherwise); all stopped afterwards.
    ``rules=None`` starts it with no snapshot published yet."""
    started: list[Sidecar] = []

    def start(rules: str | None = CN_MEMORIAL, environ: dict[str, str] | None = None, **settings: Any) -> Sidecar:
        folder = tmp_path / f"sidecar-{len(started)}"
        folder.mkdir()
        snapshot = folder / "rules.yaml"
        if rules is not None:
            snapshot.write_text(rules)
        values: dict[str, Any] = {
            "listen": f"unix:{folder}/pdp.sock", "http_listen": "127.0.0.1:0", "snapshot": snapshot.as_uri(),
            "geoip_db": str(CITY_DB), "poll_seconds": 0.05, **settings,
        }  # fmt: skip
        sidecar = Sidecar(ServeConfig(**values), environ=environ or {})
        sidecar.start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        sidecar.stop(grace=0)


def client_of(sidecar: Sidecar, **options: Any) -> AuthZenClient:
    assert sidecar.http is not None
    return AuthZenClient(sidecar.http.url, **options)


def wait_for_version(sidecar: Sidecar, version: int, timeout: float = 30) -> Active:
    """Block until the sidecar serves ``version`` (an event from the holder, not a sleep)."""
    reached = threading.Event()
    unsubscribe = sidecar.holder.subscribe(lambda active: reached.set() if active.policy.version == version else None)
    try:
        active = sidecar.holder.active
        if active is None or active.policy.version != version:
            assert reached.wait(timeout), f"version {version} never became active"
            active = sidecar.holder.active
    finally:
        unsubscribe()
    assert active is not None
    return active
