"""Packed bundles (``*.edgebundle``): an ordered tar, written and read with strict checks.

Order: ``manifest.json``, ``manifest.sig`` (when signed), then the payload files in the
manifest's order. The reader streams: it parses the manifest and checks its signature
BEFORE reading any payload byte, then copies each payload member into a staging folder while
hashing it, and only renames the staging folder into place when every file matched. It
rejects absolute paths, ``..``, links, device files, directories, duplicates, members that the
manifest does not list, and members or archives larger than the limits.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from edge_runtime.bundle.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    Manifest,
    check_runtime_version,
    parse_manifest,
)
from edge_runtime.bundle.signing import TrustStore, verify_signature
from edge_runtime.errors import BundleError, IntegrityError, SignatureError, UnsafeArchiveError

__all__ = ["DEFAULT_MAX_BUNDLE_BYTES", "fsync_dir", "pack_bundle", "unpack_bundle"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BUNDLE_BYTES = 1 << 30
_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames inside it survive power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def pack_bundle(src: Path, dest: Path) -> Path:
    """Pack the bundle directory ``src`` into the single file ``dest`` (atomically)."""
    raw = (src / MANIFEST_NAME).read_bytes()
    manifest = parse_manifest(raw)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".pack-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                _add_bytes(tar, MANIFEST_NAME, raw)
                sig = src / SIGNATURE_NAME
                if sig.is_file():
                    _add_bytes(tar, SIGNATURE_NAME, sig.read_bytes())
                for name, entry in manifest.files.items():
                    path = src / name
                    info = tarfile.TarInfo(name)
                    info.size = entry.size
                    info.mode = 0o644
                    with path.open("rb") as payload:
                        tar.addfile(info, payload)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(dest)
        fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    if name.startswith("/") or ".." in Path(name).parts or "/" in name or "\\" in name:
        raise UnsafeArchiveError(f"archive member {name!r} has a path outside the bundle")
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(f"archive member {name!r} is a link; bundles hold regular files only")
    if not member.isreg():
        raise UnsafeArchiveError(f"archive member {name!r} is not a regular file (device, fifo or directory)")


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    _check_member(member)
    if member.size > limit:
        raise UnsafeArchiveError(f"{member.name} is {member.size} bytes; the limit is {limit}")
    fh = tar.extractfile(member)
    if fh is None:
        raise UnsafeArchiveError(f"{member.name} cannot be read")
    return fh.read(limit + 1)


def unpack_bundle(
    archive: Path,
    dest: Path,
    *,
    trust: TrustStore | None,
    require_signature: bool = True,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
) -> Manifest:
    """Verify and unpack ``archive`` into the new directory ``dest``.

    ``dest`` must not exist; it appears (by atomic rename) only when everything verified.
    """
    try:
        size = archive.stat().st_size
    except OSError as exc:
        raise BundleError(f"cannot read bundle {archive}: {exc}") from exc
    if size > max_bytes:
        raise UnsafeArchiveError(f"bundle {archive} is {size} bytes; the limit is {max_bytes}")
    if dest.exists():
        raise BundleError(f"{dest} already exists; refusing to unpack over it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        manifest = _stream_unpack(archive, staging, trust, require_signature, max_bytes)
        for path in staging.iterdir():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(staging)
        staging.replace(dest)
        fsync_dir(dest.parent)
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _stream_unpack(
    archive: Path,
    staging: Path,
    trust: TrustStore | None,
    require_signature: bool,
    max_bytes: int,
) -> Manifest:
    try:
        with archive.open("rb") as raw_fh, tarfile.open(fileobj=raw_fh, mode="r|*") as tar:
            return _unpack_members(tar, staging, trust, require_signature, max_bytes)
    except tarfile.TarError as exc:
        raise BundleError(
            f"bundle {archive} is not a valid packed bundle ({exc}); it may be truncated or "
            "corrupt - download it again"
        ) from exc
    except EOFError as exc:
        raise BundleError(f"bundle {archive} is truncated; download it again") from exc


def _unpack_members(
    tar: tarfile.TarFile,
    staging: Path,
    trust: TrustStore | None,
    require_signature: bool,
    max_bytes: int,
) -> Manifest:
    first = tar.next()
    if first is None or first.name != MANIFEST_NAME:
        raise BundleError("packed bundle must start with manifest.json")
    raw = _read_small(tar, first, MAX_MANIFEST_BYTES)
    manifest = parse_manifest(raw)
    member = tar.next()
    sig_doc: bytes | None = None
    if member is not None and member.name == SIGNATURE_NAME:
        sig_doc = _read_small(tar, member, 4096)
        member = tar.next()
    if sig_doc is None:
        if require_signature:
            raise SignatureError(
                "bundle is not signed; sign it with 'edgert bundle sign' or set "
                "trust.require_signature = false (development only)"
            )
    elif trust is not None and trust.keys:
        verify_signature(raw, sig_doc, trust)
    elif require_signature:
        raise SignatureError("no trusted keys are configured; add [trust] keys to the config")
    check_runtime_version(manifest)
    (staging / MANIFEST_NAME).write_bytes(raw)
    if sig_doc is not None:
        (staging / SIGNATURE_NAME).write_bytes(sig_doc)
    seen: set[str] = set()
    total = len(raw)
    while member is not None:
        _check_member(member)
        name = member.name
        entry = manifest.files.get(name)
        if entry is None:
            raise UnsafeArchiveError(f"archive member {name!r} is not listed in the manifest")
        if name in seen:
            raise UnsafeArchiveError(f"archive member {name!r} appears twice")
        if member.size != entry.size:
            raise IntegrityError(
                f"{name} is {member.size} bytes in the archive but {entry.size} in the manifest"
            )
        total += member.size
        if total > max_bytes:
            raise UnsafeArchiveError(f"bundle payload exceeds the limit of {max_bytes} bytes")
        _copy_hashed(tar, member, staging / name, entry.sha256)
        seen.add(name)
        member = tar.next()
    missing = sorted(set(manifest.files) - seen)
    if missing:
        raise IntegrityError(f"bundle is missing files listed in the manifest: {missing}")
    return manifest


def _copy_hashed(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path, sha256: str) -> None:
    src = tar.extractfile(member)
    if src is None:
        raise UnsafeArchiveError(f"{member.name} cannot be read")
    digest = hashlib.sha256()
    remaining = member.size
    with path.open("xb") as out:
        while remaining:
            chunk = src.read(min(_CHUNK, remaining))
            if not chunk:
                raise IntegrityError(f"{member.name} is truncated in the archive")
            digest.update(chunk)
            out.write(chunk)
            remaining -= len(chunk)
    if digest.hexdigest() != sha256:
        raise IntegrityError(
            f"{member.name} sha256 {digest.hexdigest()[:16]}... does not match the manifest "
            f"({sha256[:16]}...): the file was altered or corrupted"
        )
