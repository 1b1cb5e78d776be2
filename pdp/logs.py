"""Lifecycle logs: one JSON object per line on stderr (or plain text for humans).

Only start-up, activations, rejections, reloads and shutdown are logged;
never anything per request. URLs have their passwords removed before logging.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from urllib.parse import urlsplit, urlunsplit

__all__ = ["JsonFormatter", "redact_url", "setup"]

_PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


def setup(log_format: str = "text", level: str = "info") -> None:
    """Configure the root logger once: JSON or plain text on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_PLAIN))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def redact_url(url: str) -> str:
    """``redis://user:secret@host/0`` -> ``redis://user:***@host/0``; other text unchanged."""
    if "://" not in url or "@" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
