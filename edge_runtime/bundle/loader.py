"""Open a bundle (directory or packed file), verifying signature and every file's hash."""

from __future__ import annotations

import hashlib
import logging
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.bundle.archive import unpack_bundle
from edge_runtime.bundle.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    Manifest,
    ModelEntry,
    check_runtime_version,
    parse_manifest,
)
from edge_runtime.bundle.signing import TrustStore, verify_signature
from edge_runtime.errors import BundleError, IntegrityError, ManifestError, SignatureError

__all__ = ["Bundle", "open_bundle", "sha256_file"]

log = logging.getLogger(__name__)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Bundle:
    """A verified bundle directory."""

    root: Path
    manifest: Manifest
    signed_by: str | None = None
    _labels: list[str] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def model_entry(self, fmt: str | None = None) -> ModelEntry:
        """The model of format ``fmt``, or the first model when ``fmt`` is None."""
        if fmt is None:
            return self.manifest.models[0]
        entry = self.manifest.model(fmt)
        if entry is None:
            have = [m.format for m in self.manifest.models]
            raise BundleError(f"bundle {self.name} has no {fmt} model (it has {have})")
        return entry

    def path(self, name: str) -> Path:
        return self.root / name

    def labels(self) -> list[str]:
        if self._labels is None:
            if self.manifest.labels is None:
                self._labels = []
            else:
                text = self.path(self.manifest.labels).read_text(encoding="utf-8")
                self._labels = [line.strip() for line in text.splitlines() if line.strip()]
        return self._labels

    def selftest_data(self) -> dict[str, np.ndarray[Any, Any]]:
        """Arrays of selftest.npz (``frames`` and ``<format>.out<i>``)."""
        if self.manifest.selftest is None:
            return {}
        with np.load(self.path(self.manifest.selftest.path), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


def _verify_dir(root: Path, trust: TrustStore | None, require_signature: bool) -> Bundle:
    man_path = root / MANIFEST_NAME
    try:
        if man_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{man_path} is larger than {MAX_MANIFEST_BYTES} bytes")
        raw = man_path.read_bytes()
    except FileNotFoundError as exc:
        raise ManifestError(
            f"{root} has no manifest.json; is it a bundle? create one with 'edgert bundle create'"
        ) from exc
    except OSError as exc:
        raise BundleError(f"cannot read {man_path}: {exc}") from exc
    manifest = parse_manifest(raw)
    sig_path = root / SIGNATURE_NAME
    signed_by = None
    if sig_path.is_file():
        if trust is not None and trust.keys:
            signed_by = verify_signature(raw, sig_path.read_bytes(), trust)
        elif require_signature:
            raise SignatureError("no trusted keys are configured; add [trust] keys to the config")
    elif require_signature:
        raise SignatureError(
            f"bundle {root} is not signed; sign it with 'edgert bundle sign' or set "
            "trust.require_signature = false (development only)"
        )
    check_runtime_version(manifest)
    for name, entry in manifest.files.items():
        path = root / name
        try:
            st = path.lstat()
        except FileNotFoundError as exc:
            raise IntegrityError(f"bundle file {name} is listed in the manifest but missing") from exc
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"bundle file {name} is not a regular file (link or device)")
        if st.st_size != entry.size:
            raise IntegrityError(
                f"bundle file {name} is {st.st_size} bytes but the manifest says {entry.size}: "
                "it was truncated or replaced"
            )
        if sha256_file(path) != entry.sha256:
            raise IntegrityError(
                f"bundle file {name} does not match its sha256 in the manifest: it was altered or corrupted"
            )
    return Bundle(root=root, manifest=manifest, signed_by=signed_by)


def open_bundle(
    path: Path,
    *,
    trust: TrustStore | None = None,
    require_signature: bool = True,
    unpack_dir: Path | None = None,
) -> Bundle:
    """Open and verify a bundle directory or packed ``.edgebundle`` file.

    A packed file is unpacked (after its signature verified) into a new folder under
    ``unpack_dir`` (a temporary folder when None).
    """
    if path.is_dir():
        return _verify_dir(path, trust, require_signature)
    if not path.exists():
        raise BundleError(f"bundle {path} does not exist")
    own_base = unpack_dir is None
    base = unpack_dir or Path(tempfile.mkdtemp(prefix="edgert-bundle-"))
    base.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=f"{path.stem}-", dir=base))
    dest.rmdir()
    try:
        unpack_bundle(path, dest, trust=trust, require_signature=require_signature)
    except BaseException:
        if own_base:
            shutil.rmtree(base, ignore_errors=True)
        raise
    # Files were hashed while unpacking; re-verify cheaply is redundant but keeps one code path.
    return _verify_dir(dest, trust, require_signature)
