"""Pack the recipe outputs into the signed demo bundles under ``models/demo/``.

Usage (device venv is enough: no TensorFlow needed)::

    PYTHONPATH=. python models/build_bundles.py [--demo models/demo]

Reads ``models/shapes/build/`` and ``models/vibration/build/`` (run the recipes first) and
writes:

* ``models/demo/shapes/`` - bundle: classification, ONNX + TFLite, 8 golden video frames;
* ``models/demo/vibration/`` - bundle: anomaly score (raw decoder + threshold), ONNX + TFLite;
* ``models/demo/shapes.avi`` and ``models/demo/vibration.csv`` - the demo inputs;
* ``models/demo/keys/demo.key`` / ``demo.pub`` - the demo signing key pair (created on first
  use, then reused; only ``demo.pub`` is committed, the private key stays on the machine that
  built the bundles).

Then it re-opens each bundle with signature verification, runs its self-test with both
runtimes, and runs the demo input through the real preprocessing, model and decoder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np

from edge_runtime.bundle import TrustStore, create_bundle, generate_keypair, open_bundle
from edge_runtime.decoders.specs import ClassificationSpec, RawSpec
from edge_runtime.model import load_model
from edge_runtime.preprocess_spec import ImagePreprocess, TensorPreprocess
from edge_runtime.selftest import run_selftest

HERE = Path(__file__).resolve().parent
KEY_NAME = "demo"
VERSION = "1.0.0"


def demo_key(keys: Path) -> tuple[Path, Path]:
    """The demo key pair in ``keys`` (generated on first use, then reused)."""
    priv, pub = keys / f"{KEY_NAME}.key", keys / f"{KEY_NAME}.pub"
    if not priv.is_file():  # a fresh clone has only the public key: make a new demo pair
        pub.unlink(missing_ok=True)
        priv, pub = generate_keypair(keys, KEY_NAME)
    return priv, pub


def _load(build: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    missing = [
        n for n in ("model.onnx", "model.tflite", "metrics.json", "golden.npz") if not (build / n).is_file()
    ]
    if missing:
        raise SystemExit(f"{build} lacks {missing}: run the recipe first (see models/README.md)")
    metrics = json.loads((build / "metrics.json").read_text(encoding="utf-8"))
    with np.load(build / "golden.npz") as npz:
        golden = {k: npz[k] for k in npz.files}
    return metrics, golden


def build_shapes(build: Path, demo: Path, key: Path) -> Path:
    """The shapes camera classifier bundle (+ ``shapes.avi``)."""
    metrics, golden = _load(build)
    labels = (build / "labels.txt").read_text(encoding="utf-8").split()
    acc = metrics["test_accuracy"]
    out = create_bundle(
        demo / "shapes",
        models=[build / "model.tflite", build / "model.onnx"],
        name="shapes",
        version=VERSION,
        task="classification",
        preprocess=ImagePreprocess(
            resize="stretch", color="rgb", layout="nhwc", scale=1 / 255, interpolation="area"
        ),
        decoder=ClassificationSpec(top_k=3, softmax="never"),
        labels=labels,
        golden_frames=golden["frames"],
        description=(
            f"Demo camera classifier ({', '.join(labels)}) trained on synthetic OpenCV shapes by "
            f"models/shapes/recipe.py; held-out accuracy {acc:.4f} "
            f"(n={metrics['samples']['test']})."
        ),
        extra_files={"metrics.json": build / "metrics.json"},
        sign_key=key,
        overwrite=True,
    )
    shutil.copyfile(build / "demo.avi", demo / "shapes.avi")
    return out


def build_vibration(build: Path, demo: Path, key: Path) -> Path:
    """The vibration anomaly-score bundle (+ ``vibration.csv``)."""
    metrics, golden = _load(build)
    inp = metrics["input"]
    window, channels = inp["shape"][1], inp["shape"][2]
    test = metrics["test"]
    out = create_bundle(
        demo / "vibration",
        models=[build / "model.tflite", build / "model.onnx"],
        name="vibration",
        version=VERSION,
        task="anomaly",
        preprocess=TensorPreprocess(
            layout="nwc",
            mean=tuple(inp["preprocess_mean"]),
            std=tuple(inp["preprocess_std"]),
            window=window,
            hop=metrics["demo_csv"]["hop"],
            channels=channels,
        ),
        decoder=RawSpec(score="first", anomaly_threshold=metrics["threshold"], max_values=1),
        golden_frames=golden["frames"],
        description=(
            f"Demo 3-axis vibration anomaly detector (columns {','.join(inp['columns'])}, "
            f"{metrics['sample_rate_hz']:g} Hz, window {window}) from "
            "models/vibration/recipe.py: spectral autoencoder whose output is the anomaly score; "
            f"held-out TPR {test['true_positive_rate']:.3f} at FPR "
            f"{test['false_positive_rate']:.3f}."
        ),
        extra_files={"metrics.json": build / "metrics.json"},
        sign_key=key,
        overwrite=True,
    )
    shutil.copyfile(build / "demo.csv", demo / "vibration.csv")
    return out


def check_bundle(root: Path, pub: Path) -> list[str]:
    """Verify the signature, run the self-test with every runtime; returns report lines."""
    bundle = open_bundle(root, trust=TrustStore.from_files([pub]), require_signature=True)
    lines = [
        f"{bundle.name} {bundle.version}: signed by {bundle.signed_by}, "
        f"{len(bundle.manifest.files)} files verified"
    ]
    for entry in bundle.manifest.models:
        model = load_model(bundle, entry.format)
        try:
            rep = run_selftest(model)
        finally:
            model.close()
        lines.append(
            f"  self-test {entry.format}: {rep.matched}/{rep.frames} frames match, "
            f"max abs err {rep.max_abs_error:.2e}, p50 {rep.latency_ms_p50:.2f} ms"
        )
    return lines


def run_demo_video(root: Path, video: Path, truth: list[int], fmt: str = "tflite") -> float:
    """Frame accuracy of the bundle on the demo video (runtime preprocessing + decoder)."""
    bundle = open_bundle(root, require_signature=False)
    model = load_model(bundle, fmt)
    labels = bundle.labels()
    cap = cv2.VideoCapture(str(video))
    hits = n = 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            outs, transform = model.infer(frame)
            top = model.decoder.decode(outs, transform)["top"][0]["label"]
            hits += int(top == labels[truth[n]])
            n += 1
    finally:
        cap.release()
        model.close()
    return hits / max(1, n)


def run_demo_csv(root: Path, csv: Path, fmt: str = "tflite") -> list[bool]:
    """Anomaly flag of every window (at the manifest's hop) of the demo CSV."""
    bundle = open_bundle(root, require_signature=False)
    model = load_model(bundle, fmt)
    pre = bundle.manifest.preprocess
    assert isinstance(pre, TensorPreprocess)
    x = np.loadtxt(csv, delimiter=",", skiprows=1, dtype=np.float32)
    flags = []
    try:
        for s in range(0, len(x) - pre.window + 1, pre.hop or pre.window):
            outs, transform = model.infer(np.ascontiguousarray(x[s : s + pre.window]))
            flags.append(bool(model.decoder.decode(outs, transform)["anomaly"]))
    finally:
        model.close()
    return flags


def main(argv: list[str] | None = None) -> int:
    """Build, verify and exercise both demo bundles; prints a summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=HERE / "demo", help="output folder")
    ap.add_argument("--shapes-build", type=Path, default=HERE / "shapes" / "build")
    ap.add_argument("--vibration-build", type=Path, default=HERE / "vibration" / "build")
    args = ap.parse_args(argv)
    demo: Path = args.demo
    demo.mkdir(parents=True, exist_ok=True)
    key, pub = demo_key(demo / "keys")

    shapes = build_shapes(args.shapes_build, demo, key)
    vibration = build_vibration(args.vibration_build, demo, key)
    for root in (shapes, vibration):
        print("\n".join(check_bundle(root, pub)))

    from models.shapes.data import render_video_frames
    from models.vibration.data import CONDITIONS, DEMO_SEGMENTS, demo_signal

    truth = [label for _, label in render_video_frames()]
    acc = run_demo_video(shapes, demo / "shapes.avi", truth)
    print(f"shapes.avi through the bundle (tflite): frame accuracy {acc:.3f} over {len(truth)} frames")

    flags = run_demo_csv(vibration, demo / "vibration.csv")
    _, per_sample = demo_signal()
    pre = json.loads((vibration / "manifest.json").read_text(encoding="utf-8"))["preprocess"]
    win, hop = pre["window"], pre["hop"]
    starts = range(0, hop * len(flags), hop)
    truth_w = [bool(np.bincount(per_sample[s : s + win]).argmax() != 0) for s in starts]
    tp = sum(f and t for f, t in zip(flags, truth_w, strict=True))
    fp = sum(f and not t for f, t in zip(flags, truth_w, strict=True))
    kinds = sorted({k for k, _ in DEMO_SEGMENTS if k != CONDITIONS[0]})
    print(
        f"vibration.csv through the bundle (tflite): {tp}/{sum(truth_w)} anomalous "
        f"({', '.join(kinds)}) windows flagged, {fp}/{len(truth_w) - sum(truth_w)} normal "
        "windows flagged"
    )
    total = sum(p.stat().st_size for p in demo.rglob("*") if p.is_file())
    print(f"wrote {demo} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
