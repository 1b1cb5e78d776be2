"""Following the GeoIP database file: a new or rewritten file is copied, validated
and compared with the serving one before one atomic swap; a file caught mid-write is
looked at again at the next poll, and the serving database keeps answering.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pdp.geo import FileChangedError, GeoDatabase, GeoIPError, format_build, read_pinned_sha256
from pdp.mmdb import look
from pdp.poller import Poller as _Poller
from pdp.state import PolicyHolder

__all__ = ["GeoWatcher"]

log = logging.getLogger("pdp.reload")


class GeoWatcher(_Poller):
    """Reopens the GeoIP database when its file changes: replaced by a rename
    (geoipupdate), or written in place (``cp``, same inode; a change of size,
    mtime or ctime). Each new content is copied into private memory and
    validated there before one swap (see :mod:`pdp.mmdb`), so a file caught
    half-written is refused or looked at again, and never served. A file that
    fails is refused until it changes again."""

    name = "pdp-geoip-watcher"

    def __init__(
        self,
        holder: PolicyHolder,
        path: str,
        *,
        cache_size: int,
        poll_seconds: float = 5.0,
        sha256_file: str = "",
        nat64_prefixes: Sequence[str] = (),
    ) -> None:
        """``sha256_file``, when set, pins the digest a new database must have;
        a change to either file is a change (write the digest, then rename the
        database in, or the other way round: the pair is checked again).
        ``nat64_prefixes`` are passed on to every database opened."""
        self.holder = holder
        self.path = path
        self.cache_size = cache_size
        self.poll_seconds = poll_seconds
        self.sha256_file = sha256_file
        self.nat64_prefixes = tuple(nat64_prefixes)
        serving = self._serving()
        # What the serving database was read from, not what is there now: a change
        # made since it was read is a change.
        self._seen = self._look(serving.look if serving is not None and serving.path == path else None)
        super().__init__()

    def _serving(self) -> GeoDatabase | None:
        active = self.holder.active
        return active.geo if active is not None else None

    def _look(self, database: object = None) -> object:
        database = database or look(self.path)
        if database is None or not self.sha256_file:
            return database
        return (database, look(self.sha256_file))

    def run_once(self) -> str:
        """Look at the file once; load, validate and swap if it changed. Returns what happened."""
        seen = self._look()
        if seen is None:
            return "missing: the loaded database keeps serving"
        if seen == self._seen:
            return "unchanged"
        status = self.holder.status
        try:
            pinned = read_pinned_sha256(self.sha256_file) if self.sha256_file else ""
            geo = GeoDatabase(self.path, self.cache_size, sha256=pinned, nat64_prefixes=self.nat64_prefixes)
            _check_replaces(self._serving(), geo)
        except FileChangedError as error:
            return f"changing: {error}; looked at again at the next poll"  # not remembered
        except GeoIPError as error:
            self._seen = seen
            status.geoip_rejections += 1
            status.last_error = f"GeoIP database rejected, {self._serving_text()} keeps serving: {error}"
            log.warning("%s", status.last_error)
            return f"rejected: {error}"
        self._seen = self._look(geo.look)  # what was read, should the file have moved on since the look
        self.holder.activate_geo(geo)
        status.geoip_reloads += 1
        log.info("GeoIP database reloaded: %s built %s", geo.database_type, format_build(geo.build_epoch))
        return f"reloaded build {geo.build_epoch}"

    def _serving_text(self) -> str:
        serving = self._serving()
        if serving is None:
            return "the loaded one"
        return f"the loaded {serving.database_type} built {format_build(serving.build_epoch)}"

    def _wait(self) -> None:
        self._stopping.wait(self.poll_seconds)


def _check_replaces(serving: GeoDatabase | None, new: GeoDatabase) -> None:
    """The same bytes again may replace ``serving`` (a cold cache is all it costs).

    :raises GeoIPError: ``new`` claims to be the serving build with other bytes: its
        metadata, at the end of the file, is the old one's while the rest is not,
        which is what a file being written over in place looks like.
    """
    if serving is None or new.sha256 == serving.sha256:
        return
    if (new.database_type, new.build_epoch) == (serving.database_type, serving.build_epoch):
        raise GeoIPError(
            f"{new.path}: says it is the same database as the one serving ({new.database_type} built "
            f"{format_build(new.build_epoch)}) but its bytes differ: a file being written over in place, "
            "or damaged (a new database has a new build time)"
        )
