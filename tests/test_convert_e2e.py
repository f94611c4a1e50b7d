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


def _convert_onnx(model: Path, out: Path, calib: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return edgert(
        "convert", str(model), "--out", str(out), "--calibration", str(calib), "--name", "m",
        "--formats", "onnx", "--latency-runs", "10", *extra,
    )  # fmt: skip


def test_keep_float_and_float_input_ops(tmp_path: Path) -> None:
    model = build_cnn_onnx(tmp_path / "m.onnx", size=32)
    calib = tmp_path / "calib.npz"
    frames = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    np.savez(calib, inputs=frames[..., ::-1].astype(np.float32), frames=frames)
    # an unknown op name is refused before anything is written, naming it
    proc = _convert_onnx(model, tmp_path / "bad", calib, "--keep-float", "no_such_node")
    assert proc.returncode == 1 and "no_such_node" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()
    # the op before the first Conv (the NHWC->NCHW Transpose) stays float on request
    import onnx as onnx_mod

    first = onnx_mod.load(str(model)).graph.node[0]
    assert first.op_type == "Transpose"
    out = tmp_path / "float_in"
    proc = _convert_onnx(model, out, calib, "--float-input-ops", "float", "--scale", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    int8 = next(a for a in report["artifacts"] if a["precision"] != "fp32")
    assert int8["precision"] == "mixed" and int8["float_nodes"]
    # auto measures both variants and records the measured ratio and the choice
    out = tmp_path / "auto"
    proc = _convert_onnx(model, out, calib, "--scale", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    choice = report["float_input_ops"]["onnx"]
    assert choice["speedup_float_vs_int8"] > 0 and isinstance(choice["kept_float"], bool)
    int8 = next(a for a in report["artifacts"] if a["precision"] != "fp32")
    assert (int8["precision"] == "mixed") == choice["kept_float"]


def test_detector_is_scored_by_map50_with_ground_truth_boxes(tmp_path: Path) -> None:
    import onnxruntime as ort
    from conftest import build_yolo_onnx

    from edge_runtime.decoders import YoloDecoder, YoloSpec

    model = build_yolo_onnx(tmp_path / "yolo.onnx", size=64, classes=3)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (60, 64, 64, 3)).astype(np.float32)
    # ground truth = the fp32 model's own detections, so fp32 scores mAP 1.0 only if the
    # boxes are read as ground truth in the model's pixel coordinates
    spec = YoloSpec(layout="v8", normalized=False, conf_threshold=0.25, max_detections=20)
    decoder = YoloDecoder(spec, ["a", "b", "c"])
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rows = []
    for i in range(len(x)):
        for d in decoder.decode(sess.run(None, {"input": x[i : i + 1]}), None)["detections"]:
            rows.append([i, d["class_id"], *d["box"]])
    assert len(rows) > 20
    data = tmp_path / "det.npz"
    frames = (x[..., ::-1] * 255).round().astype(np.uint8)  # BGR frames for the golden self-test
    np.savez(data, inputs=x, frames=frames, boxes=np.array(rows, np.float64))
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    out = tmp_path / "out"
    proc = _convert_onnx(
        model, out, data, "--eval", str(data), "--decoder", "yolo", "--labels", str(labels),
        "--decoder-opt", "conf_threshold=0.25", "--decoder-opt", "normalized=false",
        "--max-accuracy-drop", "0.05",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["detection_ground_truth"] is True
    rows_by = {a["precision"]: a for a in report["artifacts"]}
    assert rows_by["fp32"]["metric"]["map50"] > 0.99
    q = next(a for p, a in rows_by.items() if p != "fp32")
    assert "map50" in q["metric"] and q["metric_drop_points"] <= 5.0
    assert "mAP" in json.dumps(report["fallback"]["onnx"])
    # malformed ground truth is refused with the expected layout named
    bad = tmp_path / "bad.npz"
    np.savez(bad, inputs=x, boxes=np.zeros((5, 4)))
    proc = _convert_onnx(model, tmp_path / "o2", bad, "--decoder", "yolo")
    assert proc.returncode == 1 and "sample, class, x1, y1, x2, y2" in proc.stderr
