"""Signed snapshots: Ed25519 keys and the envelope that binds payload, key and version.

An envelope is a small JSON document::

    {"pdp_signed_snapshot": 1, "key_id": "3f2a...", "version": 42,
     "payload": "<base64 of the rules file's bytes>", "signature": "<base64>"}

The signature covers ``pdp-snapshot-v1``, the key id, the version and the
payload's SHA-256, so none of them can be swapped without detection; the
version inside the payload must equal the envelope's.

Deltas (:mod:`pdp.delta`) travel in the same envelope with ``pdp_signed_delta``
for marker and ``pdp-delta-v1`` in the signed message: a signed delta can never
pass for a signed snapshot, nor the other way round.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pdp.errors import PdpError

# cryptography is imported where keys are used: a sidecar that trusts no key,
# and so verifies nothing, never loads it.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "DELTA",
    "SNAPSHOT",
    "Opened",
    "SignatureError",
    "TrustedKeys",
    "envelope",
    "generate_keypair",
    "is_envelope",
    "key_id",
    "load_private_key",
    "open_envelope",
    "sign",
]

FORMAT = 1
SNAPSHOT = "snapshot"
DELTA = "delta"


class SignatureError(PdpError, ValueError):
    """A snapshot's signature is missing, malformed, unknown or wrong."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short stable name of a key: the first 16 hex digits of its SHA-256."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _message(kid: str, version: int, payload: bytes, kind: str = SNAPSHOT, sha256: str = "") -> bytes:
    return f"pdp-{kind}-v1\n{kid}\n{version}\n{sha256 or hashlib.sha256(payload).hexdigest()}".encode()


def _marker(kind: str) -> str:
    return f"pdp_signed_{kind}"


def sign(payload: bytes, version: int, private_key: Ed25519PrivateKey, *, kind: str = SNAPSHOT) -> bytes:
    """Wrap ``payload`` (a rules file's bytes, whose version is ``version``; or a
    delta's, with ``kind=DELTA``) in a signed envelope."""
    kid = key_id(private_key.public_key())
    return envelope(kid, version, payload, private_key.sign(_message(kid, version, payload, kind)), kind=kind)


def envelope(kid: str, version: int, payload: bytes, signature: bytes, *, kind: str = SNAPSHOT) -> bytes:
    """The envelope's bytes, exactly as :func:`sign` writes them: a delta's
    result is rebuilt with them into the very snapshot that was published.

    The same text ``json.dumps(..., indent=1)`` makes, written directly: base64
    needs no escaping, and scanning megabytes of it for characters to escape
    was most of the cost of rebuilding a 10,000-rule snapshot.
    """
    return b"".join(
        (
            f'{{\n "{_marker(kind)}": {FORMAT},\n "key_id": {json.dumps(kid)},\n "version": {int(version)},\n'.encode(),
            b' "payload": "',
            base64.b64encode(payload),
            b'",\n "signature": "',
            base64.b64encode(signature),
            b'"\n}\n',
        )
    )


def is_envelope(data: bytes, kind: str = SNAPSHOT) -> bool:
    """True when ``data`` looks like a signed envelope of ``kind`` rather than a plain document."""
    return data.lstrip()[:1] == b"{" and f'"{_marker(kind)}"'.encode() in data[:200]


@dataclass(frozen=True, slots=True)
class Opened:
    """A verified envelope's contents."""

    payload: bytes
    version: int
    key_id: str
    signature: bytes = b""
    sha256: str = ""  # the payload's, when verified (it was computed for the signature)


class TrustedKeys:
    """The public keys a sidecar accepts signatures from (several, for rotation)."""

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()) -> None:
        self._keys = {key_id(key): key for key in keys}

    @classmethod
    def from_files(cls, paths: Iterable[str | Path]) -> TrustedKeys:
        """Load PEM public keys.

        :raises SignatureError: a file is unreadable or holds no Ed25519 public key.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        keys = []
        for path in paths:
            try:
                loaded = serialization.load_pem_public_key(Path(path).read_bytes())
            except (OSError, ValueError) as error:
                raise SignatureError(f"{path}: not a readable PEM public key ({error})") from None
            if not isinstance(loaded, Ed25519PublicKey):
                raise SignatureError(f"{path}: not an Ed25519 public key")
            keys.append(loaded)
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    @property
    def ids(self) -> list[str]:
        return sorted(self._keys)

    def open(self, data: bytes, kind: str = SNAPSHOT, sha256: str = "") -> Opened:
        """Verify an envelope of ``kind`` and return its payload. ``sha256``, the
        payload's digest when the caller knows it already, saves hashing it.

        :raises SignatureError: not an envelope, malformed, unknown key, bad signature.
        """
        from cryptography.exceptions import InvalidSignature

        parsed = _parse(data, kind)
        key = self._keys.get(parsed.key_id)
        if key is None:
            trusted = ", ".join(self.ids) or "none"
            raise SignatureError(f"signed with unknown key {parsed.key_id!r} (trusted: {trusted})")
        digest = sha256 or hashlib.sha256(parsed.payload).hexdigest()
        try:
            key.verify(parsed.signature, _message(parsed.key_id, parsed.version, parsed.payload, kind, digest))
        except InvalidSignature:
            raise SignatureError(
                f"bad signature (key {parsed.key_id}): the {kind} was altered or signed otherwise"
            ) from None
        return Opened(parsed.payload, parsed.version, parsed.key_id, parsed.signature, digest)

    def check(self, kid: str, version: int, sha256: str, signature: bytes, kind: str = SNAPSHOT) -> None:
        """Verify a signature given apart from its envelope, over a payload known by its digest.

        :raises SignatureError: unknown key or bad signature.
        """
        from cryptography.exceptions import InvalidSignature

        key = self._keys.get(kid)
        if key is None:
            raise SignatureError(f"signed with unknown key {kid!r} (trusted: {', '.join(self.ids) or 'none'})")
        try:
            key.verify(signature, _message(kid, version, b"", kind, sha256))
        except InvalidSignature:
            raise SignatureError(f"bad signature (key {kid}): the {kind} was altered or signed otherwise") from None


def open_envelope(data: bytes, kind: str = SNAPSHOT) -> Opened:
    """An envelope's payload *without* verifying it (no keys configured).

    :raises SignatureError: the envelope is malformed.
    """
    parsed = _parse(data, kind)
    return Opened(parsed.payload, parsed.version, parsed.key_id, parsed.signature)


@dataclass(frozen=True, slots=True)
class _Envelope:
    key_id: str
    version: int
    payload: bytes
    signature: bytes


def _parse(data: bytes, kind: str = SNAPSHOT) -> _Envelope:
    if not is_envelope(data, kind):
        raise SignatureError(f"not signed: a trusted key is configured, so only signed {kind}s are accepted")
    marker = _marker(kind)
    try:
        raw = json.loads(data)
        if raw.get(marker) != FORMAT:
            raise SignatureError(f"unsupported envelope format {raw.get(marker)!r}")
        kid, version = raw["key_id"], raw["version"]
        if not isinstance(kid, str) or isinstance(version, bool) or not isinstance(version, int):
            raise SignatureError("envelope key_id must be a string and version an integer")
        payload = base64.b64decode(raw["payload"], validate=True)
        signature = base64.b64decode(raw["signature"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as error:
        if isinstance(error, SignatureError):
            raise
        raise SignatureError(f"malformed signed envelope ({error.__class__.__name__}: {error})") from None
    return _Envelope(kid, version, payload, signature)


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 key pair (private key readable by the owner only); return its key id.

    :raises FileExistsError: either file exists already (keys are never overwritten).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite a key")
    # O_EXCL and mode 0600 at creation: the private key is never readable by others, not even briefly.
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    return key_id(private_key.public_key())


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """:raises SignatureError: the file is unreadable or not an Ed25519 private key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        loaded = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise SignatureError(f"{path}: not a readable unencrypted PEM private key ({error})") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return loaded
