"""Tests for edge_runtime.bundle: manifest, signing, packing/unpacking, loading, self-test.

Everything is real: bundles are created from a real ONNX model with the real ONNX Runtime,
signed with real Ed25519 keys, packed into real tar files; the attack archives are built by
hand here with :mod:`tarfile`, member by member, so the reader meets exactly the bytes an
attacker would send.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import pytest

import edge_runtime
from edge_runtime.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Bundle,
    FileEntry,
    TrustStore,
    create_bundle,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    open_bundle,
    pack_bundle,
    parse_manifest,
    sha256_file,
    sign_bundle,
    unpack_bundle,
    verify_signature,
    write_manifest,
)
from edge_runtime.decoders.specs import ClassificationSpec
from edge_runtime.errors import (
    BundleError,
    IntegrityError,
    ManifestError,
    ModelLoadError,
    SelfTestError,
    SignatureError,
    UnsafeArchiveError,
)
from edge_runtime.model import load_model
from edge_runtime.preprocess_spec import ImagePreprocess
from edge_runtime.selftest import run_selftest

PAYLOAD = ["labels.txt", "model.onnx", "reference.json", "selftest.npz"]


# ================================================================== helpers


def trust_of(*pubs: Path) -> TrustStore:
    return TrustStore.from_files(list(pubs))


def bundle_members(root: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of a bundle directory in the packed order: manifest, sig, payload."""
    out = [(MANIFEST_NAME, (root / MANIFEST_NAME).read_bytes())]
    if (root / SIGNATURE_NAME).exists():
        out.append((SIGNATURE_NAME, (root / SIGNATURE_NAME).read_bytes()))
    manifest = json.loads(out[0][1])
    out += [(name, (root / name).read_bytes()) for name in manifest["files"]]
    return out


def reg(name: str, data: bytes, size: int | None = None) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data) if size is None else size
    info.mode = 0o644
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info, None


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def regular_members(root: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [reg(name, data) for name, data in bundle_members(root)]


def assert_no_leftovers(parent: Path) -> None:
    """A failed unpack leaves nothing in the destination's folder (no dest, no staging)."""
    assert not parent.exists() or sorted(p.name for p in parent.iterdir()) == []


def resign(root: Path, key: Path, **manifest_updates: Any) -> None:
    """Re-hash every payload file, apply ``manifest_updates``, rewrite and re-sign."""
    manifest = parse_manifest((root / MANIFEST_NAME).read_bytes())
    files = {
        n: FileEntry(sha256=sha256_file(root / n), size=(root / n).stat().st_size) for n in manifest.files
    }
    write_manifest(root, manifest.model_copy(update={"files": files, **manifest_updates}))
    sign_bundle(root, key)


@pytest.fixture
def signed(make_cnn_bundle: Callable[..., Path]) -> Path:
    return make_cnn_bundle()


@pytest.fixture
def trust(keys: tuple[Path, Path]) -> TrustStore:
    return trust_of(keys[1])


@pytest.fixture
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("other-keys"), name="other")


# ================================================================== round trips


def test_create_sign_verify_dir_round_trip(signed: Path, trust: TrustStore, keys: tuple[Path, Path]) -> None:
    bundle = open_bundle(signed, trust=trust)
    assert isinstance(bundle, Bundle)
    assert bundle.root == signed
    assert bundle.signed_by == key_id(load_public_key(keys[1]))
    assert (bundle.name, bundle.version) == ("tiny-cnn", "1.0.0")
    assert bundle.labels() == ["a", "b", "c", "d"]
    assert sorted(bundle.manifest.files) == PAYLOAD
    for name, entry in bundle.manifest.files.items():
        data = (signed / name).read_bytes()
        assert entry.size == len(data)
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
    # manifest.json holds canonical JSON (sorted keys, compact) and the signature covers it
    raw = (signed / MANIFEST_NAME).read_bytes()
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    assert verify_signature(raw, (signed / SIGNATURE_NAME).read_bytes(), trust) == bundle.signed_by


def test_golden_outputs_match_an_independent_run(
    signed: Path, cnn_onnx: Path, golden_images: np.ndarray
) -> None:
    """selftest.npz holds what a plain ORT session gives on frames preprocessed by hand."""
    data = open_bundle(signed, require_signature=False).selftest_data()
    np.testing.assert_array_equal(data["frames"], golden_images)
    sess = ort.InferenceSession(str(cnn_onnx), providers=["CPUExecutionProvider"])
    for i, frame in enumerate(golden_images):
        small = cv2.resize(frame, (32, 32), interpolation=cv2.INTER_LINEAR)
        x = cv2.cvtColor(small, cv2.COLOR_BGR2RGB).astype(np.float32)[None] / np.float32(255.0)
        (probs,) = sess.run(None, {"input": x})
        np.testing.assert_allclose(data["onnx.out0"][i], probs, rtol=1e-5, atol=1e-6)


def test_packed_round_trip(signed: Path, trust: TrustStore, tmp_path: Path, keys: tuple[Path, Path]) -> None:
    packed = pack_bundle(signed, tmp_path / "pack" / "tiny.edgebundle")
    with tarfile.open(packed) as tar:
        names = tar.getnames()
    assert names == [MANIFEST_NAME, SIGNATURE_NAME, *PAYLOAD]
    dest = tmp_path / "unpacked" / "b"
    manifest = unpack_bundle(packed, dest, trust=trust)
    assert manifest == parse_manifest((signed / MANIFEST_NAME).read_bytes())
    for name in [MANIFEST_NAME, SIGNATURE_NAME, *PAYLOAD]:
        assert (dest / name).read_bytes() == (signed / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "unpacked").iterdir()) == ["b"]


def test_create_bundle_pack_and_edgert_open_bundle(
    tmp_path: Path, cnn_onnx: Path, golden_images: np.ndarray, keys: tuple[Path, Path]
) -> None:
    """The top-level ``edge_runtime`` API: create with pack=, open the .edgebundle with a TrustStore."""
    packed = tmp_path / "dist" / "tiny.edgebundle"
    edge_runtime.create_bundle(
        tmp_path / "src",
        models=[cnn_onnx],
        name="tiny",
        version="2.1.0-rc.1+build.5",
        task="classification",
        preprocess=ImagePreprocess(),
        decoder=ClassificationSpec(),
        golden_frames=golden_images[:2],
        sign_key=keys[0],
        pack=packed,
    )
    unpack_dir = tmp_path / "state"
    trust = edge_runtime.TrustStore.from_files([keys[1]])
    bundle = edge_runtime.open_bundle(packed, trust=trust, unpack_dir=unpack_dir)
    assert bundle.root.parent == unpack_dir
    assert bundle.version == "2.1.0-rc.1+build.5"
    assert bundle.signed_by == key_id(load_public_key(keys[1]))
    assert bundle.labels() == []
    assert (bundle.root / "model.onnx").read_bytes() == cnn_onnx.read_bytes()


def test_gzip_compressed_archive_is_accepted(signed: Path, trust: TrustStore, tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "a.edgebundle", regular_members(signed), mode="w:gz")
    with archive.open("rb") as fh:
        assert fh.read(2) == b"\x1f\x8b"  # really gzip
    dest = tmp_path / "out" / "b"
    unpack_bundle(archive, dest, trust=trust)
    for name in PAYLOAD:
        assert (dest / name).read_bytes() == (signed / name).read_bytes()


def test_unsigned_bundle_opens_only_when_signature_not_required(
    make_cnn_bundle: Callable[..., Path], trust: TrustStore, tmp_path: Path
) -> None:
    root = make_cnn_bundle(sign=False)
    assert not (root / SIGNATURE_NAME).exists()
    with pytest.raises(SignatureError, match="not signed"):
        open_bundle(root, trust=trust)
    assert open_bundle(root, trust=trust, require_signature=False).signed_by is None
    packed = pack_bundle(root, tmp_path / "u.edgebundle")
    with pytest.raises(SignatureError, match="not signed"):
        unpack_bundle(packed, tmp_path / "out" / "u", trust=trust)
    assert_no_leftovers(tmp_path / "out")
    unpack_bundle(packed, tmp_path / "out" / "u", trust=None, require_signature=False)
    assert (tmp_path / "out" / "u" / "model.onnx").is_file()


def test_signed_bundle_without_trusted_keys_is_refused(signed: Path) -> None:
    with pytest.raises(SignatureError, match="no trusted keys"):
        open_bundle(signed, trust=None)
    with pytest.raises(SignatureError, match="no trusted keys"):
        open_bundle(signed, trust=TrustStore({}))


# ================================================================== tampering (directory)


def test_flipped_payload_byte_is_an_integrity_error(signed: Path, trust: TrustStore) -> None:
    path = signed / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.onnx.*sha256"):
        open_bundle(signed, trust=trust)


def test_truncated_model_is_an_integrity_error(signed: Path, trust: TrustStore) -> None:
    path = signed / "model.onnx"
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(IntegrityError) as err:
        open_bundle(signed, trust=trust)
    msg = str(err.value)
    assert "model.onnx" in msg and str(len(full) // 2) in msg and str(len(full)) in msg


def test_missing_and_replaced_payload_files(signed: Path, trust: TrustStore) -> None:
    (signed / "labels.txt").unlink()
    with pytest.raises(IntegrityError, match=r"labels\.txt.*missing"):
        open_bundle(signed, trust=trust)
    (signed / "labels.txt").symlink_to(signed / "reference.json")
    with pytest.raises(IntegrityError, match=r"labels\.txt.*not a regular file"):
        open_bundle(signed, trust=trust)


def test_manifest_edited_after_signing(signed: Path, trust: TrustStore) -> None:
    path = signed / MANIFEST_NAME
    raw = path.read_bytes()
    edited = raw.replace(b'"description":""', b'"description":"evil"')
    assert edited != raw
    path.write_bytes(edited)
    with pytest.raises(SignatureError, match="does not match the manifest"):
        open_bundle(signed, trust=trust)


def test_signature_by_untrusted_key_names_the_key(
    signed: Path, trust: TrustStore, keys: tuple[Path, Path], other_keys: tuple[Path, Path]
) -> None:
    kid = sign_bundle(signed, other_keys[0])
    assert kid == key_id(load_private_key(other_keys[0]).public_key())
    assert kid != next(iter(trust.keys))
    with pytest.raises(SignatureError, match=f"key {kid}.*not trusted"):
        open_bundle(signed, trust=trust)
    # trusting both keys (rotation) accepts it and reports which key signed
    assert open_bundle(signed, trust=trust_of(keys[1], other_keys[1])).signed_by == kid


def test_signature_of_another_manifest_is_rejected(
    make_cnn_bundle: Callable[..., Path], trust: TrustStore
) -> None:
    a, b = make_cnn_bundle(version="1.0.0"), make_cnn_bundle(version="1.0.1")
    (a / SIGNATURE_NAME).write_bytes((b / SIGNATURE_NAME).read_bytes())
    with pytest.raises(SignatureError, match="does not match"):
        open_bundle(a, trust=trust)


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        (b"not json at all", "malformed"),
        (b"\xff\xfe\x00", "malformed"),
        (b'["alg", "key_id", "sig"]', "malformed"),
        (b'{"alg": "ed25519", "sig": "AAAA"}', "malformed"),
        (b'{"alg": "ed25519", "key_id": "KID", "sig": "!!not base64!!"}', "malformed"),
        (b'{"alg": "rsa", "key_id": "KID", "sig": "AAAA"}', "not supported"),
        (b'{"alg": "ed25519", "key_id": "KID", "sig": "AAAA"}', "does not match"),
        (b'{"alg": "ed25519", "key_id": "KID", "sig": "' + b"A" * 5000 + b'"}', "too large"),
    ],
)
def test_malformed_signature_documents(signed: Path, trust: TrustStore, doc: bytes, match: str) -> None:
    kid = next(iter(trust.keys))
    (signed / SIGNATURE_NAME).write_bytes(doc.replace(b"KID", kid.encode()))
    with pytest.raises(SignatureError, match=match):
        open_bundle(signed, trust=trust)


def test_malformed_manifest_in_directory(signed: Path, trust: TrustStore) -> None:
    (signed / MANIFEST_NAME).write_bytes(b"{ this is not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        open_bundle(signed, trust=trust)
    (signed / MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError, match=r"no manifest\.json"):
        open_bundle(signed, trust=trust)


def test_open_missing_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        open_bundle(tmp_path / "nope.edgebundle", require_signature=False)


# ================================================================== manifest schema


@pytest.fixture
def manifest_doc(signed: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((signed / MANIFEST_NAME).read_bytes())
    return doc


def parse(doc: dict[str, Any]) -> str:
    """Parse ``doc``; return the ManifestError message (the test fails if it parses)."""
    with pytest.raises(ManifestError) as err:
        parse_manifest(json.dumps(doc).encode())
    return str(err.value)


def test_valid_manifest_document_parses(manifest_doc: dict[str, Any]) -> None:
    manifest = parse_manifest(json.dumps(manifest_doc).encode())
    assert manifest.model("onnx") is not None and manifest.model("tflite") is None
    assert manifest.models[0].inputs[0].to_spec().shape == (1, 32, 32, 3)


def test_manifest_missing_field(manifest_doc: dict[str, Any]) -> None:
    del manifest_doc["task"]
    assert "task: required field is missing" in parse(manifest_doc)


def test_manifest_missing_nested_field(manifest_doc: dict[str, Any]) -> None:
    del manifest_doc["files"]["model.onnx"]["sha256"]
    assert "files.model.onnx.sha256: required field is missing" in parse(manifest_doc)


def test_manifest_unknown_field(manifest_doc: dict[str, Any]) -> None:
    manifest_doc["colour"] = "red"
    assert "colour: unknown field" in parse(manifest_doc)


def test_manifest_unknown_nested_field(manifest_doc: dict[str, Any]) -> None:
    manifest_doc["models"][0]["inputs"][0]["shap"] = [1]
    assert "models.0.inputs.0.shap: unknown field" in parse(manifest_doc)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_manifest_wrong_schema_version(manifest_doc: dict[str, Any], version: object) -> None:
    manifest_doc["schema_version"] = version
    msg = parse(manifest_doc)
    assert "schema_version" in msg and repr(version) in msg


@pytest.mark.parametrize(
    ("field", "value"),
    [("version", "1.0"), ("version", "01.2.3"), ("version", "v1.2.3"), ("min_runtime_version", "latest")],
)
def test_manifest_bad_semver(manifest_doc: dict[str, Any], field: str, value: str) -> None:
    manifest_doc[field] = value
    msg = parse(manifest_doc)
    assert f"{field}:" in msg and "semantic version" in msg


def test_manifest_bad_sha256_and_size(manifest_doc: dict[str, Any]) -> None:
    manifest_doc["files"]["labels.txt"] = {"sha256": "XYZ", "size": -1}
    msg = parse(manifest_doc)
    assert "files.labels.txt.sha256" in msg and "files.labels.txt.size" in msg


@pytest.mark.parametrize("bad", ["sub/model.bin", "../model.bin", "..", "/etc/passwd", "a\\b", MANIFEST_NAME])
def test_manifest_file_name_must_be_flat(manifest_doc: dict[str, Any], bad: str) -> None:
    """A file name with '/', '..', '\\' or a reserved name is refused, naming the file."""
    manifest_doc["files"][bad] = {"sha256": "0" * 64, "size": 1}
    msg = parse(manifest_doc)
    assert repr(bad) in msg and "not allowed" in msg


def test_manifest_bad_file_name_error_names_the_field_path(manifest_doc: dict[str, Any]) -> None:
    """Like every other manifest error, a bad file name is reported under its field path."""
    manifest_doc["files"]["../model.bin"] = {"sha256": "0" * 64, "size": 1}
    msg = parse(manifest_doc)
    location = msg.removeprefix("invalid manifest: ").split(":", 1)[0]
    assert location.startswith("files"), msg


def test_manifest_referenced_file_must_be_listed(manifest_doc: dict[str, Any]) -> None:
    del manifest_doc["files"]["labels.txt"]
    assert "'labels.txt' is referenced but not listed in 'files'" in parse(manifest_doc)


@pytest.mark.parametrize("raw", [b"[]", b"42", b"\xff\xfe", b"{", b"x" * ((1 << 20) + 1)])
def test_manifest_not_an_object(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(raw)


# ================================================================== packed archive attacks


def unpack_fails(
    archive: Path, tmp_path: Path, trust: TrustStore, exc: type[Exception], match: str, **kw: Any
) -> None:
    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        unpack_bundle(archive, out / "b", trust=trust, **kw)
    assert_no_leftovers(out)


def with_extra(root: Path, extra: tuple[tarfile.TarInfo, bytes | None], at: int = 2) -> list[Any]:
    """The bundle's members with ``extra`` inserted at position ``at`` (after manifest+sig)."""
    members = regular_members(root)
    members.insert(at, extra)
    return members


@pytest.mark.parametrize("name", ["../x", "../../etc/cron.d/evil", "a/../../x", "sub/labels.txt", "..\\x"])
def test_archive_path_traversal(signed: Path, trust: TrustStore, tmp_path: Path, name: str) -> None:
    archive = write_tar(tmp_path / "a.edgebundle", with_extra(signed, reg(name, b"pwned")))
    unpack_fails(archive, tmp_path, trust, UnsafeArchiveError, "outside the bundle")
    assert not (tmp_path / "x").exists()


def test_archive_absolute_path(signed: Path, trust: TrustStore, tmp_path: Path) -> None:
    target = tmp_path / "abs-target"
    archive = write_tar(tmp_path / "a.edgebundle", with_extra(signed, reg(str(target), b"pwned")))
    unpack_fails(archive, tmp_path, trust, UnsafeArchiveError, "outside the bundle")
    assert not target.exists()


@pytest.mark.parametrize(
    ("kind", "linkname"),
    [(tarfile.SYMTYPE, "/etc/passwd"), (tarfile.SYMTYPE, "labels.txt"), (tarfile.LNKTYPE, "labels.txt")],
)
def test_archive_links(signed: Path, trust: TrustStore, tmp_path: Path, kind: bytes, linkname: str) -> None:
    """A link in place of a listed payload file is refused before anything is written."""
    members = [m for m in regular_members(signed) if m[0].name != "model.onnx"]
    members.insert(3, special("model.onnx", kind, linkname))
    archive = write_tar(tmp_path / "a.edgebundle", members)
    unpack_fails(archive, tmp_path, trust, UnsafeArchiveError, "is a link")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.DIRTYPE])
def test_archive_device_fifo_and_directory_members(
    signed: Path, trust: TrustStore, tmp_path: Path, kind: bytes
) -> None:
    members = [m for m in regular_members(signed) if m[0].name != "model.onnx"]
    members.insert(3, special("model.onnx", kind))
    archive = write_tar(tmp_path / "a.edgebundle", members)
    unpack_fails(archive, tmp_path, trust, UnsafeArchiveError, "not a regular file")


def test_archive_duplicate_member(signed: Path, trust: TrustStore, tmp_path: Path) -> None:
    members = regular_members(signed)
    members.append(reg("labels.txt", (signed / "labels.txt").read_bytes()))
    archive = write_tar(tmp_path / "a.edgebundle", members)
    unpack_fails(archive, tmp_path, trust, UnsafeArchiveError, "appears twice")


def test_archive_member_not_in_manifest(signed: Path, trust: TrustStore, tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "a.edgebundle", with_extra(signed, reg("extra.bin", b"hello"), at=4))
    unpack_fails(archive, tmp_path, trust, UnsafeArchiveError, "'extra.bin' is not listed")


def test_archive_member_size_differs_from_manifest(signed: Path, trust: TrustStore, tmp_path: Path) -> None:
    members = [
        reg(name, data + b"\n" if name == "labels.txt" else data) for name, data in bundle_members(signed)
    ]
    archive = write_tar(tmp_path / "a.edgebundle", members)
    unpack_fails(archive, tmp_path, trust, IntegrityError, r"labels\.txt is 9 bytes in the archive but 8")


def test_archive_payload_altered_same_size(signed: Path, trust: TrustStore, tmp_path: Path) -> None:
    members = []
    for name, data in bundle_members(signed):
        flipped = data[:-1] + bytes([data[-1] ^ 0xFF])
        members.append(reg(name, flipped if name == "model.onnx" else data))
    archive = write_tar(tmp_path / "a.edgebundle", members)
    unpack_fails(archive, tmp_path, trust, IntegrityError, r"model\.onnx sha256")


def test_archive_missing_member(signed: Path, trust: TrustStore, tmp_path: Path) -> None:
    members = [m for m in regular_members(signed) if m[0].name != "reference.json"]
    archive = write_tar(tmp_path / "a.edgebundle", members)
    unpack_fails(archive, tmp_path, trust, IntegrityError, r"missing files .*reference\.json")


def test_archive_manifest_not_first(signed: Path, trust: TrustStore, tmp_path: Path) -> None:
    members = regular_members(signed)
    members.append(members.pop(0))
    archive = write_tar(tmp_path / "a.edgebundle", members)
    unpack_fails(archive, tmp_path, trust, BundleError, "must start with manifest.json")


def test_archive_manifest_edited_is_refused_before_payload(
    signed: Path, trust: TrustStore, tmp_path: Path
) -> None:
    """The signature is checked before any payload byte: garbage payloads never matter."""
    raw = (signed / MANIFEST_NAME).read_bytes().replace(b'"top_k":2', b'"top_k":3')
    members = [reg(MANIFEST_NAME, raw), reg(SIGNATURE_NAME, (signed / SIGNATURE_NAME).read_bytes())]
    members.append(reg("../../garbage", b"x" * 10))
    archive = write_tar(tmp_path / "a.edgebundle", members)
    unpack_fails(archive, tmp_path, trust, SignatureError, "does not match")


def test_archive_untrusted_signature(
    signed: Path, trust: TrustStore, other_keys: tuple[Path, Path], tmp_path: Path
) -> None:
    kid = sign_bundle(signed, other_keys[0])
    archive = pack_bundle(signed, tmp_path / "a.edgebundle")
    unpack_fails(archive, tmp_path, trust, SignatureError, f"key {kid}")


def test_archive_malformed_signature(signed: Path, trust: TrustStore, tmp_path: Path) -> None:
    members = regular_members(signed)
    members[1] = reg(SIGNATURE_NAME, b'{"alg": "ed25519"}')
    archive = write_tar(tmp_path / "a.edgebundle", members)
    unpack_fails(archive, tmp_path, trust, SignatureError, "malformed")


def test_archive_malformed_manifest(signed: Path, trust: TrustStore, tmp_path: Path) -> None:
    members = regular_members(signed)
    members[0] = reg(MANIFEST_NAME, b'{"schema_version": 1, "name": "x"}')
    archive = write_tar(tmp_path / "a.edgebundle", members)
    unpack_fails(archive, tmp_path, trust, ManifestError, "required field is missing")


def test_archive_truncated_mid_payload(signed: Path, trust: TrustStore, tmp_path: Path) -> None:
    full = pack_bundle(signed, tmp_path / "full.edgebundle").read_bytes()
    npz = (signed / "selftest.npz").read_bytes()
    start = full.find(npz[:64])
    assert start > 0
    cut = tmp_path / "cut.edgebundle"
    cut.write_bytes(full[: start + len(npz) // 2])
    unpack_fails(cut, tmp_path, trust, BundleError, "truncated")


def test_archive_truncated_gzip(signed: Path, trust: TrustStore, tmp_path: Path) -> None:
    full = write_tar(tmp_path / "full.tgz", regular_members(signed), mode="w:gz").read_bytes()
    cut = tmp_path / "cut.edgebundle"
    cut.write_bytes(full[: len(full) * 3 // 4])
    unpack_fails(cut, tmp_path, trust, BundleError, r"truncated|not a valid packed bundle")


def test_archive_not_a_tar(trust: TrustStore, tmp_path: Path) -> None:
    junk = tmp_path / "junk.edgebundle"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    unpack_fails(junk, tmp_path, trust, BundleError, "not a valid packed bundle")


def test_archive_over_size_limit(signed: Path, trust: TrustStore, tmp_path: Path) -> None:
    archive = pack_bundle(signed, tmp_path / "a.edgebundle")
    size = archive.stat().st_size
    unpack_fails(
        archive,
        tmp_path,
        trust,
        UnsafeArchiveError,
        f"{size} bytes; the limit is {size - 1}",
        max_bytes=size - 1,
    )
    unpack_bundle(archive, tmp_path / "out" / "b", trust=trust, max_bytes=size)


def test_compressed_payload_over_size_limit(
    tmp_path: Path, cnn_onnx: Path, keys: tuple[Path, Path], trust: TrustStore
) -> None:
    """A small gzip archive whose payload expands past ``max_bytes`` is refused while reading."""
    zeros = tmp_path / "zeros.bin"
    zeros.write_bytes(bytes(1 << 20))
    root = create_bundle(
        tmp_path / "zeros",
        models=[cnn_onnx],
        name="zeros",
        version="1.0.0",
        task="classification",
        preprocess=ImagePreprocess(),
        decoder=ClassificationSpec(),
        golden_frames=np.zeros((8, 64, 64, 3), np.uint8),
        extra_files={"zeros.bin": zeros},
        sign_key=keys[0],
    )
    archive = write_tar(tmp_path / "z.edgebundle", regular_members(root), mode="w:gz")
    payload = sum(
        (root / n).stat().st_size for n in ["model.onnx", "reference.json", "selftest.npz", "zeros.bin"]
    )
    limit = payload // 2
    assert archive.stat().st_size < limit
    unpack_fails(archive, tmp_path, trust, UnsafeArchiveError, "payload exceeds", max_bytes=limit)


def test_unpack_refuses_existing_destination(signed: Path, trust: TrustStore, tmp_path: Path) -> None:
    archive = pack_bundle(signed, tmp_path / "a.edgebundle")
    dest = tmp_path / "out" / "b"
    dest.mkdir(parents=True)
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="already exists"):
        unpack_bundle(archive, dest, trust=trust)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["b"]


def test_open_bundle_packed_failure_leaves_unpack_dir_empty(
    signed: Path, trust: TrustStore, tmp_path: Path
) -> None:
    members = regular_members(signed)
    members.insert(3, reg("../escape", b"x"))
    archive = write_tar(tmp_path / "a.edgebundle", members)
    unpack_dir = tmp_path / "state"
    with pytest.raises(UnsafeArchiveError):
        open_bundle(archive, trust=trust, unpack_dir=unpack_dir)
    assert list(unpack_dir.iterdir()) == []
    assert not (tmp_path / "escape").exists()


# ================================================================== keys


def test_generate_keypair_modes_and_refuses_overwrite(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path / "k", name="site")
    assert (priv.name, pub.name) == ("site.key", "site.pub")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert load_private_key(priv).public_key().public_bytes_raw() == load_public_key(pub).public_bytes_raw()
    before = priv.read_bytes(), pub.read_bytes()
    with pytest.raises(SignatureError, match="already exists"):
        generate_keypair(tmp_path / "k", name="site")
    assert (priv.read_bytes(), pub.read_bytes()) == before
    # a lone .pub also blocks (the pair must never be split)
    priv.unlink()
    with pytest.raises(SignatureError, match="already exists"):
        generate_keypair(tmp_path / "k", name="site")
    assert not priv.exists()


def test_generate_keypair_mode_ignores_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        priv, _ = generate_keypair(tmp_path, name="open")
    finally:
        os.umask(old)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600


def test_load_keys_errors(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SignatureError, match="cannot load signing key"):
        load_private_key(bad)
    with pytest.raises(SignatureError, match="cannot load signing key"):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(SignatureError, match="cannot load public key"):
        load_public_key(keys[0])  # a private key is not a public key
    with pytest.raises(SignatureError):
        TrustStore.from_files([bad])


# ================================================================== create_bundle failures


def test_create_bundle_with_corrupt_model_leaves_nothing(
    tmp_path: Path, golden_images: np.ndarray, keys: tuple[Path, Path]
) -> None:
    corrupt = tmp_path / "in" / "broken.onnx"
    corrupt.parent.mkdir()
    corrupt.write_bytes(np.random.default_rng(1).bytes(4096))
    out = tmp_path / "dist" / "b"
    with pytest.raises(ModelLoadError, match=r"model\.onnx"):
        create_bundle(
            out,
            models=[corrupt],
            name="broken",
            version="1.0.0",
            task="classification",
            preprocess=ImagePreprocess(),
            decoder=ClassificationSpec(),
            golden_frames=golden_images,
            sign_key=keys[0],
        )
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_create_bundle_refuses_existing_out(
    make_cnn_bundle: Callable[..., Path], cnn_onnx: Path, golden_images: np.ndarray
) -> None:
    root = make_cnn_bundle()
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    with pytest.raises(BundleError, match="already exists"):
        create_bundle(
            root,
            models=[cnn_onnx],
            name="again",
            version="1.0.0",
            task="classification",
            preprocess=ImagePreprocess(),
            decoder=ClassificationSpec(),
            golden_frames=golden_images,
        )
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before


@pytest.mark.parametrize("bad", ["model.pt", "two"])
def test_create_bundle_bad_model_list(
    tmp_path: Path, cnn_onnx: Path, golden_images: np.ndarray, bad: str
) -> None:
    models = [tmp_path / "m.pt"] if bad == "model.pt" else [cnn_onnx, cnn_onnx]
    if bad == "model.pt":
        models[0].write_bytes(b"torch")
    out = tmp_path / "dist" / "b"
    with pytest.raises(BundleError, match=r"\.onnx or \.tflite|one model per format"):
        create_bundle(
            out,
            models=models,
            name="x",
            version="1.0.0",
            task="classification",
            preprocess=ImagePreprocess(),
            decoder=ClassificationSpec(),
            golden_frames=golden_images,
        )
    assert list(out.parent.iterdir()) == []


# ================================================================== self-test


def test_selftest_passes_on_fresh_bundle(signed: Path, trust: TrustStore, golden_images: np.ndarray) -> None:
    model = load_model(open_bundle(signed, trust=trust), "onnx")
    try:
        report = run_selftest(model)
    finally:
        model.close()
    assert report.passed and report.reasons == []
    assert (report.frames, report.matched) == (len(golden_images), len(golden_images))
    assert report.max_abs_error < 1e-5
    assert 0 < report.latency_ms_p50 <= report.latency_budget_ms


def test_selftest_fails_on_altered_golden_outputs(
    signed: Path, trust: TrustStore, keys: tuple[Path, Path]
) -> None:
    path = signed / "selftest.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["onnx.out0"] = arrays["onnx.out0"].copy()
    arrays["onnx.out0"][1] += 0.25  # one frame of four off by far more than atol/rtol
    np.savez(path, **arrays)
    resign(signed, keys[0])
    model = load_model(open_bundle(signed, trust=trust), "onnx")
    try:
        with pytest.raises(SelfTestError, match=r"only 3/4 golden frames .*max abs error 0\.25"):
            run_selftest(model)
        report = run_selftest(model, raise_on_fail=False)
    finally:
        model.close()
    assert not report.passed and report.matched == 3
    assert report.max_abs_error == pytest.approx(0.25, abs=1e-5)


def test_selftest_fails_over_latency_budget(signed: Path, trust: TrustStore, keys: tuple[Path, Path]) -> None:
    manifest = parse_manifest((signed / MANIFEST_NAME).read_bytes())
    assert manifest.selftest is not None
    resign(signed, keys[0], selftest=manifest.selftest.model_copy(update={"latency_budget_ms": 1e-6}))
    model = load_model(open_bundle(signed, trust=trust), "onnx")
    try:
        with pytest.raises(SelfTestError, match="exceeds the budget"):
            run_selftest(model)
    finally:
        model.close()


def test_selftest_tolerates_min_match(signed: Path, trust: TrustStore, keys: tuple[Path, Path]) -> None:
    """min_match = 0.75 accepts one bad frame of four."""
    path = signed / "selftest.npz"
    with np.load(path) as data:
        arrays = {k: data[k].copy() for k in data.files}
    arrays["onnx.out0"][0] += 0.5
    np.savez(path, **arrays)
    manifest = parse_manifest((signed / MANIFEST_NAME).read_bytes())
    assert manifest.selftest is not None
    resign(signed, keys[0], selftest=manifest.selftest.model_copy(update={"min_match": 0.75}))
    model = load_model(open_bundle(signed, trust=trust), "onnx")
    try:
        report = run_selftest(model)
    finally:
        model.close()
    assert report.passed and report.matched == 3


def test_create_bundle_small_latency_budget_is_kept(
    tmp_path: Path, cnn_onnx: Path, golden_images: np.ndarray
) -> None:
    """An explicit budget below 0.05 ms must be recorded, not rounded to an invalid 0."""
    root = create_bundle(
        tmp_path / "b",
        models=[cnn_onnx],
        name="fast",
        version="1.0.0",
        task="classification",
        preprocess=ImagePreprocess(),
        decoder=ClassificationSpec(),
        golden_frames=golden_images[:1],
        latency_budget_ms=0.04,
    )
    manifest = parse_manifest((root / MANIFEST_NAME).read_bytes())
    assert manifest.selftest is not None
    assert 0 < manifest.selftest.latency_budget_ms <= 0.04


def test_open_bundle_packed_failure_leaves_no_temporary_folder(
    signed: Path, trust: TrustStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``unpack_dir`` a failed open must not leave an empty temporary folder behind."""
    members = regular_members(signed)
    members.insert(3, reg("../escape", b"x"))
    archive = write_tar(tmp_path / "a.edgebundle", members)
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_root))
    with pytest.raises(UnsafeArchiveError):
        open_bundle(archive, trust=trust)
    assert list(tmp_root.iterdir()) == []
