"""Property fuzzing (hypothesis) of every parser that reads bytes from outside the daemon.

Property: a parser returns a valid object or raises ITS documented :class:`EdgeRuntimeError`
subclass (ManifestError, ConfigError, DocumentError, TransferError, SampleParseError) - never
anything else - and oversized inputs are refused before they are processed (tracemalloc peaks).

Inputs are structured, not just random bytes: a real document/manifest/config is mutated at a
random JSON path (value replaced by random JSON, key deleted or added), and envelopes are SIGNED
with the trusted key after mutation, so the fuzzer reaches the document validation behind the
signature check (random bytes never get past it). Example counts are bounded to keep the file
at about 20 s on 2 cores; ``HYPOTHESIS_PROFILE=deep`` multiplies them by 20 for a local soak.

atheris was considered and not used: every target here is pure Python (json, tomllib, pydantic,
tarfile), where hypothesis' structured generation reaches the interesting layers and shrinks
failures, while atheris' coverage guidance pays off on native code. The native runtimes (LiteRT,
ONNX Runtime) are fuzzed by mutation in a fork-per-input child instead: see tests/corpus.py
(CRASH_PATCH) and tests/test_corpus.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DEMO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.bundle import generate_keypair, load_private_key
from edge_runtime.bundle.manifest import MAX_MANIFEST_BYTES, Manifest, canonical_bytes, parse_manifest
from edge_runtime.bundle.signing import TrustStore
from edge_runtime.config import MAX_CONFIG_BYTES, Config, load_config, parse_config
from edge_runtime.errors import (
    ConfigError,
    DocumentError,
    ManifestError,
    SampleParseError,
    TransferError,
    UnsafeArchiveError,
)
from edge_runtime.sources.sensors import LineParser, parse_line
from edge_runtime.sync.protocol import MAX_ENVELOPE_BYTES, Command, DesiredDocument, open_envelope, utc_iso
from edge_runtime.sync.transfer import MAX_META_BYTES, ChunkAssembler, describe_bundle, parse_meta

SCALE = 20 if os.environ.get("HYPOTHESIS_PROFILE") == "deep" else 1


def fuzz(examples: int) -> Any:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# -- structured mutation of JSON documents --------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=24)
    | st.sampled_from(
        ["", "1.0.0", "0.0.0-rc1", "../x", "/etc/passwd", "a" * 300, "\x00", "2026-01-01T00:00:00Z"]
    )
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, (*prefix, i))


@st.composite
def mutated(draw: st.DrawFn, base: Any, rounds: int = 3) -> Any:
    """``base`` with 1..``rounds`` random edits at random paths."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, rounds))):
        path = draw(st.sampled_from(list(_paths(doc))))
        if not path:
            if draw(st.integers(0, 9)) == 0:
                doc = draw(_json)
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(_json)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(_json)
        else:
            parent.append(draw(_json))
    return doc


def _bytes_of(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


# -- manifest -------------------------------------------------------------------------------------

MANIFEST = json.loads((DEMO / "shapes" / "manifest.json").read_bytes())


@fuzz(400)
@given(
    raw=mutated(MANIFEST).map(_bytes_of)
    | st.binary(max_size=400)
    | mutated(MANIFEST).map(lambda d: _bytes_of(d)[: len(_bytes_of(d)) // 2])
)
def test_parse_manifest_raises_only_manifest_error(raw: bytes) -> None:
    try:
        manifest = parse_manifest(raw)
    except ManifestError as exc:
        assert str(exc)
        return
    assert isinstance(manifest, Manifest)
    assert parse_manifest(canonical_bytes(manifest)) == manifest


# -- config ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    base = tmp_path_factory.mktemp("cfg")
    for name in ("ca.pem", "dev.crt", "dev.key"):
        (base / name).write_text("PEM\n")
    (base / "password").write_text("secret\n")
    (base / "binary-secret").write_bytes(b"\xff\xfe\x00binary")
    data = {
        "model": {"bundle": str(DEMO / "shapes"), "format": "auto", "threads": 1},
        "source": {"kind": "video", "uri": "clip.avi", "loop": True},
        "pipeline": {"max_fps": 30},
        "sinks": [{"kind": "jsonl", "path": "out.jsonl"}],
        "trust": {"keys": [str(DEMO / "keys" / "demo.pub")]},
        "state": {"dir": "state"},
        "sync": {
            "enabled": True,
            "host": "broker.example",
            "fleet": "plant1",
            "device_id": "cam-07",
            "groups": ["cams"],
            "ca_file": "ca.pem",
            "cert_file": "dev.crt",
            "key_file": "dev.key",
            "username": "cam-07",
            "password_file": "password",
        },
    }
    return base, data


def test_config_base_is_valid_and_path_edge_cases_are_config_errors(
    config_base: tuple[Path, dict[str, Any]],
) -> None:
    base, data = config_base
    assert isinstance(parse_config(data, base), Config)
    for section, key, value in (
        ("model", "bundle", "~no-such-user-edgert/bundle"),  # was RuntimeError from expanduser()
        ("state", "dir", "~no-such-user-edgert/state"),
        ("sync", "password_file", "binary-secret"),  # was UnicodeDecodeError
    ):
        bad = copy.deepcopy(data)
        bad[section][key] = value
        with pytest.raises(ConfigError):
            parse_config(bad, base)


@fuzz(300)
@given(doc=st.data())
def test_parse_config_dict_raises_only_config_error(
    config_base: tuple[Path, dict[str, Any]], doc: st.DataObject
) -> None:
    base, data = config_base
    value = doc.draw(mutated(data, rounds=4))
    try:
        config = parse_config(value, base)
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(config, Config)


CONFIG_TOML = """
[model]
bundle = "{bundle}"
threads = 1

[source]
kind = "replay"
uri = "samples.csv"
format = "csv"

[trust]
keys = ["{key}"]

[[sinks]]
kind = "jsonl"
path = "-"
""".format(bundle=DEMO / "shapes", key=DEMO / "keys" / "demo.pub")


@st.composite
def toml_text(draw: st.DrawFn) -> str:
    text = CONFIG_TOML
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "nest"]))
        if op == "insert":
            text = text[:pos] + draw(st.text(max_size=12)) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 20)) :]
        else:
            depth = draw(st.integers(1, 3000))
            text += "\nx = " + draw(st.sampled_from(["[", "{a="])) * depth + "\n"
    return text


@fuzz(250)
@given(text=toml_text() | st.text(max_size=200))
def test_load_config_toml_raises_only_config_error(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    path = tmp_path_factory.mktemp("toml", numbered=True) / "edgert.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc)


# -- signed envelopes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, TrustStore]:
    priv, pub = generate_keypair(tmp_path_factory.mktemp("fuzzkeys"))
    return load_private_key(priv), TrustStore.from_files([pub])


SHA = "ab" * 32
DESIRED = {
    "schema_version": 1,
    "kind": "desired",
    "fleet": "test",
    "target": "group:cams",
    "sequence": 5,
    "issued_at": "2026-01-01T00:00:00Z",
    "expires_at": "2026-02-01T00:00:00.000000Z",
    "bundle": {"name": "shapes", "version": "1.2.0", "sha256": SHA, "size": 1000, "meta_sha256": SHA},
    "rollout": {"canary_percent": 50.0, "shadow": {"sample_rate": 0.2}, "probation_s": 30.0},
    "rollback": False,
}
COMMAND = {
    "schema_version": 1,
    "kind": "command",
    "fleet": "test",
    "device": "dev1",
    "action": "rollback",
    "sequence": 9,
    "issued_at": utc_iso(0),
    "expires_at": "2026-02-01T00:00:00+01:00",
    "reason": "x",
}


def _sign(body: bytes, key: Any) -> dict[str, Any]:
    import base64

    from edge_runtime.bundle.signing import sign_bytes

    return {"doc": base64.b64encode(body).decode(), **json.loads(sign_bytes(body, key))}


@fuzz(400)
@given(
    kind=st.sampled_from([DesiredDocument, Command]),
    data=st.data(),
    tamper_envelope=st.booleans(),
)
def test_open_envelope_of_signed_mutated_documents_raises_only_document_error(
    signer: tuple[Any, TrustStore], kind: type[Any], data: st.DataObject, tamper_envelope: bool
) -> None:
    key, trust = signer
    body = data.draw(mutated(DESIRED if kind is DesiredDocument else COMMAND))
    envelope: Any = _sign(_bytes_of(body), key)
    if tamper_envelope:
        envelope = data.draw(mutated(envelope, rounds=2))
    try:
        doc, key_id = open_envelope(_bytes_of(envelope), trust, kind)
    except DocumentError as exc:
        assert str(exc)
        return
    assert isinstance(doc, kind) and key_id in trust.keys
    doc.expired()  # the times of an accepted document are usable
    if isinstance(doc, DesiredDocument):
        assert doc.issued_ts < float("inf")


# -- chunk table and chunk assembly ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, list[bytes]]:
    path = tmp_path_factory.mktemp("chunks") / "b.edgebundle"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 5 * 4096 + 1000, dtype=np.uint8).tobytes())
    meta = describe_bundle(path, 4096)
    raw = path.read_bytes()
    return path, meta, [raw[i * 4096 : (i + 1) * 4096] for i in range(meta.n_chunks)]


@fuzz(300)
@given(data=st.data(), with_digest=st.booleans())
def test_parse_meta_of_mutated_tables_raises_only_transfer_error(
    small_bundle: tuple[Path, Any, list[bytes]], data: st.DataObject, with_digest: bool
) -> None:
    _path, meta, _chunks = small_bundle
    raw = _bytes_of(data.draw(mutated(json.loads(meta.meta_bytes()))))
    try:
        got = parse_meta(raw, meta.meta_digest() if with_digest else None)
    except TransferError as exc:
        assert str(exc)
        return
    if with_digest:  # only the table the document names gets through
        assert got == meta


_index = st.integers(-3, 9) | st.integers(min_value=-(2**63), max_value=2**63)


@fuzz(120)
@given(
    ops=st.lists(
        st.tuples(_index, st.sampled_from(["good", "flip", "cut", "pad", "other", "random"])), max_size=25
    )
)
def test_chunk_assembler_add_with_random_indices_and_data(
    tmp_path_factory: pytest.TempPathFactory,
    small_bundle: tuple[Path, Any, list[bytes]],
    ops: list[tuple[int, str]],
) -> None:
    path, meta, chunks = small_bundle
    work = tmp_path_factory.mktemp("asm", numbered=True)
    with ChunkAssembler(work, meta, sync_bytes=0) as asm:
        for index, how in [*ops, *((i, "good") for i in range(meta.n_chunks))]:
            ref = chunks[index] if 0 <= index < meta.n_chunks else chunks[0]
            payload = {
                "good": ref,
                "flip": bytes([ref[0] ^ 1]) + ref[1:],
                "cut": ref[:-1],
                "pad": ref + b"\x00",
                "other": chunks[(index + 1) % meta.n_chunks] if 0 <= index < meta.n_chunks else ref,
                "random": hashlib.sha256(str(index).encode()).digest() * (len(ref) // 32 + 1),
            }[how][: len(ref) + (how == "pad")]
            before = asm.received_bytes
            try:
                added = asm.add(index, payload)
            except TransferError as exc:
                assert str(exc) and asm.received_bytes == before
                continue
            # a duplicate is ignored unread (False); a chunk is written only when it verified
            assert added == (asm.received_bytes > before)
            assert not added or payload == ref, (index, how)
        assert asm.complete
        out = asm.finish(work / "done.edgebundle")
    assert out.read_bytes() == path.read_bytes()


# -- sensor lines ---------------------------------------------------------------------------------

_number_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
    st.sampled_from(["1e999", "-1e999", "nan", "inf", "0x10", "1_000", "", " ", "1e-400", "3.4e39", "١٢"]),
)
_csv_line = st.lists(_number_text, min_size=0, max_size=6).map(",".join)
_json_line = _json.map(lambda v: json.dumps(v, allow_nan=True)) | st.lists(
    st.integers(min_value=-(10**400), max_value=10**400), min_size=1, max_size=4
).map(json.dumps)


@fuzz(500)
@given(
    line=_csv_line | _json_line | st.text(max_size=80),
    fmt=st.sampled_from(["csv", "json"]),
    columns=st.none()
    | st.lists(st.sampled_from(["ax", "ay", "az", "t"]), min_size=1, max_size=3, unique=True),
    expected=st.none() | st.integers(1, 4),
)
def test_parse_line_raises_only_sample_parse_error(
    line: str, fmt: str, columns: list[str] | None, expected: int | None
) -> None:
    try:
        row = parse_line(line, fmt, columns, expected=expected)  # type: ignore[arg-type]
    except SampleParseError as exc:
        assert str(exc)
        return
    assert row.dtype == np.float32 and row.ndim == 1 and np.all(np.isfinite(row))
    assert expected is None or row.shape[0] == expected


@fuzz(200)
@given(
    lines=st.lists(
        st.sampled_from(["t,ax,ay", "ax,ay,az", "sensor ready"]) | _csv_line | _json_line, max_size=12
    ),
    fmt=st.sampled_from(["csv", "json"]),
    columns=st.none() | st.just(["ax", "ay"]),
)
def test_line_parser_sequences_raise_only_sample_parse_error(
    lines: list[str], fmt: str, columns: list[str] | None
) -> None:
    parser = LineParser(fmt, columns)  # type: ignore[arg-type]
    widths = set()
    for line in lines:
        try:
            row = parser.parse(line)
        except SampleParseError:
            continue
        if row is not None:
            assert np.all(np.isfinite(row))
            widths.add(row.shape[0])
    assert len(widths) <= 1  # the first good line fixes the channel count


# -- memory: oversized inputs are refused before they are processed ------------------------------


def _peak(call: Callable[[], Any], expected: type[Exception]) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(expected):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_oversized_inputs_are_refused_with_bounded_memory(
    tmp_path: Path, signer: tuple[Any, TrustStore], small_bundle: tuple[Path, Any, list[bytes]]
) -> None:
    _key, trust = signer
    _path, meta, _chunks = small_bundle
    big_manifest = b"[" * (MAX_MANIFEST_BYTES + 1)  # a JSON nesting bomb just over the limit
    big_envelope = b'{"doc":"' + b"A" * (MAX_ENVELOPE_BYTES * 16) + b'"}'
    big_meta = b'{"chunk_sha256":["' + b"0" * MAX_META_BYTES + b'"]}'
    config = tmp_path / "huge.toml"
    config.write_bytes(b"x = [" + b"1," * (8 * MAX_CONFIG_BYTES) + b"]\n")  # 16 MiB
    limit = 256 * 1024
    peaks = {
        "manifest": _peak(lambda: parse_manifest(big_manifest), ManifestError),
        "envelope": _peak(lambda: open_envelope(big_envelope, trust, DesiredDocument), DocumentError),
        "meta": _peak(lambda: parse_meta(big_meta), TransferError),
        "config": _peak(lambda: load_config(config), ConfigError),
    }
    with ChunkAssembler(tmp_path / "asm", meta) as asm:
        huge_chunk = bytes(64 << 20)
        peaks["chunk"] = _peak(lambda: asm.add(0, huge_chunk), TransferError)
    config_peak = peaks.pop("config")
    assert all(p < limit for p in peaks.values()), peaks
    assert config_peak < MAX_CONFIG_BYTES + limit, config_peak  # reads at most the limit + 1 byte


def test_decompression_bomb_is_refused_before_it_inflates(
    tmp_path: Path, signer: tuple[Any, TrustStore]
) -> None:
    from corpus import gzip_bomb

    from edge_runtime.bundle import unpack_bundle

    _key, trust = signer
    bomb = tmp_path / "bomb.edgebundle"
    bomb.write_bytes(gzip_bomb((DEMO / "shapes" / "manifest.json").read_bytes(), 1 << 30))  # 1 GiB inside
    assert bomb.stat().st_size < 2 << 20
    peak = _peak(lambda: unpack_bundle(bomb, tmp_path / "out", trust=trust), UnsafeArchiveError)
    assert peak < 4 << 20, peak
    assert not (tmp_path / "out").exists()
