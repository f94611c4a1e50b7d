"""`edgert convert` end to end: a real trained Keras model to a signed int8 bundle the daemon runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest
from conftest import REPO, build_cnn_onnx
from onnx import TensorProto, helper

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}


def edgert(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_runtime", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        check=False,
    )


def convert_digits(digits: dict[str, Any], out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`edgert convert` of the digits model with its calibration, evaluation data and labels."""
    return edgert(
        "convert", str(digits["model"]), "--out", str(out), "--calibration", str(digits["base"] / "calib"),
        "--eval", str(digits["base"] / "eval"), "--labels", str(digits["labels"]), "--name", "digits", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """scikit-learn's digits as labelled 32x32 BGR image folders, and a small Keras CNN trained on them."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    from sklearn.datasets import load_digits

    base = tmp_path_factory.mktemp("digits")
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.images))
    images = np.stack(
        [
            cv2.cvtColor(
                cv2.resize((d.images[i] * 16).clip(0, 255).astype(np.uint8), (32, 32)), cv2.COLOR_GRAY2BGR
            )
            for i in order
        ]
    )
    labels = d.target[order]
    for split, (a, b) in {"calib": (0, 1200), "eval": (1200, len(images))}.items():
        for i in range(a, b):
            folder = base / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{i}.png"), images[i])
    from converters.sources import quiet_tf

    with quiet_tf():
        return _train(keras, base, images, labels)


def _train(keras: Any, base: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(16, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x = images[:1200, :, :, ::-1].astype(np.float32) / 255.0
    model.fit(x, labels[:1200], epochs=6, verbose=0)
    path = base / "digits.keras"
    model.save(path)
    (base / "labels.txt").write_text("".join(f"{i}\n" for i in range(10)))
    return {"base": base, "model": path, "labels": base / "labels.txt"}


def test_convert_keras_to_signed_int8_bundle_that_the_daemon_runs(
    digits: dict[str, Any], tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    out = tmp_path / "out"
    packed = tmp_path / "digits.edgebundle"
    proc = convert_digits(
        digits,
        out,
        "--version",
        "2.1.0",
        "--sign-key",
        str(keys[0]),
        "--pack",
        str(packed),
        "--eval-count",
        "400",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = {(a["format"], a["precision"]): a for a in report["artifacts"]}
    assert set(rows) == {("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"), ("tflite", "int8")}
    for fmt in ("onnx", "tflite"):
        fp32, int8 = rows[(fmt, "fp32")], rows[(fmt, "int8")]
        assert fp32["metric"]["top1"] > 0.9
        assert int8["metric_drop_points"] <= 2.0  # same calibration, device preprocessing
        assert int8["size_ratio_vs_fp32"] > 2.0  # tiny model: graph overhead weighs in
        assert int8["agreement"]["top1"] > 0.95
        assert report["per_layer"][fmt]
    assert "report.html" in os.listdir(out) and "<svg" in (out / "report.html").read_text()
    # The signed bundle runs in the daemon with its signature checked and its self-test passed.
    for fmt in ("onnx", "tflite"):
        run = edgert(
            "run",
            "--bundle",
            str(packed),
            "--format",
            fmt,
            "--source",
            str(digits["base"] / "eval" / "4"),
            "--trust-key",
            str(keys[1]),
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        results = [json.loads(line) for line in run.stdout.splitlines()]
        assert results and sum(r["top"][0]["label"] == "4" for r in results) / len(results) > 0.9
        assert all(r["model"] == "digits@2.1.0" for r in results)
    man = json.loads((out / "bundle" / "manifest.json").read_text())
    assert {m["format"]: m["precision"] for m in man["models"]} == {"onnx": "int8", "tflite": "int8"}
    assert man["report"] == "report.json"


def test_empty_calibration_folder_fails_cleanly(digits: dict[str, Any], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    proc = edgert(
        "convert",
        str(digits["model"]),
        "--out",
        str(out),
        "--calibration",
        str(empty),
        "--name",
        "x",
        "--formats",
        "onnx",
    )
    assert proc.returncode == 1
    assert "empty" in proc.stderr.lower() or "no images" in proc.stderr.lower()
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_wrong_calibration_shape_fails_with_fix(tmp_path: Path) -> None:
    model = build_cnn_onnx(tmp_path / "m.onnx", size=32)
    bad = tmp_path / "calib.npz"
    np.savez(bad, inputs=np.zeros((10, 48, 48, 3), np.float32))
    proc = edgert(
        "convert",
        str(model),
        "--out",
        str(tmp_path / "out"),
        "--calibration",
        str(bad),
        "--name",
        "x",
        "--formats",
        "onnx",
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "48" in proc.stderr and "32" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_unsupported_operator_fails_with_fix(tmp_path: Path) -> None:
    node = helper.make_node("FancyOp", ["input"], ["out"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "custom",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8, 8, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 8, 3])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, inputs=np.zeros((4, 8, 8, 3), np.float32))
    proc = edgert(
        "convert",
        str(path),
        "--out",
        str(tmp_path / "out"),
        "--calibration",
        str(calib),
        "--name",
        "x",
        "--formats",
        "onnx",
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "FancyOp" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_accuracy_budget_is_reported_for_both_formats(digits: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = convert_digits(
        digits,
        out,
        "--max-accuracy-drop",
        "0.02",
        "--eval-count",
        "300",
        "--calibration-count",
        "100",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    fallback = report["fallback"]
    assert fallback["max_drop"] == 0.02
    assert fallback["onnx"]["met_budget"] and fallback["tflite"]["met_budget"]
    assert set(fallback["kept_float"]) == {"onnx", "tflite"}
    assert report["status"]["ok"] is True
    # A negative budget is refused before any work, naming the option.
    worse = tmp_path / "worse"
    proc = edgert(
        "convert",
        str(digits["model"]),
        "--out",
        str(worse),
        "--calibration",
        str(digits["base"] / "calib"),
        "--name",
        "digits",
        "--max-accuracy-drop",
        "-0.5",
    )
    assert proc.returncode == 1 and "--max-accuracy-drop" in proc.stderr
    assert not worse.exists()
