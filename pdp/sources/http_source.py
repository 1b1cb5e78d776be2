"""``http(s)://``: conditional GET against any static server, object store or CDN.

``If-None-Match`` and ``If-Modified-Since`` carry the validators of the last
*activated* snapshot, so a 304 costs no parsing and a rejected body is fetched
again on the next poll.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

from pdp.compression import CompressionError, decode_content_encoding, inflate
from pdp.sources.base import Fetched, Source, SourceError, SourceOptions, read_limited


class HttpSource(Source):
    def __init__(self, url: str, options: SourceOptions) -> None:
        super().__init__(url)
        self.options = options
        context = ssl.create_default_context(cafile=options.ca_bundle or None) if url.startswith("https:") else None
        handlers: list[urllib.request.BaseHandler] = [urllib.request.HTTPSHandler(context=context)] if context else []
        # No redirects to other hosts silently, and no proxies from the environment for a sidecar's store.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), *handlers)

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
        request = urllib.request.Request(self.url, headers=self._headers())  # noqa: S310  # scheme checked by open_source
        try:
            with self._opener.open(request, timeout=self.options.timeout) as response:
                data = read_limited(response, self.options.max_bytes, self.url)
                etag = response.headers.get("ETag", "")
                last_modified = response.headers.get("Last-Modified", "")
                encoding = response.headers.get("Content-Encoding", "")
            data = inflate(
                decode_content_encoding(data, encoding, self.options.max_bytes, self.url),
                self.options.max_bytes,
                self.url,
            )
        except CompressionError as error:
            raise SourceError(str(error)) from None
        except urllib.error.HTTPError as error:
            if error.code == 304:
                return None
            raise SourceError(f"{self.url}: HTTP {error.code} {error.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            raise SourceError(f"{self.url}: {reason}") from None
        digest = hashlib.sha256(data).hexdigest()
        tag = json.dumps({"etag": etag, "last_modified": last_modified, "sha256": digest}, sort_keys=True)
        if self.committed and json.loads(self.committed).get("sha256") == digest:
            # A server without validators (or a lying one) resent what is active.
            self.committed = tag
            return None
        return Fetched(data, tag, digest)
