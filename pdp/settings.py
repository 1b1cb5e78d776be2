"""Every `pdp serve` setting, defined once: :class:`Setting` and the :data:`SETTINGS` table.

Each row gives a setting's flag, its ``PDP_*`` variable, its config-file key, its
parser, its metavar and its help; :mod:`pdp.config` builds the CLI options, the
resolution order and the README table from it. The parsers raise ValueError with a
message that names the bad value; :mod:`pdp.config` adds where it came from.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdp.envoy.mapping import (
    parse_attribute_names,
    parse_header_names,
    parse_hops,
    parse_source,
)
from pdp.sources import check_scheme

__all__ = ["SETTINGS", "Setting", "parse_listen"]


@dataclass(frozen=True, slots=True)
class Setting:
    name: str  # ServeConfig field and config-file key
    help: str
    metavar: str
    parse: Callable[[str], Any]
    env_name: str = ""  # when the contract's variable differs from PDP_<NAME>
    required: bool = False
    repeatable: bool = False  # the flag may be given again; the variable and config key take a comma list

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return self.env_name or "PDP_" + self.name.upper()

    @property
    def switch(self) -> bool:
        """A boolean: a bare flag with a ``--no-`` form on the command line."""
        return self.parse is _boolean


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise ValueError(f"{value} is not a positive integer")
    return value


def _float_range(low: float, high: float, unit: str = "") -> Callable[[str], float]:
    """A parser of numbers from ``low`` to ``high`` inclusive (nan and infinities refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not low <= value <= high:  # also false for nan
            raise ValueError(f"{value} is outside {low}..{high}{unit}")
        return value

    return parse


_seconds = _float_range(0, 3600, " seconds")
_interval = _float_range(0.05, 86400, " seconds")
_rate = _float_range(0, 1)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _boolean(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError(f"{text!r} is not true or false (nor 1/0, yes/no, on/off)")


def _processes(text: str) -> int:
    if text.strip().lower() == "auto":
        from pdp.cpus import usable_cpus

        return usable_cpus()
    return _positive(text)


def _log_level(text: str) -> str:
    if text.lower() not in ("debug", "info", "warning", "error"):
        raise ValueError(f"{text!r} is not one of debug, info, warning, error")
    return text.lower()


def _snapshot_url(text: str) -> str:
    if text and "://" not in text:
        # A bare path is the common case on the command line.
        return Path(text).resolve().as_uri()
    if text:
        check_scheme(text)
    return text


def _log_format(text: str) -> str:
    if text.lower() not in ("json", "text"):
        raise ValueError(f"{text!r} is not json or text")
    return text.lower()


def _nat64_prefixes(text: str) -> str:
    from pdp.addresses import parse_nat64_prefix

    return ",".join(str(parse_nat64_prefix(part).network) for part in text.split(",") if part.strip())


def _listen(text: str) -> str:
    parse_listen(text)
    return text


def _optional_listen(text: str) -> str:
    return _listen(text) if text else ""


def _optional_source(text: str) -> str:
    return parse_source(text) if text else ""


def _nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


_ENVOY = "Envoy ext_authz: "
_SOURCES = "context:KEY, claim:PATH, path:REGEX or header:NAME (see README, Envoy and Istio)"


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "listen",
        "address to serve on: HOST:PORT (port 0 picks a free one) or unix:/path/to.sock (in a directory only"
        " pdp's user can write, created 0750 if missing)",
        "ADDR",
        _listen,
    ),
    Setting(
        "health_listen",
        "extra address serving only grpc.health.v1 (for kubelet gRPC probes when --listen is a Unix socket)",
        "ADDR",
        _optional_listen,
    ),
    Setting(
        "snapshot",
        "rules snapshot to follow: file:///path/rules.yaml (or a plain path), http(s)://host/path, "
        "redis://host:port/db?key=K&channel=C (deltas from the stream K:deltas) or "
        "redis+sentinel://host:port,host:port/SERVICE?key=K",
        "URL",
        _snapshot_url,
        "PDP_SNAPSHOT_URL",
        required=True,
    ),
    Setting(
        "geoip_db",
        "MaxMind City or Country database (.mmdb), or 'demo' for the bundled 2018 GeoLite2-City",
        "PATH",
        str,
        required=True,
    ),
    Setting("cache_size", "entries in the IP-to-location LRU cache", "N", _positive),
    Setting("batch_limit", "most participants accepted in one CheckBatch", "N", _positive),
    Setting("max_message_bytes", "largest request accepted; larger ones get RESOURCE_EXHAUSTED", "BYTES", _positive),
    Setting(
        "workers",
        "gRPC server threads that decide (more wait for requests still coming, see --receive-timeout;"
        " streams have as many threads of their own)",
        "N",
        _positive,
    ),
    Setting(
        "processes",
        "worker processes serving the one listener (TCP: SO_REUSEPORT; a Unix socket: PATH plus PATH.0..PATH.N-1),"
        " or auto for the cores this process may use (affinity and cgroup CPU quota)",
        "N|auto",
        _processes,
    ),
    Setting(
        "receive_timeout",
        "longest a call may take to send its request message after its headers; one that sends nothing is"
        " cancelled then, or sooner when 4 x --workers calls are waiting and it has waited longest (on the"
        " AuthZEN listener: a request, from its connection or first byte, 408 beyond)",
        "SECONDS",
        _interval,
    ),
    Setting("grace_seconds", "on SIGTERM, how long in-flight calls may finish", "SECONDS", _seconds),
    Setting("log_level", "debug, info, warning or error", "LEVEL", _log_level),
    Setting(
        "snapshot_pubkey",
        "trusted Ed25519 public key files (PEM), comma-separated; when set, only "
        "snapshots signed by one of them are accepted",
        "FILES",
        str,
    ),
    Setting(
        "state_dir",
        "private directory (0700, created if missing; refused if others can write it) where the last "
        "activated snapshot is kept: served (marked stale) when the store is unreachable at start, and "
        "the replay floor after a restart",
        "DIR",
        str,
    ),
    Setting(
        "poll_seconds",
        "how often the snapshot source is polled (for redis://, the safety net "
        "behind pub/sub notices); jittered, with backoff on errors",
        "SECONDS",
        _interval,
    ),
    Setting("geoip_poll_seconds", "how often the GeoIP database file is checked for replacement", "SECONDS", _interval),
    Setting(
        "geoip_sha256_file",
        "file holding the database's SHA-256 as sha256sum writes it; when set, a database that does not "
        "match is refused at start and on reload (a flipped bit that leaves it readable included)",
        "FILE",
        str,
    ),
    Setting(
        "http_timeout",
        "deadline of one whole snapshot fetch for http(s) (connect, TLS, headers, body, redirects); "
        "for redis, of each command",
        "SECONDS",
        _interval,
    ),
    Setting(
        "http_bearer_token_file",
        "file holding a bearer token for http(s) snapshot URLs (read at each fetch, so it can be rotated)",
        "FILE",
        str,
    ),
    Setting("http_ca_bundle", "CA bundle (PEM) to verify https snapshot URLs", "FILE", str),
    Setting("log_format", "lifecycle logs on stderr as json or text", "FORMAT", _log_format),
    Setting("tls_cert", "PEM certificate chain: serve TCP with TLS", "FILE", str),
    Setting("tls_key", "PEM private key of --tls-cert", "FILE", str),
    Setting("tls_client_ca", "PEM CA bundle: require client certificates it signed (mutual TLS)", "FILE", str),
    Setting(
        "allow_insecure_remote",
        "serve a non-loopback TCP address without TLS (refused otherwise)",
        "BOOL",
        _boolean,
    ),
    Setting("audit_log", "decision audit log: a file path, or stdout; unset: no audit log", "PATH", str),
    Setting(
        "audit_hmac_key_file",
        "file with the key (16+ bytes) that pseudonymises participant and user ids in the audit log",
        "FILE",
        str,
    ),
    Setting("audit_allow_sample_rate", "share of ALLOW decisions also written to the audit log", "RATE", _rate),
    Setting("audit_include_ip", "write raw participant IPs into the audit log (opt-in)", "BOOL", _boolean),
    Setting(
        "audit_queue_size", "audit records waiting to be written; beyond, they are dropped and counted", "N", _positive
    ),
    Setting("audit_max_bytes", "audit log size that triggers rotation (5 old files are kept)", "BYTES", _positive),
    Setting("ext_authz_meeting_id", f"{_ENVOY}where the meeting id comes from: {_SOURCES}", "SOURCE", parse_source),
    Setting(
        "ext_authz_tags",
        f"{_ENVOY}where the meeting's tags come from (one comma-separated text, or a list claim)",
        "SOURCE",
        _optional_source,
    ),
    Setting("ext_authz_host_account_id", f"{_ENVOY}where the host account comes from", "SOURCE", _optional_source),
    Setting(
        "ext_authz_action",
        f"{_ENVOY}where the action comes from: join or host, absent means join",
        "SOURCE",
        _optional_source,
    ),
    Setting("ext_authz_user_id", f"{_ENVOY}where the participant's user id comes from", "SOURCE", _optional_source),
    Setting(
        "ext_authz_account_id", f"{_ENVOY}where the participant's account id comes from", "SOURCE", _optional_source
    ),
    Setting(
        "ext_authz_required",
        f"{_ENVOY}attributes whose absence is a deny with HTTP 400, comma-separated (meeting_id always is)",
        "NAMES",
        parse_attribute_names,
    ),
    Setting(
        "ext_authz_trusted_headers",
        f"{_ENVOY}request headers a proxy you run sets or overwrites on every request, comma-separated: "
        "only these may be header:NAME sources (a client writes every other header)",
        "NAMES",
        parse_header_names,
    ),
    Setting(
        "ext_authz_xff_trusted_hops",
        f"{_ENVOY}proxies in front of Envoy that each append to x-forwarded-for; the participant is the Nth "
        "address from the right. 0: Envoy's L4 peer, x-forwarded-for ignored",
        "N",
        parse_hops,
    ),
    Setting(
        "ext_authz_jwt_payload_key",
        f"{_ENVOY}the payload_in_metadata name of Envoy's jwt_authn providers, where claim:PATH is read",
        "NAME",
        _nonempty,
    ),
    Setting(
        "nat64_prefix",
        "NAT64 prefix of this network (RFC 6052: /32, /40, /48, /56, /64 or /96), repeatable or comma-separated; "
        "addresses in it are located by the IPv4 address they carry, as are the well-known NAT64, SIIT, 6to4 "
        "and Teredo forms",
        "PREFIX",
        _nat64_prefixes,
        repeatable=True,
    ),
    Setting(
        "http_listen",
        "also serve the OpenID AuthZEN Authorization API 1.0 over HTTP on HOST:PORT or unix:/path "
        "(same TLS settings as --listen; off when unset)",
        "ADDR",
        _optional_listen,
    ),
    Setting(
        "candidate_snapshot",
        "a second snapshot to follow (same sources, keys and checks) and evaluate next to the active one for "
        "every decision, never changing an answer: its would-be flips in GetStatus, the pdp.candidate.flips "
        "metric and the audit log's candidate_verdict",
        "URL",
        _snapshot_url,
    ),
)


_HOST_PORT = re.compile(r"(?P<host>\[[0-9a-fA-F:.]+\]|[^:\[\]]+):(?P<port>\d{1,5})")


def parse_listen(address: str) -> tuple[str, int | None]:
    """Split a listen address into (host or unix path, port or None).

    :raises ValueError: the address is neither HOST:PORT nor unix:/path.
    """
    if address.startswith("unix:"):
        path = address.removeprefix("unix:").removeprefix("//")
        if not path:
            raise ValueError(f"{address!r}: a unix: address needs a path, like unix:/run/pdp/pdp.sock")
        return path, None
    match = _HOST_PORT.fullmatch(address)
    if not match or int(match["port"]) > 65535:
        raise ValueError(f"{address!r} is not HOST:PORT (like 127.0.0.1:50051) or unix:/path/to.sock")
    return match["host"], int(match["port"])
