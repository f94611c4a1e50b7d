"""Bundle v1: manifest schema, safe pack/unpack, Ed25519 signing, creation and loading."""

from __future__ import annotations

from edge_runtime.bundle.archive import DEFAULT_MAX_BUNDLE_BYTES, pack_bundle, unpack_bundle
from edge_runtime.bundle.create import create_bundle, sign_bundle, write_manifest
from edge_runtime.bundle.loader import Bundle, open_bundle, sha256_file
from edge_runtime.bundle.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    ModelEntry,
    SelfTestSpec,
    TensorInfo,
    canonical_bytes,
    parse_manifest,
)
from edge_runtime.bundle.signing import (
    TrustStore,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    verify_signature,
)

__all__ = [
    "DEFAULT_MAX_BUNDLE_BYTES",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "SIGNATURE_NAME",
    "Bundle",
    "FileEntry",
    "Manifest",
    "ModelEntry",
    "SelfTestSpec",
    "TensorInfo",
    "TrustStore",
    "canonical_bytes",
    "create_bundle",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "open_bundle",
    "pack_bundle",
    "parse_manifest",
    "sha256_file",
    "sign_bundle",
    "unpack_bundle",
    "verify_signature",
    "write_manifest",
]
