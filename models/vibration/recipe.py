"""Recipe: train the vibration anomaly detector and export it to ONNX and TFLite (fp32).

Usage::

    python models/vibration/recipe.py [--out models/vibration/build] [--seed 1234]

Synthesizes windows with :mod:`models.vibration.data` (nothing is downloaded) and trains a
spectral autoencoder on NORMAL windows only. The exported graph takes one window
``(1, 256, 3)`` already standardized per channel by the runtime
(``TensorPreprocess(mean, std)``, values in ``metrics.json``) and ends with the anomaly score
``(1, 1)``:

1. Welch spectrum per axis: three Hann-windowed 128-sample segments (hop 64), their DFTs as
   one fixed (non-trainable) strided convolution, power averaged over the segments -> 64 bins
   x 3 axes
   (bins 1..64, 7.8 Hz apart; averaging steadies the noise floor);
2. features ``power ** 0.25`` (= sqrt of the magnitude), standardized with constants from the
   normal training set;
3. dense autoencoder 192-96-12-96-192 (trained on normal windows only);
4. score = mean squared reconstruction error of the 192 features.

The anomaly threshold is a high percentile of the scores of held-aside normal validation
windows; detection rates are measured on a held-out set of all four conditions. Writes
``model.onnx``, ``model.tflite``, ``labels.txt``, ``metrics.json``, ``golden.npz`` (8 raw
float32 windows 256 x 3: two per condition) and ``demo.csv``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

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
from models.vibration import data

HERE = Path(__file__).resolve().parent
INPUT_NAME = "window"
OUTPUT_NAME = "score"
SEGMENT = 128
"""Samples per Welch segment (DFT length)."""
SEGMENT_HOP = 64
BINS = 64
HOP = 128
"""Hop between windows that the demo bundle declares (50 % overlap)."""

F32Array = npt.NDArray[np.float32]


def dft_matrices() -> tuple[F32Array, F32Array]:
    """Hann-windowed DFT matrices (SEGMENT x BINS) for bins 1..BINS (DC dropped)."""
    t = np.arange(SEGMENT)
    k = np.arange(1, BINS + 1)
    hann = 0.5 - 0.5 * np.cos(2 * math.pi * t / SEGMENT)
    arg = 2 * math.pi * np.outer(t, k) / SEGMENT
    cos = (hann[:, None] * np.cos(arg)).astype(np.float32)
    sin = (hann[:, None] * np.sin(arg)).astype(np.float32)
    return cos, sin


def standardize(x: F32Array, mean: F32Array, std: F32Array) -> F32Array:
    """What the runtime's ``TensorPreprocess`` does: ``x * (1/std) + (-mean/std)`` in float32."""
    alpha = (1.0 / std.astype(np.float64)).astype(np.float32)
    beta = (-mean.astype(np.float64) / std.astype(np.float64)).astype(np.float32)
    return (x * alpha + beta).astype(np.float32)


def build_feature_model() -> Any:
    """Window (standardized) -> Welch power ** 0.25 per axis and bin (192,), fixed weights.

    The segment DFTs are one strided convolution (kernel 1 x SEGMENT, stride SEGMENT_HOP)
    whose 2 * BINS fixed filters are the Hann-windowed cos and sin rows.
    """
    import keras
    from keras import layers, ops

    cos, sin = dft_matrices()
    segments = (data.WINDOW - SEGMENT) // SEGMENT_HOP + 1
    inp = keras.Input((data.WINDOW, data.CHANNELS), name=INPUT_NAME)
    x = layers.Permute((2, 1))(inp)  # (channels, time)
    x = layers.Reshape((data.CHANNELS, data.WINDOW, 1))(x)
    dft = layers.Conv2D(
        2 * BINS, (1, SEGMENT), strides=(1, SEGMENT_HOP), use_bias=False, trainable=False, name="dft"
    )
    spec = dft(x)  # (channels, segments, [cos bins | sin bins])
    dft.set_weights([np.concatenate([cos, sin], axis=1)[None, :, None, :]])
    # (channels, segments * {re, im}, bins): mean of re^2 and im^2 over both = power / 2
    pairs = layers.Reshape((data.CHANNELS, segments * 2, BINS))(ops.square(spec))
    welch = ops.mean(pairs, axis=2) * 2.0 + 1e-8  # (channels, bins)
    feat = layers.Flatten()(ops.sqrt(ops.sqrt(welch)))  # |X| ** 0.5, axis-major
    return keras.Model(inp, feat, name="spectral_features")


def build_autoencoder(dim: int) -> Any:
    """Dense autoencoder ``dim``-96-12-96-``dim``."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input((dim,)),
            layers.Dense(96, activation="relu"),
            layers.Dense(12, activation="relu"),
            layers.Dense(96, activation="relu"),
            layers.Dense(dim),
        ],
        name="autoencoder",
    )


def build_scorer(features: Any, ae: Any, f_mean: F32Array, f_scale: float) -> Any:
    """The exported graph: window -> features -> standardize -> AE -> MSE score (1, 1)."""
    import keras
    from keras import ops

    inp = keras.Input((data.WINDOW, data.CHANNELS), name=INPUT_NAME)
    z = (features(inp) - f_mean[None, :]) * np.float32(1.0 / f_scale)
    err = ops.square(z - ae(z))
    score = ops.mean(err, axis=-1, keepdims=True)
    return keras.Model(inp, score, name="vibration_ae_score")


def detection_metrics(
    scores: npt.NDArray[np.float32], labels: npt.NDArray[np.int64], threshold: float
) -> dict[str, Any]:
    """FPR on normal, TPR per anomaly kind and overall, ROC AUC (normal vs any anomaly)."""
    from sklearn.metrics import roc_auc_score

    flagged = scores > threshold
    normal = labels == 0
    out: dict[str, Any] = {
        "false_positive_rate": float(flagged[normal].mean()),
        "true_positive_rate": float(flagged[~normal].mean()),
        "roc_auc": float(roc_auc_score(~normal, scores)),
        "per_condition_flag_rate": {
            c: float(flagged[labels == i].mean()) for i, c in enumerate(data.CONDITIONS)
        },
        "per_condition_roc_auc": {
            c: float(roc_auc_score(labels[normal | (labels == i)] == i, scores[normal | (labels == i)]))
            for i, c in enumerate(data.CONDITIONS)
            if i
        },
        "accuracy": float(np.mean(flagged == ~normal)),
    }
    return out


def demo_windows(path: Path) -> tuple[F32Array, npt.NDArray[np.int64]]:
    """Read ``demo.csv`` back (as the replay source does) and cut windows every :data:`HOP`.

    Each window's label is the condition of the majority of its samples.
    """
    x = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32)
    _, per_sample = data.demo_signal()
    starts = range(0, len(x) - data.WINDOW + 1, HOP)
    wins = np.stack([x[s : s + data.WINDOW] for s in starts])
    labs = np.array([np.bincount(per_sample[s : s + data.WINDOW]).argmax() for s in starts])
    return wins, labs


def main(argv: list[str] | None = None) -> int:
    """Train, export, verify and write the recipe outputs; prints a summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "build", help="output directory")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train", type=int, default=8000, help="normal training windows")
    ap.add_argument("--val", type=int, default=4000, help="normal validation windows")
    ap.add_argument("--test", type=int, default=4000, help="held-out windows, all conditions")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument(
        "--percentile",
        type=float,
        default=99.9,
        help="threshold = this percentile of normal validation scores",
    )
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    deterministic = seed_everything(args.seed)
    import keras

    x_train, _ = data.make_windows(args.train, args.seed + 1, ("normal",))
    x_val, _ = data.make_windows(args.val, args.seed + 2, ("normal",))
    x_test, y_test = data.make_windows(args.test, args.seed + 3)
    t_data = time.perf_counter() - t_start

    flat = x_train.reshape(-1, data.CHANNELS).astype(np.float64)
    ch_mean = flat.mean(0).astype(np.float32)
    ch_std = flat.std(0).astype(np.float32)
    s_train, s_val, s_test = (standardize(x, ch_mean, ch_std) for x in (x_train, x_val, x_test))

    features = build_feature_model()
    f_train = features.predict(s_train, batch_size=512, verbose=0)
    f_mean = f_train.mean(0).astype(np.float32)
    f_scale = float(f_train.std())  # one global scale keeps the spectral shape's weighting
    z_train = (f_train - f_mean) / f_scale
    z_val = (features.predict(s_val, batch_size=512, verbose=0) - f_mean) / f_scale

    ae = build_autoencoder(z_train.shape[1])
    steps = args.epochs * math.ceil(args.train / 64)
    ae.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, steps, 0.05)), loss="mse")
    t0 = time.perf_counter()
    hist = ae.fit(
        z_train,
        z_train,
        validation_data=(z_val, z_val),
        epochs=args.epochs,
        batch_size=64,
        shuffle=True,
        verbose=0,
    )
    t_train = time.perf_counter() - t0

    scorer = build_scorer(features, ae, f_mean, f_scale)
    val_scores = scorer.predict(s_val, batch_size=512, verbose=0)[:, 0]
    threshold = float(np.percentile(val_scores, args.percentile))
    k_test = scorer.predict(s_test, batch_size=512, verbose=0)
    test = detection_metrics(k_test[:, 0], y_test, threshold)

    shape = (1, data.WINDOW, data.CHANNELS)
    onnx_path, tflite_path = out / "model.onnx", out / "model.tflite"
    onnx_route = export_onnx(scorer, onnx_path, shape, INPUT_NAME, OUTPUT_NAME)
    tflite_route = export_tflite(scorer, tflite_path, shape, INPUT_NAME)
    onnx_run, tflite_run = OnnxRunner(onnx_path), TfliteRunner(tflite_path)
    o_test, t_test = run_batch(onnx_run, s_test), run_batch(tflite_run, s_test)
    agreement = compare_outputs(k_test, o_test, t_test, argmax=False)
    agreement["onnx_decision_agree"] = float(np.mean((o_test > threshold) == (k_test > threshold)))
    agreement["tflite_decision_agree"] = float(np.mean((t_test > threshold) == (k_test > threshold)))
    test_tflite = detection_metrics(t_test[:, 0], y_test, threshold)

    csv_path = out / "demo.csv"
    data.write_demo_csv(csv_path)
    d_win, d_lab = demo_windows(csv_path)
    d_scores = run_batch(tflite_run, standardize(d_win, ch_mean, ch_std))[:, 0]
    d_flag = d_scores > threshold

    pick = np.concatenate([np.flatnonzero(y_test == i)[:2] for i in range(len(data.CONDITIONS))])
    np.savez_compressed(
        out / "golden.npz",
        frames=x_test[pick],
        labels=y_test[pick],
        expected_tflite=t_test[pick],
        expected_onnx=o_test[pick],
    )
    (out / "labels.txt").write_text("anomaly_score\n", encoding="utf-8")

    metrics: dict[str, Any] = {
        "model": "vibration",
        "task": "anomaly",
        "conditions": list(data.CONDITIONS),
        "sample_rate_hz": data.FS,
        "input": {
            "name": INPUT_NAME,
            "shape": list(shape),
            "dtype": "float32",
            "layout": "nwc",
            "columns": list(data.COLUMNS),
            "preprocess_mean": ch_mean.tolist(),
            "preprocess_std": ch_std.tolist(),
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": [1, 1],
            "meaning": "mean squared reconstruction error of sqrt-spectrum features",
        },
        "seed": args.seed,
        "op_determinism": deterministic,
        "samples": {
            "train_normal": args.train,
            "val_normal": args.val,
            "test": {c: int(np.sum(y_test == i)) for i, c in enumerate(data.CONDITIONS)},
        },
        "epochs": args.epochs,
        "params": int(scorer.count_params()),
        "trainable_params": int(sum(np.prod(w.shape) for w in ae.trainable_weights)),
        "final_loss": {"train": float(hist.history["loss"][-1]), "val": float(hist.history["val_loss"][-1])},
        "threshold": threshold,
        "threshold_rule": f"{args.percentile} percentile of {args.val} normal validation scores",
        "val_normal_score": {
            "median": float(np.median(val_scores)),
            "p99": float(np.percentile(val_scores, 99)),
            "max": float(val_scores.max()),
        },
        "test": test,
        "test_tflite": test_tflite,
        "export": {
            "onnx": onnx_route,
            "tflite": tflite_route,
            "onnx_bytes": onnx_path.stat().st_size,
            "tflite_bytes": tflite_path.stat().st_size,
        },
        "export_agreement_test": agreement,
        "demo_csv": {
            "file": csv_path.name,
            "samples": int(sum(n for _, n in data.DEMO_SEGMENTS)),
            "segments": [list(s) for s in data.DEMO_SEGMENTS],
            "bytes": csv_path.stat().st_size,
            "window": data.WINDOW,
            "hop": HOP,
            "windows": len(d_win),
            "flagged_normal_windows": int(d_flag[d_lab == 0].sum()),
            "normal_windows": int(np.sum(d_lab == 0)),
            "flagged_anomaly_windows": int(d_flag[d_lab != 0].sum()),
            "anomaly_windows": int(np.sum(d_lab != 0)),
        },
        "golden": {
            "frames": len(pick),
            "labels": [data.CONDITIONS[i] for i in y_test[pick]],
            "shape": [len(pick), data.WINDOW, data.CHANNELS],
            "dtype": "float32",
            "units": "g, raw (before preprocess)",
        },
        "timings_s": {
            "data": round(t_data, 1),
            "train": round(t_train, 1),
            "total": round(time.perf_counter() - t_start, 1),
        },
        "versions": tool_versions(),
    }
    write_json(out / "metrics.json", metrics)

    rates = ", ".join(f"{c} {r:.3f}" for c, r in test["per_condition_flag_rate"].items())
    dm = metrics["demo_csv"]
    print(
        f"vibration: threshold {threshold:.4f}; held-out FPR {test['false_positive_rate']:.3f}, "
        f"TPR {test['true_positive_rate']:.3f}, AUC {test['roc_auc']:.4f} (flag rate: {rates})"
    )
    print(
        f"  export max rel diff vs keras: onnx {agreement['onnx_max_rel_diff']:.2e}, "
        f"tflite {agreement['tflite_max_rel_diff']:.2e}; demo.csv flagged "
        f"{dm['flagged_anomaly_windows']}/{dm['anomaly_windows']} anomalous and "
        f"{dm['flagged_normal_windows']}/{dm['normal_windows']} normal windows"
    )
    print(
        f"  sizes: onnx {onnx_path.stat().st_size} B, tflite {tflite_path.stat().st_size} B, "
        f"csv {csv_path.stat().st_size} B; train {t_train:.1f} s, total {metrics['timings_s']['total']} s"
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
