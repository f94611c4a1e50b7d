"""The committed demo models (``models/demo/``) on freshly synthesized data, without TensorFlow.

The recipes' data generators (``models/*/data.py``) are TensorFlow-free, so new seeded samples
are drawn here and run through the committed ONNX and TFLite files - directly, and through the
bundles with the runtime's own preprocessing and decoders.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from edge_runtime.bundle import TrustStore, open_bundle
from edge_runtime.bundle.loader import Bundle
from edge_runtime.decoders.specs import RawSpec
from edge_runtime.model import LoadedModel, load_model
from edge_runtime.preprocess_spec import ImagePreprocess, TensorPreprocess
from edge_runtime.selftest import run_selftest
from models.runners import OnnxRunner, TfliteRunner, run_batch
from models.shapes import data as shapes_data
from models.vibration import data as vib_data

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo"
SEED = 20240607  # differs from every seed the recipes train/validate/test with


def _bundle(name: str) -> Bundle:
    root = DEMO / name
    if not (root / "manifest.json").is_file():
        pytest.fail(f"demo bundle {root} is missing: run the recipes and models/build_bundles.py")
    return open_bundle(root, require_signature=False)


@pytest.fixture(scope="module")
def shapes_bundle() -> Bundle:
    return _bundle("shapes")


@pytest.fixture(scope="module")
def vibration_bundle() -> Bundle:
    return _bundle("vibration")


def _auc(neg: npt.NDArray[np.float32], pos: npt.NDArray[np.float32]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    diff = pos[:, None].astype(np.float64) - neg[None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


# ------------------------------------------------------------------------------------ shapes


def test_shapes_onnx_and_tflite_classify_fresh_samples(shapes_bundle: Bundle) -> None:
    images, labels = shapes_data.make_dataset(200, SEED)
    x = np.stack([shapes_data.preprocess(im) for im in images])
    onnx = run_batch(OnnxRunner(shapes_bundle.path("model.onnx")), x)
    lite = run_batch(TfliteRunner(shapes_bundle.path("model.tflite")), x)
    assert onnx.shape == lite.shape == (200, len(shapes_data.CLASSES))
    for probs in (onnx, lite):
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)  # softmax output
        acc = float(np.mean(probs.argmax(axis=1) == labels))
        assert acc >= 0.9, f"accuracy {acc:.3f} on fresh samples"
    assert np.max(np.abs(onnx - lite)) < 1e-4
    assert np.array_equal(onnx.argmax(axis=1), lite.argmax(axis=1))


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_shapes_bundle_on_camera_sized_frames(shapes_bundle: Bundle, fmt: str) -> None:
    """Full-size frames of several aspect ratios through the manifest's preprocessing."""
    assert isinstance(shapes_bundle.manifest.preprocess, ImagePreprocess)
    assert shapes_bundle.labels() == list(shapes_data.CLASSES)
    model = load_model(shapes_bundle, fmt)
    rng = np.random.default_rng(SEED + 1)
    hits, n = 0, 60
    try:
        for i in range(n):
            label = i % len(shapes_data.CLASSES)
            canvas = [(320, 240), (160, 120), (96, 96), (192, 108)][i % 4]
            frame = shapes_data.render_sample(label, rng, canvas)
            outs, transform = model.infer(frame)
            top = model.decoder.decode(outs, transform)["top"][0]
            hits += int(top["label"] == shapes_data.CLASSES[label])
    finally:
        model.close()
    assert hits / n >= 0.9


def test_shapes_demo_video(shapes_bundle: Bundle) -> None:
    video = DEMO / "shapes.avi"
    assert video.stat().st_size < 3_000_000
    truth = [label for _, label in shapes_data.render_video_frames()]
    cap = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    assert len(frames) == len(truth)
    w, h = shapes_data.VIDEO_SIZE
    assert frames[0].shape == (h, w, 3)
    model = load_model(shapes_bundle, "tflite")
    try:
        picked = range(0, len(frames), 6)
        hits = sum(
            model.decoder.decode(*model.infer(frames[i]))["top"][0]["label"] == shapes_data.CLASSES[truth[i]]
            for i in picked
        )
    finally:
        model.close()
    assert hits / len(picked) >= 0.9


# --------------------------------------------------------------------------------- vibration


def test_vibration_scores_separate_normal_from_anomalies(vibration_bundle: Bundle) -> None:
    pre = vibration_bundle.manifest.preprocess
    assert isinstance(pre, TensorPreprocess)
    assert (pre.window, pre.channels) == (vib_data.WINDOW, vib_data.CHANNELS)
    decoder = vibration_bundle.manifest.decoder
    assert isinstance(decoder, RawSpec) and decoder.anomaly_threshold is not None
    threshold = decoder.anomaly_threshold
    assert threshold > 0
    windows, labels = vib_data.make_windows(240, SEED)
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    x = ((windows - mean) / std).astype(np.float32)
    onnx = run_batch(OnnxRunner(vibration_bundle.path("model.onnx")), x)[:, 0]
    lite = run_batch(TfliteRunner(vibration_bundle.path("model.tflite")), x)[:, 0]
    assert np.allclose(onnx, lite, rtol=1e-4, atol=1e-6)
    normal = labels == 0
    for scores in (onnx, lite):
        assert _auc(scores[normal], scores[~normal]) >= 0.97
        flagged = scores > threshold
        assert flagged[normal].mean() <= 0.05, "too many false alarms on normal windows"
        assert flagged[~normal].mean() >= 0.9, "too many missed anomalies"
        for i, kind in enumerate(vib_data.CONDITIONS[1:], start=1):
            assert flagged[labels == i].mean() >= 0.8, kind
    assert np.array_equal(onnx > threshold, lite > threshold)


def _run_windows(model: LoadedModel, x: npt.NDArray[np.float32], hop: int) -> list[bool]:
    win = model.preprocessor.new_buffer().size // vib_data.CHANNELS
    flags = []
    for s in range(0, len(x) - win + 1, hop):
        outs, transform = model.infer(np.ascontiguousarray(x[s : s + win]))
        flags.append(bool(model.decoder.decode(outs, transform)["anomaly"]))
    return flags


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_vibration_demo_csv_flags_the_fault_segment(vibration_bundle: Bundle, fmt: str) -> None:
    csv = DEMO / "vibration.csv"
    assert csv.read_text(encoding="utf-8").splitlines()[0] == "ax,ay,az"
    x = np.loadtxt(csv, delimiter=",", skiprows=1, dtype=np.float32)
    _, per_sample = vib_data.demo_signal()
    assert x.shape == (len(per_sample), 3)
    pre = vibration_bundle.manifest.preprocess
    assert isinstance(pre, TensorPreprocess) and pre.hop
    model = load_model(vibration_bundle, fmt)
    try:
        flags = np.array(_run_windows(model, x, pre.hop))
    finally:
        model.close()
    starts = range(0, len(flags) * pre.hop, pre.hop)
    # windows entirely inside one segment
    pure_normal = np.array([not per_sample[s : s + pre.window].any() for s in starts])
    pure_fault = np.array([per_sample[s : s + pre.window].all() for s in starts])
    assert pure_normal.sum() >= 10 and pure_fault.sum() >= 5
    assert flags[pure_fault].all()
    assert flags[pure_normal].mean() <= 0.1


# ------------------------------------------------------------------------------ both bundles


@pytest.mark.parametrize("name", ["shapes", "vibration"])
def test_demo_bundle_signed_and_selftest_passes(name: str) -> None:
    trust = TrustStore.from_files([DEMO / "keys" / "demo.pub"])
    bundle = open_bundle(DEMO / name, trust=trust, require_signature=True)
    assert {m.format for m in bundle.manifest.models} == {"onnx", "tflite"}
    for entry in bundle.manifest.models:
        assert entry.precision == "fp32"
        assert bundle.path(entry.path).stat().st_size < 1_000_000
        model = load_model(bundle, entry.format)
        try:
            assert run_selftest(model).passed
        finally:
            model.close()


def test_demo_folder_is_small() -> None:
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total < 5_000_000


def test_generators_are_seeded() -> None:
    a, la = shapes_data.make_dataset(6, 5)
    b, lb = shapes_data.make_dataset(6, 5)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    c, _ = shapes_data.make_dataset(6, 6)
    assert not np.array_equal(a, c)
    w1, l1 = vib_data.make_windows(8, 5)
    w2, l2 = vib_data.make_windows(8, 5)
    assert np.array_equal(w1, w2) and np.array_equal(l1, l2)
    assert w1.dtype == np.float32 and w1.shape == (8, vib_data.WINDOW, vib_data.CHANNELS)


def test_data_modules_do_not_import_tensorflow() -> None:
    code = (
        "import sys; import models.shapes.data, models.vibration.data, models.runners; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
