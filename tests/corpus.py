"""A corpus of malicious and broken bundle deliveries for a RUNNING device (tests/test_corpus.py).

:func:`build_corpus` returns named :class:`Case` objects. Each case is what an attacker (or a
broken publisher) can put on the broker: the retained MQTT messages of one delivery - chunks,
chunk table (``meta``) and the signed desired document - in publish order, plus the words the
device's ``update`` event must name when it refuses it. Every bundle is a real packed bundle
derived from the shipped demo bundle (``models/demo/shapes``) and signed with the given key,
then broken in one way: the device must refuse each one for THAT reason, not for an earlier
accidental one (e.g. a path-traversal case is correctly signed, so only the member check can
refuse it).

Cases, by layer (``Case.layer``):

* archive: truncated, bit-flipped payload, manifest/payload mismatches (size, extra, missing,
  duplicate member, wrong order), path traversal, absolute path, symlink, hardlink, character
  device, fifo, a gzip decompression bomb;
* signature: unsigned, malformed, forged (trusted key id, wrong bytes), untrusted key, manifest
  edited after signing;
* runtime: ``min_runtime_version`` above this runtime, manifest schema 2, a model compiled for an
  accelerator that is not here (an ONNX ``EPContext`` node of TensorRT), a ``.tflite`` that
  crashes LiteRT with SIGSEGV on load (found by mutation fuzzing, see :data:`CRASH_PATCH`);
* document: downgrade without a rollback flag, a replayed older document (the byte-exact
  envelope of the first case), a document for another target, an oversize bundle size, an
  oversize envelope;
* transfer: a chunk table that does not match the signed document, an oversize chunk table,
  and - last, the good update - a correctly signed bundle whose chunk 1 is tampered on the
  broker: refused by its hash, then fetched again once the operator re-uploads it, and
  committed.

``python -m bench.corpus`` writes the corpus to disk and prints the table.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnx import TensorProto, helper

from edge_runtime.bundle import (
    FileEntry,
    load_private_key,
    pack_bundle,
    parse_manifest,
    sha256_file,
    sign_bundle,
    write_manifest,
)
from edge_runtime.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME
from edge_runtime.bundle.signing import sign_bytes
from edge_runtime.sync.protocol import Rollout, utc_iso
from edge_runtime.sync.transfer import BundleMeta, describe_bundle, iter_chunks

__all__ = [
    "CRASH_PATCH",
    "DEMO_BUNDLE",
    "FAST",
    "SERVING_VERSION",
    "Case",
    "build_corpus",
    "crashing_tflite",
    "gzip_bomb",
    "sign_document",
]

DEMO_BUNDLE = Path(__file__).resolve().parent.parent / "models" / "demo" / "shapes"
SERVING_VERSION = "1.0.0"  # the demo bundle the device boots with
FAST = Rollout(probation_s=1.5, probation_min_frames=30)
CHUNK_SIZE = 256 << 10

#: byte offset -> value turning the demo ``model.tflite`` into a model that kills LiteRT 2.3 with
#: SIGSEGV inside ``Interpreter(model_content=...)``: offset 16 is in the root table's vtable, and
#: zeroing it leaves the model without a table the loader dereferences unchecked. Found by the
#: fork-per-input mutation fuzzer described in tests/test_corpus.py (1 of ~150 random mutants).
CRASH_PATCH: dict[int, int] = {16: 0x00}

Message = tuple[str, bytes]  # (topic below edgert/{fleet}/, payload), published retained


@dataclass
class Case:
    """One delivery to the device and how it must be refused."""

    name: str
    layer: str
    attack: str
    reason: tuple[str, ...]
    """words that must all appear in the reason of the device's update event"""
    messages: list[Message] = field(default_factory=list)
    """retained messages, in publish order (chunks, meta, document)"""
    phase: str = "rejected"
    version: str | None = None
    """bundle version the document names (None when no valid document is sent)"""
    repair: list[Message] = field(default_factory=list)
    """messages published once the device logged ``log_words`` (the tampered-chunk case)"""
    log_words: str = ""

    @property
    def bytes_published(self) -> int:
        return sum(len(p) for _, p in self.messages) + sum(len(p) for _, p in self.repair)


# -- documents --------------------------------------------------------------------------------------


def sign_document(body: dict[str, Any], key_path: Path) -> bytes:
    """The envelope of ``body`` (any JSON, also an invalid document) as ``seal`` makes it."""
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    sig = json.loads(sign_bytes(raw, load_private_key(key_path)))
    envelope = {"doc": base64.b64encode(raw).decode(), **sig}
    return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()


def _document(
    fleet: str,
    target: str,
    sequence: int,
    name: str,
    version: str,
    meta: BundleMeta,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    now = time.time()
    body: dict[str, Any] = {
        "schema_version": 1,
        "kind": "desired",
        "fleet": fleet,
        "target": target,
        "sequence": sequence,
        "issued_at": utc_iso(now - 60),
        "expires_at": utc_iso(now + 86400),
        "bundle": {
            "name": name,
            "version": version,
            "sha256": meta.sha256,
            "size": meta.size,
            "meta_sha256": meta.meta_digest(),
        },
        "rollout": FAST.model_dump(mode="json"),
        "rollback": False,
    }
    for k, v in (overrides or {}).items():
        body[k] = {**body[k], **v} if isinstance(v, dict) else v
    return body


# -- bundles ----------------------------------------------------------------------------------------


def crashing_tflite(src: Path | None = None) -> bytes:
    """The demo ``model.tflite`` with :data:`CRASH_PATCH` applied (same size, still 'TFL3')."""
    data = bytearray((src or DEMO_BUNDLE / "model.tflite").read_bytes())
    for offset, value in CRASH_PATCH.items():
        data[offset] = value
    return bytes(data)


def accelerator_only_onnx() -> bytes:
    """An ONNX model whose only node is a TensorRT ``EPContext`` (an engine compiled for a GPU):
    the model format is right, but it runs only where that execution provider is present."""
    demo = parse_manifest((DEMO_BUNDLE / MANIFEST_NAME).read_bytes()).model("onnx")
    assert demo is not None
    node = helper.make_node(
        "EPContext",
        [demo.inputs[0].name],
        [demo.outputs[0].name],
        domain="com.microsoft",
        name="trt_engine",
        embed_mode=1,
        main_context=1,
        ep_cache_context=b"TRT-ENGINE\x00" + bytes(64),
        source="TensorrtExecutionProvider",
    )
    graph = helper.make_graph(
        [node],
        "compiled_for_tensorrt",
        [helper.make_tensor_value_info(demo.inputs[0].name, TensorProto.FLOAT, demo.inputs[0].shape)],
        [helper.make_tensor_value_info(demo.outputs[0].name, TensorProto.FLOAT, demo.outputs[0].shape)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    return bytes(model.SerializeToString())


class _Factory:
    """Signed variants of the demo bundle, packed and broken in one way each."""

    def __init__(self, work: Path, key: Path) -> None:
        self.work = work
        self.key = key
        self._n = 0

    def variant(
        self,
        version: str,
        *,
        keep: str = "onnx",
        replace: dict[str, bytes] | None = None,
        sign: Path | bool = True,
        **updates: Any,
    ) -> Path:
        """A copy of the demo bundle with only the ``keep`` model, files replaced, manifest updated
        and (re)signed with ``sign`` (True: the trusted key; a path: that key; False: unsigned)."""
        self._n += 1
        root = self.work / f"v{self._n}-{version}"
        shutil.copytree(DEMO_BUNDLE, root)
        manifest = parse_manifest((root / MANIFEST_NAME).read_bytes())
        for entry in manifest.models:
            if entry.format != keep:
                (root / entry.path).unlink()
        for name, data in (replace or {}).items():
            (root / name).write_bytes(data)
        models = [m for m in manifest.models if m.format == keep]
        names = set(manifest.files) - {m.path for m in manifest.models if m.format != keep}
        files = {
            n: FileEntry(sha256=sha256_file(root / n), size=(root / n).stat().st_size) for n in sorted(names)
        }
        fields = {"version": version, "models": models, "files": files, **updates}
        write_manifest(root, manifest.model_copy(update=fields))
        if sign is True:
            sign_bundle(root, self.key)
        elif isinstance(sign, Path):
            sign_bundle(root, sign)
        return root

    def pack_members(self, root: Path) -> bytes:
        """``root`` packed member by member as ``pack_bundle`` orders it, without its checks."""
        return _tar(self.members(root))

    def pack(self, root: Path) -> bytes:
        out = self.work / f"{root.name}.edgebundle"
        pack_bundle(root, out)
        return out.read_bytes()

    def members(self, root: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
        """The members ``pack_bundle`` writes, in its order: manifest, sig, payload files."""
        raw = (root / MANIFEST_NAME).read_bytes()
        out = [_reg(MANIFEST_NAME, raw)]
        if (root / SIGNATURE_NAME).exists():
            out.append(_reg(SIGNATURE_NAME, (root / SIGNATURE_NAME).read_bytes()))
        out += [_reg(n, (root / n).read_bytes()) for n in json.loads(raw)["files"]]
        return out


def _reg(name: str, data: bytes, size: int | None = None) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data) if size is None else size
    info.mode = 0o644
    info.mtime = 1_700_000_000
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    info.devmajor, info.devminor = (1, 3) if kind == tarfile.CHRTYPE else (0, 0)  # /dev/null
    return info, None


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw


def gzip_bomb(manifest: bytes, inflated: int) -> bytes:
    """A gzip'd tar whose first member, manifest.json, inflates to ``inflated`` bytes of zeros
    (about 1000:1): it starts with the real manifest so it looks like a bundle until its size."""
    header = tarfile.TarInfo(MANIFEST_NAME)
    header.size = inflated
    header.mode = 0o644
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(header.tobuf(format=tarfile.PAX_FORMAT))
        gz.write(manifest)
        zeros = bytes(1 << 20)
        left = inflated - len(manifest)
        while left > 0:
            gz.write(zeros[: min(left, len(zeros))])
            left -= len(zeros)
        pad = -inflated % tarfile.BLOCKSIZE
        gz.write(bytes(pad + 2 * tarfile.BLOCKSIZE))
    return out.getvalue()


def _flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    buf = bytearray(data)
    buf[offset] ^= mask
    return bytes(buf)


# -- the corpus -------------------------------------------------------------------------------------


def build_corpus(
    work: Path,
    key: Path,
    rogue_key: Path,
    *,
    fleet: str = "test",
    group: str = "cams",
    first_sequence: int | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> list[Case]:
    """Every case, in the order to publish them to ONE device that serves the demo bundle 1.0.0.

    ``key`` is trusted by the device, ``rogue_key`` is not. Documents are signed with ``key``
    and target ``group:{group}``; sequences grow from ``first_sequence`` (default: now in ms).
    """
    work.mkdir(parents=True, exist_ok=True)
    f = _Factory(work, key)
    seq = [first_sequence if first_sequence is not None else int(time.time() * 1000)]
    doc_topic = f"group/{group}/desired"
    cases: list[Case] = []

    def next_seq() -> int:
        seq[0] += 1
        return seq[0]

    def upload(packed: bytes) -> tuple[list[Message], BundleMeta]:
        path = Path(tempfile.mkstemp(dir=work, suffix=".edgebundle")[1])
        path.write_bytes(packed)
        meta = describe_bundle(path, chunk_size)
        msgs: list[Message] = [
            (f"bundle/{meta.sha256}/chunk/{i}", data) for i, data in iter_chunks(path, meta)
        ]
        msgs.append((f"bundle/{meta.sha256}/meta", meta.meta_bytes()))
        path.unlink()
        return msgs, meta

    def bundle_case(
        name: str,
        layer: str,
        attack: str,
        reason: tuple[str, ...],
        packed: bytes,
        version: str,
        *,
        meta_override: Callable[[BundleMeta], bytes] | None = None,
        phase: str = "rejected",
        **doc: Any,
    ) -> Case:
        msgs, meta = upload(packed)
        if meta_override is not None:  # the chunks never travel: the chunk table is refused first
            msgs = [(f"bundle/{meta.sha256}/meta", meta_override(meta))]
        body = _document(fleet, f"group:{group}", next_seq(), "shapes", version, meta, doc)
        msgs.append((doc_topic, sign_document(body, key)))
        case = Case(name, layer, attack, reason, msgs, phase=phase, version=version)
        cases.append(case)
        return case

    good = f.variant("2.0.0")
    good_members = f.members(good)
    manifest_raw = (good / MANIFEST_NAME).read_bytes()
    sig_raw = (good / SIGNATURE_NAME).read_bytes()
    packed_good = f.pack(good)

    # ---- archive -------------------------------------------------------------------------------
    first = bundle_case(
        "truncated",
        "archive",
        "the packed bundle cut off in the middle of the model (a partial upload)",
        ("truncated",),
        packed_good[: len(packed_good) * 3 // 5],
        "2.0.0",
    )
    onnx_member = next(i for i, (info, _) in enumerate(good_members) if info.name == "model.onnx")
    members = list(good_members)
    info, data = members[onnx_member]
    assert data is not None
    members[onnx_member] = (info, _flip(data, len(data) // 2, 0x10))
    bundle_case(
        "bit-flipped-payload",
        "archive",
        "one bit of model.onnx flipped after signing (manifest and signature intact)",
        ("model.onnx sha256", "altered or corrupted"),
        _tar(members),
        "2.0.0",
    )
    lying = f.variant("2.0.0", description="size lie")
    lying_manifest = parse_manifest((lying / MANIFEST_NAME).read_bytes())
    entry = lying_manifest.files["model.onnx"]
    files = {**lying_manifest.files, "model.onnx": FileEntry(sha256=entry.sha256, size=entry.size + 512)}
    write_manifest(lying, lying_manifest.model_copy(update={"files": files}))
    sign_bundle(lying, key)
    bundle_case(
        "manifest-payload-size-mismatch",
        "archive",
        "signed manifest lists model.onnx 512 bytes longer than the archive member",
        ("model.onnx is", "bytes in the archive but", "in the manifest"),
        f.pack_members(lying),
        "2.0.0",
    )
    bundle_case(
        "extra-member",
        "archive",
        "a member the signed manifest does not list (payload smuggling)",
        ("'evil.so'", "not listed in the manifest"),
        _tar([*good_members[:2], _reg("evil.so", b"\x7fELF" + bytes(60)), *good_members[2:]]),
        "2.0.0",
    )
    bundle_case(
        "missing-member",
        "archive",
        "selftest.npz left out of the archive",
        ("missing files listed in the manifest", "selftest.npz"),
        _tar([m for m in good_members if m[0].name != "selftest.npz"]),
        "2.0.0",
    )
    labels = next(m for m in good_members if m[0].name == "labels.txt")
    bundle_case(
        "duplicate-member",
        "archive",
        "labels.txt twice: the second copy would silently win in a naive extractor",
        ("'labels.txt' appears twice",),
        _tar([*good_members, labels]),
        "2.0.0",
    )
    bundle_case(
        "manifest-not-first",
        "archive",
        "payload before manifest.json: bytes would be used before the signature was checked",
        ("must start with manifest.json",),
        _tar([good_members[-1], *good_members[:-1]]),
        "2.0.0",
    )
    for name, member, words in (
        ("path-traversal", _reg("../../../etc/cron.d/edgert", b"* * * * * root sh\n"), "outside the bundle"),
        ("absolute-path", _reg("/etc/cron.d/edgert", b"* * * * * root sh\n"), "outside the bundle"),
        ("symlink", _special("labels.txt", tarfile.SYMTYPE, "/etc/shadow"), "is a link"),
        ("hardlink", _special("labels.txt", tarfile.LNKTYPE, "/etc/shadow"), "is a link"),
        ("device-file", _special("labels.txt", tarfile.CHRTYPE), "not a regular file"),
        ("fifo", _special("labels.txt", tarfile.FIFOTYPE), "not a regular file"),
    ):
        rest = [m for m in good_members[2:] if m[0].name != member[0].name]
        bundle_case(
            name,
            "archive",
            f"a {name.replace('-', ' ')} member ({member[0].name!r}"
            + (f" -> {member[0].linkname}" if member[0].linkname else "")
            + ") in a correctly signed bundle",
            (words,),
            _tar([*good_members[:2], member, *rest]),
            "2.0.0",
        )
    bundle_case(
        "decompression-bomb",
        "archive",
        "gzip'd tar (the reader takes any compression) whose manifest.json inflates to 256 MiB",
        ("manifest.json is 268435456 bytes", "the limit is 1048576"),
        gzip_bomb(manifest_raw, 256 << 20),
        "2.0.0",
    )

    # ---- signature -----------------------------------------------------------------------------
    bundle_case(
        "unsigned",
        "signature",
        "no manifest.sig",
        ("is not signed",),
        f.pack(f.variant("2.0.0", description="unsigned", sign=False)),
        "2.0.0",
    )
    bundle_case(
        "malformed-signature",
        "signature",
        "manifest.sig is not a signature document",
        ("manifest.sig is malformed",),
        _tar([good_members[0], _reg(SIGNATURE_NAME, b"{not json"), *good_members[2:]]),
        "2.0.0",
    )
    forged = json.loads(sig_raw)
    forged["sig"] = base64.b64encode(bytes(64)).decode()
    bundle_case(
        "forged-signature",
        "signature",
        "the trusted key's id with 64 made-up signature bytes",
        ("signature by key", "the signature is forged"),
        _tar([good_members[0], _reg(SIGNATURE_NAME, json.dumps(forged).encode()), *good_members[2:]]),
        "2.0.0",
    )
    bundle_case(
        "untrusted-key",
        "signature",
        "signed by a key the device does not trust",
        ("which is not trusted",),
        f.pack(f.variant("2.0.0", description="rogue", sign=rogue_key)),
        "2.0.0",
    )
    edited = json.loads(manifest_raw)
    edited["description"] = "edited after signing"
    edited_raw = json.dumps(edited, sort_keys=True, separators=(",", ":")).encode()
    bundle_case(
        "manifest-edited-after-signing",
        "signature",
        "manifest.json changed after it was signed (signature of the original kept)",
        ("does not match the manifest", "modified after signing"),
        _tar([_reg(MANIFEST_NAME, edited_raw), *good_members[1:]]),
        "2.0.0",
    )

    # ---- runtime -------------------------------------------------------------------------------
    bundle_case(
        "needs-newer-runtime",
        "runtime",
        "min_runtime_version 99.0.0 (this runtime is older)",
        ("needs edge-runtime >= 99.0.0", "upgrade edge-runtime"),
        f.pack(f.variant("2.0.0", min_runtime_version="99.0.0")),
        "2.0.0",
    )
    v2 = json.loads(manifest_raw)
    v2["schema_version"] = 2
    v2_raw = json.dumps(v2, sort_keys=True, separators=(",", ":")).encode()
    v2_sig = sign_bytes(v2_raw, load_private_key(key))
    bundle_case(
        "manifest-schema-2",
        "runtime",
        "a signed manifest of a future schema version",
        ("schema_version 2 is not supported by this runtime",),
        _tar([_reg(MANIFEST_NAME, v2_raw), _reg(SIGNATURE_NAME, v2_sig), *good_members[2:]]),
        "2.0.0",
    )
    bundle_case(
        "accelerator-only-model",
        "runtime",
        "the only model is an ONNX EPContext node compiled for TensorRT (no such provider here)",
        ("self-test failed", "EPContext", "TensorrtExecutionProvider"),
        f.pack(f.variant("2.0.0", replace={"model.onnx": accelerator_only_onnx()}, description="trt")),
        "2.0.0",
    )
    bundle_case(
        "crashes-runtime-on-load",
        "runtime",
        "a signed, hash-correct .tflite that kills LiteRT with SIGSEGV while loading",
        ("the runtime crashed (SIGSEGV)", "the bundle is refused"),
        f.pack(f.variant("2.0.0", keep="tflite", replace={"model.tflite": crashing_tflite()})),
        "2.0.0",
    )

    # ---- document ------------------------------------------------------------------------------
    bundle_case(
        "downgrade",
        "document",
        "a correctly signed older bundle (0.9.0) without the signed rollback flag",
        ("downgrade from 1.0.0 to 0.9.0 refused",),
        f.pack(f.variant("0.9.0")),
        "0.9.0",
    )
    replayed = [m for m in first.messages if m[0] == doc_topic]
    cases.append(
        Case(
            "replayed-document",
            "document",
            "the byte-exact envelope of the first case's document, published again",
            ("replayed document", "older than the accepted"),
            replayed,
            version="2.0.0",
        )
    )
    bundle_case(
        "document-for-another-target",
        "document",
        "a valid document for device:dev2 published on this device's group topic",
        ("document for test/device:dev2", "(wants group:cams)"),
        packed_good,
        "2.0.0",
        target="device:dev2",
    )
    huge = 3 * 1024**3
    bundle_case(
        "oversize-bundle-in-document",
        "document",
        "a signed document announcing a 3 GiB bundle (over the 2 GiB limit)",
        ("signed DesiredDocument is invalid", "bundle.size"),
        packed_good,
        "2.0.0",
        bundle={"size": huge},
    )
    _, meta = upload(packed_good)
    body = _document(fleet, f"group:{group}", next_seq(), "shapes", "2.0.0", meta)
    padded = json.loads(sign_document(body, key))
    padded["padding"] = "x" * (70 * 1024)  # the signature still verifies: only "doc" is signed
    cases.append(
        Case(
            "oversize-envelope",
            "document",
            "a 70 KiB signed message (the limit is 64 KiB): refused before it is parsed",
            ("signed message of", "over the 65536 limit"),
            [(doc_topic, json.dumps(padded).encode())],
            version="2.0.0",
        )
    )

    # ---- transfer ------------------------------------------------------------------------------
    def altered_meta(meta: BundleMeta) -> bytes:
        hashes = list(meta.chunk_sha256)
        hashes[0] = "0" * 64
        return meta.model_copy(update={"chunk_sha256": hashes}).meta_bytes()

    bundle_case(
        "chunk-table-mismatch",
        "transfer",
        "a chunk table whose hashes differ from the one the signed document names",
        ("bundle chunk table refused", "does not match meta_sha256"),
        f.pack(f.variant("2.0.0", description="meta")),
        "2.0.0",
        meta_override=altered_meta,
    )
    bundle_case(
        "oversize-chunk-table",
        "transfer",
        "a 9 MiB chunk table (the limit is 8 MiB): refused before it is parsed",
        ("bundle chunk table refused", "the limit is 8388608"),
        f.pack(f.variant("2.0.0", description="big meta")),
        "2.0.0",
        meta_override=lambda _meta: b'{"pad":"' + b"0" * (9 << 20) + b'"}',
    )
    good_update = f.pack(f.variant("2.1.0", description="good update"))
    case = bundle_case(
        "tampered-chunk-then-good-update",
        "transfer",
        "chunk 1 of a good bundle replaced on the broker (same length); re-uploaded later",
        (),
        good_update,
        "2.1.0",
        phase="committed",
    )
    index = next(i for i, (topic, _) in enumerate(case.messages) if topic.endswith("/chunk/1"))
    topic, chunk = case.messages[index]
    case.messages[index] = (topic, _flip(chunk, 100, 0xFF))
    case.repair = [(topic, chunk)]
    case.log_words = "does not match its sha256"
    return cases
