"""Listener rules shared by every transport (gRPC in :mod:`pdp.server`, HTTP in
:mod:`pdp.authzen.server`): which TCP addresses may be served without TLS,
how a Unix socket's path is prepared, and the TLS files of :class:`ServeConfig`.

One set of rules, so that ``--http-listen`` is exactly as safe as ``--listen``.
"""

from __future__ import annotations

import ipaddress
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from pdp.config import ServeConfig
from pdp.files import NotPrivateError, private_directory

__all__ = ["SOCKET_UMASK", "TlsFiles", "is_loopback", "prepare_unix_socket", "refuse_insecure_remote", "tls_files"]

# Sockets are born group-only (0660): no moment where others may connect.
SOCKET_UMASK = 0o117


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The PEM contents of ``--tls-cert``, ``--tls-key`` and ``--tls-client-ca``."""

    cert: bytes
    key: bytes
    client_ca: bytes | None  # set: clients must present a certificate it signed


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; a host name may resolve anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_insecure_remote(listen: str, host: str, tls: bool, config: ServeConfig, flag: str = "--listen") -> None:
    """:raises OSError: ``host`` is not loopback, there is no TLS and
    ``--allow-insecure-remote`` is not set."""
    if tls or config.allow_insecure_remote or is_loopback(host):
        return
    raise OSError(
        f"refusing to serve {listen} without TLS ({flag}): it is reachable from other hosts; pass --tls-cert and "
        "--tls-key (and --tls-client-ca for mutual TLS), or --allow-insecure-remote"
    )


def tls_files(config: ServeConfig) -> TlsFiles | None:
    """The TLS material, or None when TLS is not configured.

    :raises OSError: only one of cert and key, a client CA without them, or a file cannot be read.
    """
    if not (config.tls_cert or config.tls_key):
        if config.tls_client_ca:
            raise OSError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (config.tls_cert and config.tls_key):
        raise OSError("TLS needs both --tls-cert and --tls-key")
    try:
        key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
        client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    except OSError as error:
        raise OSError(f"TLS: {error.filename}: {error.strerror}") from None
    return TlsFiles(cert, key, client_ca)


def prepare_unix_socket(path: Path) -> None:
    """Make ``path`` bindable: its directory created for the server alone (and
    its group, 0750) if missing, and refused if others could write it, sticky or
    not (they could move the socket aside, or take its name while pdp restarts,
    and listen in its place); then a socket left by a dead server removed.

    :raises OSError: the directory is not pdp's own (naming it, why and the fix),
        ``path`` is not a socket, or a live server listens on it.
    """
    own = path.parent / "pdp" / path.name
    advice = f"use a directory of pdp's own, such as unix:{own} (pdp creates it 0750, for its group)"
    try:
        private_directory(path.parent, mode=0o750, advice=advice)
    except NotPrivateError as error:
        detail = str(error) if "owned by" not in str(error) else f"{error}; {advice}"
        raise OSError(
            f"cannot listen on unix:{path}: {detail}; another user could move the socket aside and listen in its place"
        ) from None
    _clear_stale_socket(path)


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead server, never a live one or a non-socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise OSError(f"{path}: another server is listening on this socket")
