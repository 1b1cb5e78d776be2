"""The sidecar's composition root: one :class:`Sidecar` wires the policy
holder, the snapshot source and its reloader, the GeoIP database and its
watcher, telemetry, the audit log and the gRPC server, and stops them in
order.

``pdp serve`` is ``Sidecar(config).start()``, a line printed, then
:meth:`Sidecar.run_until_signal`; tests and benchmarks start a sidecar the
same way. Nothing else in pdp constructs these pieces together.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from pdp.audit import AuditConfig, AuditError, AuditLog
from pdp.candidate import CandidateShadow
from pdp.config import ServeConfig
from pdp.decisions import DecisionPath
from pdp.errors import PdpError
from pdp.geo import DEMO, DEMO_NOTICE, GeoDatabase, demo_database_path, read_pinned_sha256
from pdp.geo_watch import GeoWatcher
from pdp.reload import Reloader, StartupError
from pdp.server import RunningServer, StopSignals, start_server
from pdp.signing import SignatureError, TrustedKeys
from pdp.sources import Source, SourceOptions, open_source
from pdp.state import PolicyHolder
from pdp.telemetry import Telemetry, TelemetryError, configure_from_environment, wanted
from pdp.workers import Worker

if TYPE_CHECKING:
    from pdp.authzen import RunningHttp

__all__ = ["SetupError", "Sidecar", "open_geo"]

log = logging.getLogger("pdp")


class SetupError(PdpError):
    """The sidecar cannot start as configured; the message says what to change."""


def open_geo(
    name: str, cache_size: int = 100_000, sha256_file: str = "", nat64_prefixes: Sequence[str] = ()
) -> GeoDatabase:
    """Open a database by path, or the demo one for ``demo`` (with its notice);
    with ``sha256_file``, only if its digest is the one pinned there.

    :raises SetupError: no database named.
    :raises GeoIPError: the database cannot be opened or fails its pin.
    :raises InvalidPrefixError: a NAT64 prefix is malformed.
    """
    if not name:
        raise SetupError("no GeoIP database: pass --geoip-db PATH or set PDP_GEOIP_DB (or use --geoip-db demo)")
    sha256 = read_pinned_sha256(sha256_file) if sha256_file else ""
    if name == DEMO:
        log.warning(DEMO_NOTICE)
    path = demo_database_path() if name == DEMO else name
    return GeoDatabase(path, cache_size, sha256=sha256, nat64_prefixes=nat64_prefixes)


def _said_once(message: str) -> str:
    """A rejected snapshot's problems are listed once: the reloader's warning
    has just logged them, so the message keeps its first line only (all of
    it when warnings are not shown)."""
    head, newline, _ = message.partition("\n")
    if newline and logging.getLogger("pdp.reload").isEnabledFor(logging.WARNING):
        return f"{head.rstrip(':')} (listed in the warning above)"
    return message


class Sidecar:
    """One running pdp: :meth:`start`, then :meth:`stop` (idempotent).

    After :meth:`start`, ``holder``, ``geo`` (the database serving now),
    ``running`` (its ``address`` is what clients dial), ``http`` (the AuthZEN
    listener, with ``--http-listen``) and ``exporters`` (one description per
    telemetry exporter) are set.
    """

    def __init__(
        self, config: ServeConfig, environ: Mapping[str, str] | None = None, worker: Worker | None = None
    ) -> None:
        self.config = config
        self.worker = worker  # one of --processes N (pdp.supervisor)
        self.environ = os.environ if environ is None else environ
        self.holder = PolicyHolder()
        self.running: RunningServer | None = None
        self.http: RunningHttp | None = None
        self.exporters: list[str] = []
        self._source: Source | None = None
        self._reloader: Reloader | None = None
        self._watcher: GeoWatcher | None = None
        self._telemetry: Telemetry | None = None
        self._audit: AuditLog | None = None
        self.candidate: CandidateShadow | None = None  # with --candidate-snapshot
        self._candidate_reloader: Reloader | None = None

    @property
    def geo(self) -> GeoDatabase | None:
        """The database serving now. Not kept here: a replaced database's private copy
        is unmapped when the last reference to it goes."""
        return self.holder.geo

    @property
    def address(self) -> str:
        """What clients dial (the port resolved); empty before :meth:`start`."""
        return self.running.address if self.running is not None else ""

    def start(self) -> None:
        """Load, bind and start following the store; health follows the holder.

        :raises SetupError: a setting is missing or wrong, the store's snapshot
            is invalid with nothing persisted, or an address cannot be bound.
        :raises GeoIPError: the GeoIP database cannot be opened.
        """
        try:
            self._load()
            self._serve()
        except BaseException:
            self.stop(grace=0)
            raise
        for poller in (self._reloader, self._watcher, self._candidate_reloader):
            if poller is not None:
                poller.start()

    def _load(self) -> None:
        """The database, the source and the first snapshot, before any port is bound."""
        config = self.config
        if not config.snapshot:
            raise SetupError("no snapshot: pass --snapshot file:///path/rules.yaml or set PDP_SNAPSHOT_URL")
        try:
            keys = TrustedKeys.from_files(config.pubkey_files)
        except SignatureError as error:
            raise SetupError(f"--snapshot-pubkey: {error}") from None
        geo = open_geo(config.geoip_db, config.cache_size, config.geoip_sha256_file, config.nat64_prefixes)
        options = SourceOptions(
            timeout=config.http_timeout,
            bearer_token_file=config.http_bearer_token_file,
            ca_bundle=config.http_ca_bundle,
            keys=keys,  # redis deltas are verified as they are read
        )
        try:
            self._source = open_source(config.snapshot, options)
        except ValueError as error:
            raise SetupError(f"--snapshot: {error}") from None
        self.holder.activate_geo(geo)
        self._reloader = Reloader(
            self.holder, self._source, keys=keys, state_dir=config.state_dir or None, poll_seconds=config.poll_seconds
        )
        try:
            self._reloader.initial()
        except StartupError as error:
            raise SetupError(f"refusing to start: {_said_once(str(error))}") from None
        self._watcher = GeoWatcher(
            self.holder,
            geo.path,
            cache_size=config.cache_size,
            poll_seconds=config.geoip_poll_seconds,
            sha256_file=config.geoip_sha256_file,
            nat64_prefixes=config.nat64_prefixes,
        )
        if config.candidate_snapshot:
            self._follow_candidate(keys, options)

    def _follow_candidate(self, keys: TrustedKeys, options: SourceOptions) -> None:
        """A second snapshot, followed and checked like the first on a holder that
        never serves; one that cannot be loaded is said and followed, never fatal.

        :raises SetupError: its URL is malformed.
        """
        try:
            source = open_source(self.config.candidate_snapshot, options)
        except ValueError as error:
            raise SetupError(f"--candidate-snapshot: {error}") from None
        holder = PolicyHolder()
        self._candidate_reloader = Reloader(holder, source, keys=keys, poll_seconds=self.config.poll_seconds)
        self._candidate_reloader.name, self._candidate_reloader.what = "pdp-candidate-reloader", "candidate"
        try:
            self._candidate_reloader.initial()
        except StartupError as error:
            log.warning("candidate snapshot not loaded (followed still, never served): %s", error)
        self.candidate = CandidateShadow(holder)

    def _serve(self) -> None:
        """Telemetry, the audit log and the servers."""
        config = self.config
        try:
            if wanted(self.environ):
                self._telemetry, self.exporters = configure_from_environment(self.holder, self.environ)
            if config.audit_log:
                if not config.audit_hmac_key_file:
                    raise SetupError(
                        "--audit-log needs --audit-hmac-key-file (PDP_AUDIT_HMAC_KEY_FILE): ids are pseudonymised"
                    )
                self._audit = AuditLog(
                    AuditConfig(
                        config.audit_log,
                        config.audit_hmac_key_file,
                        config.audit_allow_sample_rate,
                        config.audit_include_ip,
                        config.audit_queue_size,
                        config.audit_max_bytes,
                    )
                )
            if self._audit is not None and self._telemetry is not None:
                self._audit.instrument(self._telemetry.meter_provider.get_meter("pdp.audit"))
            if self.candidate is not None:
                if self._audit is not None:
                    self._audit.annotate = self.candidate.annotate
                if self._telemetry is not None:
                    self.candidate.instrument(self._telemetry.meter_provider.get_meter("pdp.candidate"))
            self.running = start_server(
                config,
                self.holder,
                telemetry=self._telemetry,
                audit=self._audit,
                candidate=self.candidate,
                worker=self.worker,
            )
            if config.http_listen:
                from pdp.authzen import start_http  # uvicorn is imported only when it serves

                # The same decision and observation path as gRPC's: one holder, telemetry and audit log.
                self.http = start_http(config, DecisionPath(self.holder, self._telemetry, self._audit, self.candidate))
        except OSError as error:
            where = f"{error.filename}: " if error.filename else ""
            raise SetupError(f"{where}{error.strerror or error}") from None
        except (TelemetryError, AuditError) as error:
            raise SetupError(str(error)) from None

    def run_until_signal(self, ready: Callable[[], None] | None = None) -> str:
        """Serve until SIGTERM or SIGINT, then drain and :meth:`stop`; returns
        the signal's name. Main thread only.

        ``ready`` is called once the signals are caught, so a signal sent the
        moment it reports readiness is handled. The heap is frozen first:
        everything loaded so far lives as long as the process, so the cyclic
        collector skips it.
        """
        try:
            signals = StopSignals()
            gc.collect()
            gc.freeze()
            if ready is not None:
                ready()
            received = signals.wait()
            grace = self.running.grace_seconds if self.running is not None else 0.0
            log.info("%s received: draining for up to %.1fs (pid %d)", received, grace, os.getpid())
        finally:
            self.stop()
        return received

    def stop(self, grace: float | None = None) -> None:
        """Drain the server (for ``grace`` seconds, default the configured
        grace), then stop following and flush telemetry and the audit log."""
        running, self.running = self.running, None
        http, self.http = self.http, None
        if http is not None:
            http.request_stop(self.config.grace_seconds if grace is None else grace)
        if running is not None:
            running.stop(grace)
        if http is not None:
            http.wait()
        if running is not None or http is not None:
            log.info("stopped")
        if self._reloader is not None:
            self._reloader.stop()  # closes the source too
        elif self._source is not None:
            self._source.close()
        if self._watcher is not None:
            self._watcher.stop()
        self._reloader = self._watcher = self._source = None
        if self._candidate_reloader is not None:
            self._candidate_reloader.stop()
            self._candidate_reloader = None
        if self.candidate is not None:
            self.candidate.close()  # before the audit log, which asks it for verdicts
        if self._audit is not None:
            self._audit.close()
            log.info("audit log closed: %d records written, %d dropped", self._audit.written, self._audit.dropped)
            self._audit = None
        if self._telemetry is not None:
            self._telemetry.shutdown()
            self._telemetry = None
