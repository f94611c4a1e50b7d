"""Signed documents and commands, topics, canary buckets and probation verdicts."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.bundle import TrustStore, generate_keypair, load_private_key
from edge_runtime.errors import DocumentError
from edge_runtime.sync.protocol import (
    Command,
    DesiredBundle,
    DesiredDocument,
    Rollout,
    Topics,
    canary_bucket,
    open_envelope,
    seal,
    semver_key,
    utc_iso,
)
from edge_runtime.sync.watch import WindowStats, probation_verdict, psi

SHA = "ab" * 32


def doc(**changes: object) -> DesiredDocument:
    now = time.time()
    base = {
        "fleet": "f1",
        "target": "group:cams",
        "sequence": 5,
        "issued_at": utc_iso(now),
        "expires_at": utc_iso(now + 3600),
        "bundle": DesiredBundle(name="shapes", version="1.2.0", sha256=SHA, size=10, meta_sha256=SHA),
    }
    return DesiredDocument.model_validate({**base, **changes})


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, TrustStore]:
    priv, pub = generate_keypair(tmp_path_factory.mktemp("k"))
    return load_private_key(priv), TrustStore.from_files([pub])


def test_seal_and_open_round_trip_and_tampering_is_refused(signer: tuple[object, TrustStore]) -> None:
    key, trust = signer
    d = doc()
    payload = seal(d, key)  # type: ignore[arg-type]
    back, key_id = open_envelope(payload, trust, DesiredDocument)
    assert back == d and key_id
    env = json.loads(payload)
    body = json.loads(base64.b64decode(env["doc"]))
    body["bundle"]["version"] = "9.9.9"
    env["doc"] = base64.b64encode(json.dumps(body).encode()).decode()
    with pytest.raises(DocumentError, match="signature"):
        open_envelope(json.dumps(env).encode(), trust, DesiredDocument)
    # a valid command envelope is not a desired document
    cmd = Command(
        fleet="f1",
        device="d1",
        action="rollback",
        sequence=1,
        issued_at=utc_iso(),
        expires_at=utc_iso(time.time() + 60),
    )
    with pytest.raises(DocumentError, match="DesiredDocument is invalid"):
        open_envelope(seal(cmd, key), trust, DesiredDocument)  # type: ignore[arg-type]
    with pytest.raises(DocumentError, match="not a signed"):
        open_envelope(b"{}", trust, DesiredDocument)
    with pytest.raises(DocumentError, match="limit"):
        open_envelope(b" " * 70000, trust, DesiredDocument)


def test_untrusted_key_and_document_rules(signer: tuple[object, TrustStore], tmp_path: Path) -> None:
    _key, trust = signer
    rogue, _ = generate_keypair(tmp_path / "rogue")
    with pytest.raises(DocumentError, match="not trusted"):
        open_envelope(seal(doc(), load_private_key(rogue)), trust, DesiredDocument)
    with pytest.raises(ValueError, match="expires_at must be after"):
        doc(expires_at=utc_iso(time.time() - 10))
    with pytest.raises(ValueError, match="group:NAME"):
        doc(target="cams")
    with pytest.raises(ValueError, match="semantic version"):
        DesiredBundle(name="x", version="v1", sha256=SHA, size=1, meta_sha256=SHA)
    assert doc(issued_at=utc_iso(time.time() - 7200), expires_at=utc_iso(time.time() - 3600)).expired()
    assert semver_key("1.10.0") > semver_key("1.9.9") > semver_key("1.9.9-rc1")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=512))
def test_open_envelope_fuzz_only_raises_document_error(signer: tuple[object, TrustStore], raw: bytes) -> None:
    _key, trust = signer
    with pytest.raises(DocumentError):
        open_envelope(raw, trust, DesiredDocument)


def test_topics_and_chunk_parsing() -> None:
    t = Topics("plant1")
    assert t.device("cam-7", "telemetry") == "edgert/plant1/device/cam-7/telemetry"
    assert t.parse_chunk(t.bundle_chunk(SHA, 12)) == (SHA, 12)
    assert t.parse_chunk("edgert/plant1/bundle/xyz/chunk/1") is None
    assert t.parse_chunk("edgert/other/bundle/" + SHA + "/chunk/1") is None
    with pytest.raises(DocumentError, match="not allowed"):
        t.device("a/b", "state")
    with pytest.raises(DocumentError, match="not allowed"):
        Topics("bad+fleet")


def test_canary_bucket_is_stable_uniform_and_salted() -> None:
    ids = [f"dev-{i}" for i in range(4000)]
    a = np.array([canary_bucket(d, SHA) for d in ids])
    assert all(canary_bucket(d, SHA) == x for d, x in zip(ids[:50], a[:50], strict=True))
    assert a.min() >= 0 and a.max() < 100
    assert abs(float(np.mean(a < 10)) - 0.10) < 0.02  # ~10 % canaries
    b = np.array([canary_bucket(d, "cd" * 32) for d in ids])
    overlap = np.mean((a < 10) & (b < 10)) / np.mean(a < 10)
    assert overlap < 0.25  # a new bundle picks a different subset


def stats(frames: int, p50: float, fps: float, hist: list[float] | None = None) -> WindowStats:
    return WindowStats(frames, frames / max(fps, 1e-9), p50, fps, np.array(hist or [], np.float64))


def test_probation_verdict_rules() -> None:
    ro = Rollout()
    base = stats(200, 2.0, 30.0)
    ok, fig = probation_verdict(ro, stats(100, 2.2, 30.0), base, errors=0)
    assert ok is None and fig["latency_ratio"] == pytest.approx(1.1)
    slow, _ = probation_verdict(ro, stats(100, 10.0, 30.0), base, errors=0)
    assert slow is not None and "5.0x" in slow
    errs, _ = probation_verdict(ro, stats(100, 2.0, 30.0), base, errors=20)
    assert errs is not None and "error rate" in errs
    fps, _ = probation_verdict(ro, stats(100, 2.0, 10.0), base, errors=0)
    assert fps is not None and "fps" in fps
    same_ok = (np.array([30.0, 30, 40]), np.array([31.0, 29, 40]))
    assert probation_verdict(ro, stats(100, 2.0, 30.0), base, errors=0, same_frames=same_ok)[0] is None
    collapsed = (np.array([100.0, 0, 0]), np.array([31.0, 29, 40]))
    reason, _ = probation_verdict(ro, stats(100, 2.0, 30.0), base, errors=0, same_frames=collapsed)
    assert reason is not None and "collapsed" in reason
    shifted = (np.array([10.0, 80, 10]), np.array([40.0, 20, 40]))
    reason, _ = probation_verdict(ro, stats(100, 2.0, 30.0), base, errors=0, same_frames=shifted)
    assert reason is not None and "PSI" in reason
    # a stream showing one class only is not a collapse when the previous model agrees
    one = (np.array([100.0, 0, 0]), np.array([99.0, 1, 0]))
    assert probation_verdict(ro, stats(100, 2.0, 30.0), base, errors=0, same_frames=one)[0] is None
    assert psi(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == pytest.approx(0.0)
