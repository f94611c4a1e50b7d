"""Ed25519 keys and manifest signatures.

``manifest.sig`` is a small JSON document ``{"alg": "ed25519", "key_id": ..., "sig": ...}``
over the exact bytes of ``manifest.json``. ``key_id`` is the first 16 hex digits of the
sha256 of the raw 32-byte public key, so devices can trust several keys (rotation).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.errors import SignatureError

__all__ = [
    "TrustStore",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "sign_bytes",
    "verify_signature",
]

_MAX_SIG_BYTES = 4096


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short stable id of a public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(directory: Path, name: str = "edgert") -> tuple[Path, Path]:
    """Write ``NAME.key`` (private, mode 0600) and ``NAME.pub`` into ``directory``.

    Refuses to overwrite an existing key so a signing key is never lost by accident.
    """
    directory.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (priv_path, pub_path):
        if path.exists():
            raise SignatureError(f"{path} already exists; choose another --name or directory")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv)
    pub_path.write_bytes(pub)
    return priv_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PEM, PKCS8)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(
            f"cannot load signing key {path}: {exc}; create one with 'edgert keys generate'"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key; use 'edgert keys generate'")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key (PEM SubjectPublicKeyInfo)."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"cannot load public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key")
    return key


def sign_bytes(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """The manifest.sig document for ``data``."""
    doc = {
        "alg": "ed25519",
        "key_id": key_id(key.public_key()),
        "sig": base64.b64encode(key.sign(data)).decode(),
    }
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


@dataclass(frozen=True)
class TrustStore:
    """The public keys a device accepts bundle and command signatures from."""

    keys: dict[str, Ed25519PublicKey]

    @classmethod
    def from_files(cls, paths: list[Path]) -> TrustStore:
        keys = {}
        for path in paths:
            key = load_public_key(path)
            keys[key_id(key)] = key
        return cls(keys)

    def verify(self, data: bytes, signature_doc: bytes) -> str:
        """Check ``signature_doc`` over ``data``; return the signing key id."""
        return verify_signature(data, signature_doc, self)


def verify_signature(data: bytes, signature_doc: bytes, trust: TrustStore) -> str:
    """Verify a manifest.sig document; return the key id or raise :class:`SignatureError`."""
    if len(signature_doc) > _MAX_SIG_BYTES:
        raise SignatureError("manifest.sig is too large to be a signature")
    try:
        doc = json.loads(signature_doc)
        alg, kid, sig_b64 = doc["alg"], doc["key_id"], doc["sig"]
        sig = base64.b64decode(sig_b64, validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise SignatureError(f"manifest.sig is malformed ({exc}); re-sign the bundle") from exc
    if alg != "ed25519":
        raise SignatureError(f"signature algorithm {alg!r} is not supported (ed25519 only)")
    key = trust.keys.get(str(kid))
    if key is None:
        raise SignatureError(
            f"bundle is signed by key {kid}, which is not trusted; add its public key to "
            "[trust] keys in the config, or sign with a trusted key"
        )
    try:
        key.verify(sig, data)
    except InvalidSignature as exc:
        raise SignatureError(
            f"signature by key {kid} does not match the manifest: the bundle was modified "
            "after signing or the signature is forged"
        ) from exc
    return str(kid)
