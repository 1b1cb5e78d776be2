"""Headless Chromium, driven over the DevTools protocol on a pipe.

``--remote-debugging-pipe`` makes Chromium read protocol messages from file
descriptor 3 and write its answers and events to descriptor 4, each a JSON text
ended by a NUL byte: no port, no websocket, no client library. The page's
Network domain reports every request the page makes, including those its
Content-Security-Policy blocks (as ``requestWillBeSent`` then ``loadingFailed``).
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .servers import require_binary


class BrowserError(Exception):
    """Chromium died, timed out, or answered a command with an error."""


@dataclass
class Visit:
    """What a page did while it loaded, and what it looked like."""

    url: str
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, itself first
    console: list[str] = field(default_factory=list)  # log entries: CSP violations, errors
    probe: Any = None  # what the probe expression returned
    screenshot: bytes = b""


class Chromium:
    """One headless Chromium for a test module; :meth:`visit` opens pages in fresh tabs."""

    def __init__(self, profile: Path) -> None:
        binary = require_binary("chromium", "chromium")
        child_reads, self._to_browser = os.pipe()
        self._from_browser, child_writes = os.pipe()
        self._stderr = (profile / "chromium.stderr").open("wb")
        flags = [
            "--headless",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile / 'profile'}",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to sandbox itself as root

        def descriptors() -> None:  # in the child, before exec: the pipes become fds 3 and 4
            reads, writes = os.dup(child_reads), os.dup(child_writes)
            os.dup2(reads, 3)
            os.dup2(writes, 4)

        self._process = subprocess.Popen(
            [binary, *flags, "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            preexec_fn=descriptors,
            close_fds=False,
        )
        os.close(child_reads)
        os.close(child_writes)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._from_browser, selectors.EVENT_READ)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ protocol

    def _send(self, method: str, params: dict[str, Any] | None, session: str | None) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(remaining):
                raise BrowserError(f"no answer from Chromium in time; its stderr: {self._stderr.name}")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium exited ({self._process.poll()}); its stderr: {self._stderr.name}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        document: dict[str, Any] = json.loads(message)
        return document

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        """Send a command and wait for its answer; events that arrive meanwhile are kept."""
        ident = self._send(method, params, session)
        deadline = time.monotonic() + 60
        while True:
            message = self._receive(deadline)
            if message.get("id") == ident:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._events.append(message)

    def wait_for(self, method: str, session: str) -> dict[str, Any]:
        """The first event ``method`` of ``session``, kept ones included."""
        deadline = time.monotonic() + 60
        while True:
            for event in self._events:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            self._events.append(self._receive(deadline))

    # ------------------------------------------------------------------ pages

    def visit(self, path: Path, probe: str, width: int = 1280) -> Visit:
        """Open ``path``, wait for its load event, run ``probe`` (a JS expression), take a full-page screenshot."""
        url = path.resolve().as_uri()
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Network", "Page", "Log", "Runtime"):
            self.call(f"{domain}.enable", session=session)
        self.call("Emulation.setDeviceMetricsOverride", _metrics(width, 900), session)
        self.call("Page.navigate", {"url": url}, session)
        self.wait_for("Page.loadEventFired", session)
        visit = Visit(url)
        evaluated = self.call("Runtime.evaluate", {"expression": probe, "returnByValue": True}, session)
        if "exceptionDetails" in evaluated:
            raise BrowserError(f"probe failed: {evaluated['exceptionDetails']}")
        visit.probe = evaluated["result"].get("value")
        height = self.call("Page.getLayoutMetrics", session=session)["cssContentSize"]["height"]
        self.call("Emulation.setDeviceMetricsOverride", _metrics(width, int(height) + 1), session)
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session)
        visit.screenshot = base64.b64decode(shot["data"])
        # Everything the page did up to the screenshot has been reported by now.
        self.call("Runtime.evaluate", {"expression": "0"}, session)
        for event in self._events:
            if event.get("sessionId") != session:
                continue
            if event.get("method") == "Network.requestWillBeSent":
                visit.requests.append(event["params"]["request"]["url"])
            elif event.get("method") == "Log.entryAdded":
                entry = event["params"]["entry"]
                visit.console.append(f"{entry['source']} {entry['level']}: {entry['text']}")
        self._events = [event for event in self._events if event.get("sessionId") != session]
        self.call("Target.closeTarget", {"targetId": target})
        return visit

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (BrowserError, OSError):
            self._process.kill()
        try:
            self._process.wait(timeout=30)
        finally:
            self._selector.close()
            os.close(self._to_browser)
            os.close(self._from_browser)
            self._stderr.close()


def _metrics(width: int, height: int) -> dict[str, Any]:
    return {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
