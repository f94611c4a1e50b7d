"""Tests for edge_runtime.sync.transfer: chunked, resumable bundle downloads.

Everything is real: random files on disk, the real ``.part`` file and journal, and a real
child process killed with SIGKILL while it adds chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.errors import TransferError
from edge_runtime.sync.transfer import (
    DEFAULT_CHUNK_SIZE,
    MAX_BUNDLE_SIZE,
    BundleMeta,
    ChunkAssembler,
    cleanup_workdir,
    describe_bundle,
    iter_chunks,
    parse_meta,
)

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
HEADER = 40  # journal header: magic + meta digest
RECORD = 8  # journal record: index + crc32


def random_file(path: Path, size: int, seed: int = 0) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return random_file(tmp_path / "bundle.edgebundle", 3_000_000 + 123)


@pytest.fixture
def meta(src: Path) -> BundleMeta:
    return describe_bundle(src, chunk_size=64 << 10)


def chunks_of(src: Path, meta: BundleMeta) -> dict[int, bytes]:
    return dict(iter_chunks(src, meta))


def on_disk_chunk(asm: ChunkAssembler, index: int) -> bytes:
    meta = asm.meta
    with asm.part_path.open("rb") as fh:
        fh.seek(index * meta.chunk_size)
        return fh.read(meta.chunk_length(index))


def test_round_trip_in_random_order_with_duplicates(tmp_path: Path, src: Path, meta: BundleMeta) -> None:
    assert meta.n_chunks == 46
    assert meta.chunk_length(45) == src.stat().st_size - 45 * (64 << 10)
    chunks = chunks_of(src, meta)
    rng = random.Random(7)
    order = list(chunks) + rng.sample(list(chunks), 20)
    rng.shuffle(order)
    work = tmp_path / "work"
    seen: set[int] = set()
    last_progress = 0.0
    with ChunkAssembler(work, meta) as asm:
        assert asm.part_path.stat().st_size == meta.size
        assert asm.missing() == list(range(46))
        for index in order:
            added = asm.add(index, chunks[index])
            assert added == (index not in seen)
            seen.add(index)
            assert asm.progress >= last_progress
            last_progress = asm.progress
            assert asm.missing() == sorted(set(range(46)) - seen)
        assert asm.complete
        assert asm.received_bytes == meta.size
        assert asm.progress == 1.0
        dest = asm.finish(tmp_path / "out" / "model.edgebundle")
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in work.iterdir()) == []


def test_meta_bytes_are_canonical_and_parse_back(meta: BundleMeta) -> None:
    raw = meta.meta_bytes()
    assert b" " not in raw
    assert list(json.loads(raw)) == sorted(json.loads(raw))
    assert meta.meta_digest() == hashlib.sha256(raw).hexdigest()
    assert parse_meta(raw, meta.meta_digest()) == meta
    pretty = json.dumps(json.loads(raw), indent=2).encode()
    # the signed digest may be of the canonical bytes or of the exact bytes sent
    assert parse_meta(pretty, meta.meta_digest()) == meta
    assert parse_meta(pretty, hashlib.sha256(pretty).hexdigest()) == meta


def test_meta_digest_mismatch_is_refused(meta: BundleMeta) -> None:
    doc = json.loads(meta.meta_bytes())
    doc["chunk_sha256"][3] = "0" * 64  # an attacker swaps one chunk hash
    forged = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert parse_meta(forged, None).chunk_sha256[3] == "0" * 64  # well-formed, only unsigned
    with pytest.raises(TransferError, match="does not match meta_sha256"):
        parse_meta(forged, meta.meta_digest())
    with pytest.raises(TransferError, match="64 lowercase hex"):
        parse_meta(meta.meta_bytes(), meta.meta_digest().upper())


def _meta_doc(**changes: Any) -> bytes:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "sha256": "a" * 64,
        "size": 10_000,
        "chunk_size": 4096,
        "chunk_sha256": ["b" * 64] * 3,
    }
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\xfa", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (_meta_doc(schema_version=2), "meta.schema_version"),
        (_meta_doc(size="10000"), "meta.size"),
        (_meta_doc(size=0), "meta.size"),
        (_meta_doc(size=MAX_BUNDLE_SIZE + 1), "meta.size"),
        (_meta_doc(size=True), "meta.size"),
        (_meta_doc(chunk_size=5000), "power of two"),
        (_meta_doc(chunk_size=1024), "power of two"),
        (_meta_doc(chunk_sha256=["b" * 64] * 2), "chunk_sha256 has 2 entries"),
        (_meta_doc(chunk_sha256=["B" * 64] * 3), "meta.chunk_sha256.0"),
        (_meta_doc(sha256="a" * 63), "meta.sha256"),
        (_meta_doc(sha256=...), "meta.sha256: required field is missing"),
        (_meta_doc(extra=1), "meta.extra: unknown field"),
        (b"[" * 100_000, "not valid JSON"),
    ],
)
def test_parse_meta_names_the_bad_field(raw: bytes, match: str) -> None:
    with pytest.raises(TransferError, match=match):
        parse_meta(raw, None)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=14), inner, max_size=5),
    max_leaves=12,
)
_hex = st.text("0123456789abcdef", min_size=64, max_size=64)
_metaish = st.fixed_dictionaries(
    {},
    optional={
        "schema_version": st.sampled_from([1, 2, 1.0, True, "1"]) | _json,
        "sha256": _hex | _json,
        "size": st.integers(-5, 2**32) | _json,
        "chunk_size": st.sampled_from([4096, 8192, 1 << 22, 1 << 23, 3, 0]) | _json,
        "chunk_sha256": st.lists(_hex, max_size=4) | _json,
        "extra": _json,
    },
)

_VALID = json.loads(_meta_doc())
_mutated = st.tuples(st.sampled_from([*_VALID, "extra"]), _json | st.integers() | _hex).map(
    lambda kv: json.dumps({**_VALID, kv[0]: kv[1]}).encode()
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.binary(max_size=300)
    | _json.map(lambda v: json.dumps(v).encode())
    | _metaish.map(lambda v: json.dumps(v).encode())
    | _mutated
    | _mutated.map(lambda raw: raw[: len(raw) // 2]),
    digest=st.none() | _hex | st.text(max_size=70),
)
def test_parse_meta_fuzz_only_transfer_errors(raw: bytes, digest: str | None) -> None:
    try:
        meta = parse_meta(raw, digest)
    except TransferError as exc:
        assert str(exc)
    else:
        assert parse_meta(meta.meta_bytes(), meta.meta_digest()) == meta


def test_bad_chunks_are_rejected_and_not_written(tmp_path: Path, src: Path, meta: BundleMeta) -> None:
    chunks = chunks_of(src, meta)
    with ChunkAssembler(tmp_path / "work", meta, sync_bytes=0) as asm:
        evil = bytearray(chunks[5])
        evil[100] ^= 0xFF
        with pytest.raises(TransferError, match=r"chunk 5 .*does not match its sha256"):
            asm.add(5, bytes(evil))
        with pytest.raises(TransferError, match=r"chunk 5 .*is 100 bytes, expected 65536"):
            asm.add(5, chunks[5][:100])
        with pytest.raises(TransferError, match=r"chunk 45 .*is 51004 bytes, expected 51003"):
            asm.add(45, chunks[45] + b"x")
        for index in (-1, 46, 10**9):
            with pytest.raises(TransferError, match="out of range"):
                asm.add(index, chunks[0])
        assert on_disk_chunk(asm, 5) == bytes(65536)  # nothing was written
        assert 5 in asm.missing()
        assert asm.received_bytes == 0
        assert asm.progress_path.stat().st_size == HEADER
        with pytest.raises(TransferError, match="46 of 46 chunks are missing"):
            asm.finish(tmp_path / "out.edgebundle")
        assert asm.add(5, chunks[5]) is True
        assert on_disk_chunk(asm, 5) == chunks[5]
        assert asm.progress_path.stat().st_size == HEADER + RECORD


_CHILD = """
import random, sys, time
from pathlib import Path
from edge_runtime.sync.transfer import ChunkAssembler, iter_chunks, parse_meta

src, work, meta_file, sync_bytes = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
meta = parse_meta(meta_file.read_bytes())
chunks = list(iter_chunks(src, meta))
random.Random(int(sys.argv[5])).shuffle(chunks)
asm = ChunkAssembler(work, meta, sync_bytes=sync_bytes)
print("ready", flush=True)
for index, data in chunks:
    asm.add(index, data)
    print(index, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("sync_bytes", [0, 32 << 10])
def test_resume_after_kill_9(tmp_path: Path, sync_bytes: int) -> None:
    """A child adding chunks is killed with SIGKILL; every chunk the journal claims verifies."""
    src = random_file(tmp_path / "b.edgebundle", 2_000_000 + 7, seed=3)
    meta = describe_bundle(src, chunk_size=4096)
    meta_file = tmp_path / "meta.json"
    meta_file.write_bytes(meta.meta_bytes())
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    work = tmp_path / "work"
    rng = random.Random(sync_bytes)
    total_acked = 0
    for trial in range(2):
        with subprocess.Popen(
            [sys.executable, str(script), str(src), str(work), str(meta_file), str(sync_bytes), str(trial)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
            acked: set[int] = set()
            want = rng.randint(50, 150)
            while len(acked) < want:
                line = proc.stdout.readline()
                assert line, "child died early"
                acked.add(int(line))
            time.sleep(rng.uniform(0, 0.003))  # land inside an add()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL
            total_acked += len(acked)
        asm = ChunkAssembler(work, meta, sync_bytes=sync_bytes)
        try:
            report = asm.resume
            assert report.restarted is None
            assert report.dropped == ()
            assert report.verified == report.claimed
            have = set(range(meta.n_chunks)) - set(asm.missing())
            assert len(have) == report.claimed
            # every acknowledged chunk is journaled, except (batched) the last unsynced batch
            unsynced = sync_bytes // meta.chunk_size
            assert len(acked - have) <= unsynced
            for index in have:
                assert hashlib.sha256(on_disk_chunk(asm, index)).hexdigest() == meta.chunk_sha256[index]
        finally:
            asm.close()
    assert total_acked >= 100
    with ChunkAssembler(work, meta) as asm:
        chunks = chunks_of(src, meta)
        for index in asm.missing():
            asm.add(index, chunks[index])
        dest = asm.finish(tmp_path / "done.edgebundle")
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == meta.sha256


def test_torn_journal_tail_is_ignored(tmp_path: Path, src: Path, meta: BundleMeta) -> None:
    chunks = chunks_of(src, meta)
    work = tmp_path / "work"
    with ChunkAssembler(work, meta, sync_bytes=0) as asm:
        for index in (3, 1, 4):
            asm.add(index, chunks[index])
        journal = asm.progress_path
    with journal.open("ab") as fh:
        fh.write(b"\x09\x00\x00")  # a record torn by a crash mid-append
    with ChunkAssembler(work, meta) as asm:
        assert asm.resume.torn_tail
        assert asm.resume.verified == 3
        assert sorted(set(range(46)) - set(asm.missing())) == [1, 3, 4]
    assert journal.stat().st_size == HEADER + 3 * RECORD  # rewritten without the torn bytes
    with journal.open("ab") as fh:
        fh.write(bytes(RECORD))  # zeros, as a filesystem may leave after power loss
        fh.write(journal.read_bytes()[HEADER : HEADER + RECORD])  # a valid record after it
    with ChunkAssembler(work, meta) as asm:
        assert asm.resume.torn_tail
        assert sorted(set(range(46)) - set(asm.missing())) == [1, 3, 4]
        asm.add(9, chunks[9])
    with ChunkAssembler(work, meta) as asm:
        assert not asm.resume.torn_tail
        assert sorted(set(range(46)) - set(asm.missing())) == [1, 3, 4, 9]


def test_corrupted_part_chunk_is_fetched_again(tmp_path: Path, src: Path, meta: BundleMeta) -> None:
    chunks = chunks_of(src, meta)
    work = tmp_path / "work"
    with ChunkAssembler(work, meta) as asm:
        for index in range(0, 46, 2):
            asm.add(index, chunks[index])
        part = asm.part_path
    with part.open("r+b") as fh:  # bit rot inside claimed chunk 10
        fh.seek(10 * meta.chunk_size + 1234)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x55]))
    with ChunkAssembler(work, meta) as asm:
        assert asm.resume.dropped == (10,)
        assert asm.resume.claimed == 23
        assert asm.missing() == sorted([10, *range(1, 46, 2)])
        for index in asm.missing():
            assert asm.add(index, chunks[index]) is True
        dest = asm.finish(tmp_path / "out.edgebundle")
    assert dest.read_bytes() == src.read_bytes()


def test_unusable_partial_download_starts_over(tmp_path: Path, src: Path, meta: BundleMeta) -> None:
    chunks = chunks_of(src, meta)
    work = tmp_path / "work"

    def partial() -> ChunkAssembler:
        with ChunkAssembler(work, meta) as asm:
            asm.add(0, chunks[0])
        return asm

    asm = partial()
    with asm.part_path.open("r+b") as fh:
        fh.truncate(meta.size - 1)
    with ChunkAssembler(work, meta) as again:
        assert again.resume.restarted is not None
        assert "bytes, expected" in again.resume.restarted
        assert again.missing() == list(range(46))
        assert again.part_path.stat().st_size == meta.size
    partial()
    other = describe_bundle(src, chunk_size=128 << 10)  # same bundle, published with other chunking
    assert other.sha256 == meta.sha256
    with ChunkAssembler(work, other) as again:
        assert again.resume.restarted is not None
        assert "different meta" in again.resume.restarted
        assert again.missing() == list(range(other.n_chunks))
    partial().progress_path.unlink()
    with ChunkAssembler(work, meta) as again:
        assert again.resume.restarted is not None
        assert ".progress is missing" in again.resume.restarted
        assert again.missing() == list(range(46))


def test_finish_with_wrong_whole_file_hash_deletes_the_download(
    tmp_path: Path, src: Path, meta: BundleMeta
) -> None:
    # chunk hashes right, whole-file hash wrong: only finish() can notice
    lying = BundleMeta.model_validate({**meta.model_dump(), "sha256": "e" * 64})
    chunks = chunks_of(src, meta)
    work = tmp_path / "work"
    asm = ChunkAssembler(work, lying)
    for index, data in chunks.items():
        asm.add(index, data)
    dest = tmp_path / "out.edgebundle"
    with pytest.raises(TransferError, match="but the meta promises"):
        asm.finish(dest)
    assert not dest.exists()
    assert list(work.iterdir()) == []
    with pytest.raises(TransferError, match="closed"):
        asm.add(0, chunks[0])
    with ChunkAssembler(work, lying) as fresh:
        assert fresh.resume.claimed == 0
        assert fresh.missing() == list(range(46))


def test_describe_and_iter_chunks_stream_the_file(tmp_path: Path, src: Path) -> None:
    meta = describe_bundle(src)
    assert meta.chunk_size == DEFAULT_CHUNK_SIZE
    assert meta.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    parts = list(iter_chunks(src, meta))
    assert [i for i, _ in parts] == list(range(meta.n_chunks))
    assert b"".join(d for _, d in parts) == src.read_bytes()
    assert all(len(d) == meta.chunk_size for _, d in parts[:-1])
    for bad in (1000, 3 << 12, 8 << 20):
        with pytest.raises(TransferError, match="power of two"):
            describe_bundle(src, chunk_size=bad)
    with pytest.raises(TransferError, match="empty"):
        describe_bundle(random_file(tmp_path / "empty", 0))
    with pytest.raises(TransferError, match="cannot read"):
        describe_bundle(tmp_path / "nope")
    with src.open("r+b") as fh:  # changed after it was described
        fh.seek(meta.chunk_size + 5)
        fh.write(b"!")
    chunks = iter_chunks(src, meta)
    assert next(chunks)[0] == 0
    with pytest.raises(TransferError, match=r"chunk 1 .*changed"):
        next(chunks)
    with src.open("ab") as fh:
        fh.write(b"more")
    with pytest.raises(TransferError, match="the file changed"):
        next(iter_chunks(src, meta))


def test_cleanup_workdir_removes_only_other_partial_downloads(tmp_path: Path, src: Path) -> None:
    work = tmp_path / "work"
    keep_meta = describe_bundle(src, chunk_size=64 << 10)
    other_meta = describe_bundle(random_file(tmp_path / "other", 5000, seed=9), chunk_size=4096)
    ChunkAssembler(work, keep_meta).close()
    ChunkAssembler(work, other_meta).close()
    (work / "notes.txt").write_text("not ours")
    removed = cleanup_workdir(work, keep={keep_meta.sha256})
    assert sorted(p.name for p in removed) == [f"{other_meta.sha256}.part", f"{other_meta.sha256}.progress"]
    assert sorted(p.name for p in work.iterdir()) == sorted(
        [f"{keep_meta.sha256}.part", f"{keep_meta.sha256}.progress", "notes.txt"]
    )
    assert cleanup_workdir(tmp_path / "absent", keep=()) == []


def test_not_enough_disk_space_says_how_much_and_where(
    tmp_path: Path, meta: BundleMeta, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: real._replace(free=meta.size - 1))
    work = tmp_path / "work"
    with pytest.raises(TransferError, match=f"{meta.size} more bytes are needed in {work}"):
        ChunkAssembler(work, meta)
    assert list(work.iterdir()) == []


def test_20_mb_in_256_kib_chunks_with_per_chunk_fsync(tmp_path: Path) -> None:
    src = random_file(tmp_path / "big.edgebundle", 20_000_000, seed=11)
    meta = describe_bundle(src)
    with ChunkAssembler(tmp_path / "work", meta, sync_bytes=0) as asm:
        for index, data in iter_chunks(src, meta):
            asm.add(index, data)
        assert asm.progress_path.stat().st_size == HEADER + RECORD * meta.n_chunks
        dest = asm.finish(tmp_path / "big.out")
    assert dest.stat().st_size == 20_000_000
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == meta.sha256
