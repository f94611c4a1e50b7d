"""Recipe: train the "shapes" camera classifier and export it to ONNX and TFLite (fp32).

Usage::

    python models/shapes/recipe.py [--out models/shapes/build] [--seed 1234]

Synthesizes class-balanced train/val/held-out-test sets with :mod:`models.shapes.data`
(nothing is downloaded), trains a small Keras CNN (64x64x3 RGB, float 0..1, NHWC, softmax over
:data:`~models.shapes.data.CLASSES`), exports ``model.onnx`` (tf2onnx) and ``model.tflite``
(TFLiteConverter), checks both against Keras on the held-out set and writes ``labels.txt``,
``metrics.json``, ``golden.npz`` (8 decoded frames of the demo video, uint8 BGR 240x320x3) and
``demo.avi``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import cv2
import numpy as np
import numpy.typing as npt

from models.export import (
    compare_outputs,
    export_onnx,
    export_tflite,
    seed_everything,
    tool_versions,
    write_json,
)
from models.runners import OnnxRunner, TfliteRunner, run_batch
from models.shapes import data

HERE = Path(__file__).resolve().parent
INPUT_NAME = "image"
OUTPUT_NAME = "probs"


def build_model(n_classes: int) -> Any:
    """Small CNN on per-image standardized input.

    The graph first removes each image's per-channel mean and divides by its contrast (so
    arbitrary shape/background colors cost no capacity and training starts reliably), then:
    3 conv+pool blocks (16-32-64), conv 96, global max pool, dense 64, softmax.
    """
    import keras
    from keras import layers, ops

    s = data.INPUT_SIZE
    inp = keras.Input((s, s, 3), name=INPUT_NAME)
    centred = inp - ops.mean(inp, axis=(1, 2), keepdims=True)
    contrast = ops.sqrt(ops.mean(ops.square(centred), axis=(1, 2, 3), keepdims=True) + 1e-3)
    x = centred / contrast
    for filters in (16, 32, 64):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(96, 3, padding="same", activation="relu")(x)
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dense(64, activation="relu")(x)
    out = layers.Dense(n_classes, activation="softmax", name=OUTPUT_NAME)(x)
    return keras.Model(inp, out, name="shapes_cnn")


def to_input(bgr: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Model-size BGR uint8 images (N x 64 x 64 x 3) to model inputs (RGB, 0..1)."""
    return np.ascontiguousarray(bgr[..., ::-1], dtype=np.float32) * np.float32(1.0 / 255.0)


def read_video(path: Path) -> list[npt.NDArray[np.uint8]]:
    """All frames of a video as the runtime's video source delivers them (BGR uint8)."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def main(argv: list[str] | None = None) -> int:
    """Train, export, verify and write the recipe outputs; prints a summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "build", help="output directory")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train", type=int, default=8000, help="training samples")
    ap.add_argument("--val", type=int, default=1000, help="validation samples")
    ap.add_argument("--test", type=int, default=2000, help="held-out test samples")
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    deterministic = seed_everything(args.seed)
    import keras

    # disjoint seeds per split: the held-out set is never seen in training or model selection
    x_train, y_train = data.make_dataset(args.train, args.seed + 1)
    x_val, y_val = data.make_dataset(args.val, args.seed + 2)
    x_test, y_test = data.make_dataset(args.test, args.seed + 3)
    t_data = time.perf_counter() - t_start

    model = build_model(len(data.CLASSES))
    steps = args.epochs * int(np.ceil(args.train / 64))
    lr = keras.optimizers.schedules.CosineDecay(2e-3, steps, alpha=0.02)
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    t0 = time.perf_counter()
    hist = model.fit(
        to_input(x_train),
        y_train,
        validation_data=(to_input(x_val), y_val),
        epochs=args.epochs,
        batch_size=64,
        shuffle=True,
        verbose=2,
    )
    t_train = time.perf_counter() - t0

    xt = to_input(x_test)
    p_keras = model.predict(xt, batch_size=256, verbose=0)
    pred = np.argmax(p_keras, -1)
    acc = float(np.mean(pred == y_test))
    n_cls = len(data.CLASSES)
    confusion = np.zeros((n_cls, n_cls), dtype=np.int64)
    np.add.at(confusion, (y_test, pred), 1)

    shape = (1, data.INPUT_SIZE, data.INPUT_SIZE, 3)
    onnx_path, tflite_path = out / "model.onnx", out / "model.tflite"
    onnx_route = export_onnx(model, onnx_path, shape, INPUT_NAME, OUTPUT_NAME)
    tflite_route = export_tflite(model, tflite_path, shape, INPUT_NAME)
    onnx_run, tflite_run = OnnxRunner(onnx_path), TfliteRunner(tflite_path)
    p_onnx, p_tflite = run_batch(onnx_run, xt), run_batch(tflite_run, xt)
    agreement = compare_outputs(p_keras, p_onnx, p_tflite, argmax=True)

    # demo video, decoded as the runtime's video source delivers it
    video = out / "demo.avi"
    video_labels = np.asarray(data.write_video(video), dtype=np.int64)
    frames = read_video(video)
    video_in = np.stack([data.preprocess(f) for f in frames])
    video_pred = np.argmax(run_batch(tflite_run, video_in), -1)
    video_acc = float(np.mean(video_pred == video_labels[: len(frames)]))
    pick = np.linspace(0, len(frames) - 1, 8).round().astype(int)
    golden = np.stack([frames[i] for i in pick])
    golden_in = video_in[pick]
    np.savez_compressed(
        out / "golden.npz",
        frames=golden,
        labels=video_labels[pick],
        expected_tflite=run_batch(tflite_run, golden_in),
        expected_onnx=run_batch(onnx_run, golden_in),
    )
    (out / "labels.txt").write_text("\n".join(data.CLASSES) + "\n", encoding="utf-8")

    metrics: dict[str, Any] = {
        "model": "shapes",
        "task": "classification",
        "classes": list(data.CLASSES),
        "input": {
            "name": INPUT_NAME,
            "shape": list(shape),
            "dtype": "float32",
            "layout": "nhwc",
            "color": "rgb",
            "scale": 1 / 255,
        },
        "output": {"name": OUTPUT_NAME, "shape": [1, n_cls], "meaning": "softmax probabilities"},
        "seed": args.seed,
        "op_determinism": deterministic,
        "samples": {"train": args.train, "val": args.val, "test": args.test},
        "epochs": args.epochs,
        "params": int(model.count_params()),
        "val_accuracy": float(hist.history["val_accuracy"][-1]),
        "test_accuracy": acc,
        "test_per_class_accuracy": {
            c: float(confusion[i, i] / max(1, confusion[i].sum())) for i, c in enumerate(data.CLASSES)
        },
        "test_confusion": confusion.tolist(),
        "export": {
            "onnx": onnx_route,
            "tflite": tflite_route,
            "onnx_bytes": onnx_path.stat().st_size,
            "tflite_bytes": tflite_path.stat().st_size,
        },
        "export_agreement_test": agreement,
        "test_accuracy_onnx": float(np.mean(np.argmax(p_onnx, -1) == y_test)),
        "test_accuracy_tflite": float(np.mean(np.argmax(p_tflite, -1) == y_test)),
        "demo_video": {
            "file": video.name,
            "frames": len(frames),
            "fps": data.VIDEO_FPS,
            "size": list(data.VIDEO_SIZE),
            "bytes": video.stat().st_size,
            "frame_accuracy_tflite": video_acc,
        },
        "golden": {
            "frames": len(pick),
            "frame_indices": pick.tolist(),
            "shape": list(golden.shape),
            "dtype": "uint8",
            "color": "bgr",
        },
        "timings_s": {
            "data": round(t_data, 1),
            "train": round(t_train, 1),
            "total": round(time.perf_counter() - t_start, 1),
        },
        "versions": tool_versions(),
    }
    write_json(out / "metrics.json", metrics)

    print(
        f"shapes: held-out accuracy {acc:.4f} on {args.test} samples "
        f"(onnx {metrics['test_accuracy_onnx']:.4f}, tflite {metrics['test_accuracy_tflite']:.4f})"
    )
    print(
        f"  export max |diff| vs keras: onnx {agreement['onnx_max_abs_diff']:.2e}, "
        f"tflite {agreement['tflite_max_abs_diff']:.2e}; demo video frame accuracy {video_acc:.3f}"
    )
    print(
        f"  sizes: onnx {onnx_path.stat().st_size} B, tflite {tflite_path.stat().st_size} B, "
        f"video {video.stat().st_size} B; train {t_train:.1f} s, total {metrics['timings_s']['total']} s"
    )
    print(f"  wrote {out}")
    return 0


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":
        # tf2onnx's graph optimizer iterates sets of node names: pin str hashing so the ONNX
        # file is byte-for-byte reproducible, not just numerically identical
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    raise SystemExit(main())
