"""Signed snapshots: Ed25519 keys and the envelope that binds payload, key and version.

An envelope is a small JSON document::

    {"pdp_signed_snapshot": 1, "key_id": "3f2a...", "version": 42,
     "payload": "<base64 of the rules file's bytes>", "signature": "<base64>"}

The signature covers ``pdp-snapshot-v1``, the key id, the version and the
payload's SHA-256, so none of them can be swapped without detection; the
version inside the payload must equal the envelope's.
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
    "SignatureError",
    "TrustedKeys",
    "generate_keypair",
    "is_envelope",
    "key_id",
    "load_private_key",
    "open_envelope",
    "sign",
]

FORMAT = 1
_MARKER = b'"pdp_signed_snapshot"'


class SignatureError(PdpError, ValueError):
    """A snapshot's signature is missing, malformed, unknown or wrong."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short stable name of a key: the first 16 hex digits of its SHA-256."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _message(kid: str, version: int, payload: bytes) -> bytes:
    return f"pdp-snapshot-v1\n{kid}\n{version}\n{hashlib.sha256(payload).hexdigest()}".encode()


def sign(payload: bytes, version: int, private_key: Ed25519PrivateKey) -> bytes:
    """Wrap ``payload`` (a rules file's bytes, whose version is ``version``) in a signed envelope."""
    kid = key_id(private_key.public_key())
    envelope = {
        "pdp_signed_snapshot": FORMAT,
        "key_id": kid,
        "version": version,
        "payload": base64.b64encode(payload).decode(),
        "signature": base64.b64encode(private_key.sign(_message(kid, version, payload))).decode(),
    }
    return (json.dumps(envelope, indent=1) + "\n").encode()


def is_envelope(data: bytes) -> bool:
    """True when ``data`` looks like a signed envelope rather than a plain rules file."""
    return data.lstrip()[:1] == b"{" and _MARKER in data[:200]


@dataclass(frozen=True, slots=True)
class Opened:
    """A verified envelope's contents."""

    payload: bytes
    version: int
    key_id: str


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

    def open(self, data: bytes) -> Opened:
        """Verify an envelope and return its payload.

        :raises SignatureError: not an envelope, malformed, unknown key, bad signature.
        """
        from cryptography.exceptions import InvalidSignature

        envelope = _parse(data)
        key = self._keys.get(envelope.key_id)
        if key is None:
            trusted = ", ".join(self.ids) or "none"
            raise SignatureError(f"signed with unknown key {envelope.key_id!r} (trusted: {trusted})")
        try:
            key.verify(envelope.signature, _message(envelope.key_id, envelope.version, envelope.payload))
        except InvalidSignature:
            raise SignatureError(
                f"bad signature (key {envelope.key_id}): the snapshot was altered or signed otherwise"
            ) from None
        return Opened(envelope.payload, envelope.version, envelope.key_id)


def open_envelope(data: bytes) -> Opened:
    """An envelope's payload *without* verifying it (no keys configured).

    :raises SignatureError: the envelope is malformed.
    """
    envelope = _parse(data)
    return Opened(envelope.payload, envelope.version, envelope.key_id)


@dataclass(frozen=True, slots=True)
class _Envelope:
    key_id: str
    version: int
    payload: bytes
    signature: bytes


def _parse(data: bytes) -> _Envelope:
    if not is_envelope(data):
        raise SignatureError("not signed: a trusted key is configured, so only signed snapshots are accepted")
    try:
        raw = json.loads(data)
        if raw.get("pdp_signed_snapshot") != FORMAT:
            raise SignatureError(f"unsupported envelope format {raw.get('pdp_signed_snapshot')!r}")
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
