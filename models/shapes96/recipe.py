"""Recipe: "shapes96", a real trained classifier big enough for int8 to pay off.

Usage::

    python models/shapes96/recipe.py [--out models/shapes96/build] [--seed 1234] [--epochs 5] [--samples 6000]

The data are the synthesized shapes of :mod:`models.shapes.data` (OpenCV-drawn circles,
squares, triangles, stars and crosses on cluttered, noisy camera-like canvases; nothing is
downloaded), brought to 96 x 96 like the device's ``ImagePreprocess(resize="stretch",
interpolation="area", color="rgb", scale=1/255)`` does.

The network (about 1.18 M parameters, about 120 M multiply-accumulates per inference, so
int8's fixed per-operator costs do not dominate the way they do for the 15 M MAC ``shapes``
CNN):

* per-image standardization inside the graph (subtract each image's per-channel mean, divide
  by its contrast); without it, training on arbitrary shape/background colours stays at chance;
* a 3x3 stride-2 stem conv (32) + BN + ReLU (96 -> 48);
* stages of 32, 64, 128 and 256 channels of 3x3 conv + BN + ReLU (one conv in the 32-channel
  stage, which follows the stem at the same width; two in the others), 2x2 max pooling
  between stages;
* global average pooling and ``Dense(5, softmax)``.

Training is seeded (``keras.utils.set_random_seed`` and TensorFlow op determinism): Adam with a
cosine-decayed learning rate, 6000 samples, 5 epochs, batch 64 (about 3 minutes on 2 shared
cores). Calibration and held-out evaluation images are drawn with **different seeds** from the
training and validation data.

Writes to ``--out`` (``models/shapes96/build/``, git-ignored):

* ``model.keras``: the trained Keras model (input ``image`` (1, 96, 96, 3) RGB float 0..1);
* ``labels.txt``: the class names, one per line, in output order;
* ``calib/<class>/*.png`` (300) and ``eval/<class>/*.png`` (1000): labelled 96 x 96 BGR images
  for ``edgert convert --calibration ... --eval ...``;
* ``metrics.json``: held-out accuracy, parameters, MACs, seeds, timings, tool versions.

Importing this module has no side effects and does not import TensorFlow; :func:`main` does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import cv2
import numpy as np
import numpy.typing as npt

from models.shapes import data

__all__ = [
    "CALIB_COUNT",
    "CLASSES",
    "EVAL_COUNT",
    "HERE",
    "INPUT_NAME",
    "INPUT_SIZE",
    "OUTPUT_NAME",
    "build_model",
    "count_macs",
    "is_built",
    "main",
    "make_images",
    "preprocess_spec",
    "to_input",
    "write_image_folder",
]

HERE = Path(__file__).resolve().parent
INPUT_SIZE = 96
INPUT_NAME = "image"
OUTPUT_NAME = "probs"
CLASSES: tuple[str, ...] = data.CLASSES
STAGES: tuple[tuple[int, int], ...] = ((32, 1), (64, 2), (128, 2), (256, 2))
"""(channels, 3x3 convs) per stage; 2x2 max pooling between stages."""
CALIB_COUNT = 300
EVAL_COUNT = 1000
VAL_COUNT = 500

U8Image = npt.NDArray[np.uint8]
F32Array = npt.NDArray[np.float32]


def preprocess_spec() -> Any:
    """The device preprocessing the model is trained for (``ImagePreprocess``)."""
    from edge_runtime.preprocess_spec import ImagePreprocess

    return ImagePreprocess(
        resize="stretch", interpolation="area", color="rgb", layout="nhwc", scale=1.0 / 255.0
    )


def make_images(n: int, seed: int, size: int = INPUT_SIZE) -> tuple[U8Image, npt.NDArray[np.int64]]:
    """``n`` class-balanced shapes samples resized to ``size`` (BGR uint8, area) and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(CLASSES)
    rng.shuffle(labels)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, lab in enumerate(labels):
        frame = data.render_sample(int(lab), rng)
        images[i] = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
    return images, labels


def to_input(bgr: U8Image) -> F32Array:
    """Model-size BGR uint8 images to model inputs (RGB float 0..1), as the device preprocessing."""
    return np.ascontiguousarray(bgr[..., ::-1], dtype=np.float32) * np.float32(1.0 / 255.0)


def build_model(n_classes: int = len(CLASSES), size: int = INPUT_SIZE) -> Any:
    """The shapes96 network (see the module docstring); needs Keras."""
    import keras
    from keras import layers, ops

    inp = keras.Input((size, size, 3), name=INPUT_NAME)
    centred = inp - ops.mean(inp, axis=(1, 2), keepdims=True)
    contrast = ops.sqrt(ops.mean(ops.square(centred), axis=(1, 2, 3), keepdims=True) + 1e-3)
    x = centred / contrast
    x = layers.Conv2D(STAGES[0][0], 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for s, (width, convs) in enumerate(STAGES):
        for c in range(convs):
            tag = f"s{s}_c{c}"
            x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{tag}_conv")(x)
            x = layers.BatchNormalization(name=f"{tag}_bn")(x)
            x = layers.ReLU(name=f"{tag}_relu")(x)
        if s < len(STAGES) - 1:
            x = layers.MaxPooling2D(name=f"s{s}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(n_classes, activation="softmax", name=OUTPUT_NAME)(x)
    return keras.Model(inp, out, name="shapes96")


def count_macs(model: Any) -> int:
    """Multiply-accumulates per inference (batch 1) of the Conv2D, DepthwiseConv2D and Dense layers."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            out_shape = layer.output.shape
            positions = int(np.prod([d or 1 for d in out_shape[1:-1]])) if len(out_shape) > 2 else 1
            # kernel elements = MACs per output position: kh*kw*Cin*Cout (conv), kh*kw*C*mult
            # (depthwise), in*out (dense)
            total += positions * int(np.prod(layer.get_weights()[0].shape))
    return total


def write_image_folder(folder: Path, images: U8Image, labels: npt.NDArray[np.int64], prefix: str) -> None:
    """Write labelled BGR images as PNG into ``folder/<class>/`` (replaced as a whole)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in CLASSES:
        (tmp / name).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = tmp / CLASSES[int(label)] / f"{prefix}_{i:05d}.png"
        if not cv2.imwrite(str(path), image):
            raise RuntimeError(f"cannot write {path}")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)


def is_built(out: Path) -> bool:
    """Whether ``out`` holds a complete recipe output (model, labels, metrics, calib/, eval/)."""
    return all((out / f).is_file() for f in ("model.keras", "labels.txt", "metrics.json")) and all(
        (out / d).is_dir() and any((out / d).iterdir()) for d in ("calib", "eval")
    )


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate and write the recipe outputs; prints a summary."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "build", help="output directory")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--samples", type=int, default=6000, help="training samples")
    ap.add_argument("--calib", type=int, default=CALIB_COUNT, help="calibration images written")
    ap.add_argument("--eval", type=int, default=EVAL_COUNT, help="held-out images written")
    ap.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    t_start = time.perf_counter()
    from converters.sources import quiet_tf
    from models.export import seed_everything, tool_versions, write_json

    deterministic = seed_everything(args.seed)
    import keras

    # disjoint seeds per split: calibration and held-out images are never trained on
    seeds = {"train": args.seed + 1, "val": args.seed + 2, "calib": args.seed + 3, "eval": args.seed + 4}
    x_train, y_train = make_images(args.samples, seeds["train"])
    x_val, y_val = make_images(VAL_COUNT, seeds["val"])
    x_cal, y_cal = make_images(args.calib, seeds["calib"])
    x_eval, y_eval = make_images(args.eval, seeds["eval"])
    t_data = time.perf_counter() - t_start

    model = build_model()
    steps = args.epochs * int(np.ceil(args.samples / 64))
    lr = keras.optimizers.schedules.CosineDecay(2e-3, steps, alpha=0.02)
    model.compile(
        optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    t0 = time.perf_counter()
    with quiet_tf():
        hist = model.fit(
            to_input(x_train),
            y_train,
            validation_data=(to_input(x_val), y_val),
            epochs=args.epochs,
            batch_size=64,
            shuffle=True,
            verbose=0 if args.quiet else 2,
        )
        t_train = time.perf_counter() - t0
        probs = model.predict(to_input(x_eval), batch_size=128, verbose=0)
        model.save(out / "model.keras")
    pred = np.argmax(probs, -1)
    acc = float(np.mean(pred == y_eval))
    n_cls = len(CLASSES)
    confusion = np.zeros((n_cls, n_cls), dtype=np.int64)
    np.add.at(confusion, (y_eval, pred), 1)

    write_image_folder(out / "calib", x_cal, y_cal, "calib")
    write_image_folder(out / "eval", x_eval, y_eval, "eval")
    (out / "labels.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    macs = count_macs(model)
    metrics: dict[str, Any] = {
        "model": "shapes96",
        "task": "classification",
        "classes": list(CLASSES),
        "input": {
            "name": INPUT_NAME,
            "shape": [1, INPUT_SIZE, INPUT_SIZE, 3],
            "dtype": "float32",
            "layout": "nhwc",
            "color": "rgb",
            "scale": 1 / 255,
        },
        "preprocess": preprocess_spec().model_dump(),
        "output": {"name": OUTPUT_NAME, "shape": [1, n_cls], "meaning": "softmax probabilities"},
        "seed": args.seed,
        "split_seeds": seeds,
        "op_determinism": deterministic,
        "samples": {"train": args.samples, "val": VAL_COUNT, "calib": args.calib, "eval": args.eval},
        "epochs": args.epochs,
        "params": int(model.count_params()),
        "macs": macs,
        "val_accuracy": float(hist.history["val_accuracy"][-1]),
        "eval_accuracy_keras": acc,
        "eval_per_class_accuracy": {
            c: float(confusion[i, i] / max(1, confusion[i].sum())) for i, c in enumerate(CLASSES)
        },
        "eval_confusion": confusion.tolist(),
        "timings_s": {
            "data": round(t_data, 1),
            "train": round(t_train, 1),
            "total": round(time.perf_counter() - t_start, 1),
        },
        "versions": tool_versions(),
    }
    write_json(out / "metrics.json", metrics)
    print(
        f"shapes96: held-out accuracy {acc:.4f} on {args.eval} images (val {metrics['val_accuracy']:.4f}); "
        f"{metrics['params']:,} params, {macs / 1e6:.0f} M MACs; data {t_data:.0f} s, train {t_train:.0f} s"
    )
    print(f"  wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
