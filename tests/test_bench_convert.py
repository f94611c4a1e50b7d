"""Smoke test of the converter acceptance bench (bench/convert.py) on a tiny trained Keras CNN.

Structure and sane (finite, positive) ratios only: no absolute time and no goal threshold is
checked, the CI machine is noisy.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("bench") is None:  # pytest run without the repo root on sys.path
    sys.path.insert(0, str(REPO))

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
pytest.importorskip("ai_edge_litert")

from bench.convert import (  # noqa: E402
    BenchConfig,
    ClassifierData,
    classifier_figures,
    format_report,
    make_hostile_keras,
    paired_latency,
    summary_rows,
)
from bench.pipeline import QuietWait  # noqa: E402
from converters.sources import quiet_tf  # noqa: E402
from edge_runtime.preprocess_spec import ImagePreprocess  # noqa: E402
from models.shapes import data as shapes_data  # noqa: E402

SIZE = 32
CLASSES = shapes_data.CLASSES


def _finite_positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    images = np.stack(
        [
            cv2.resize(shapes_data.render_sample(int(k), rng), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
            for k in labels
        ]
    )
    return images, labels


def _folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        sub = root / CLASSES[int(label)]
        sub.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(sub / f"{i:04d}.png"), image)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ClassifierData:
    """A tiny CNN with in-graph per-image standardization, trained 1 epoch, and image folders."""
    base = tmp_path_factory.mktemp("bench_convert")
    x, y = _images(200, 1)
    calib = _folder(base / "calib", *_images(40, 2))
    evals = _folder(base / "eval", *_images(60, 3))
    with quiet_tf():
        import keras
        from keras import layers, ops

        keras.utils.set_random_seed(0)
        inp = keras.Input((SIZE, SIZE, 3), name="image")
        centred = inp - ops.mean(inp, axis=(1, 2), keepdims=True)
        h = centred / ops.sqrt(ops.mean(ops.square(centred), axis=(1, 2, 3), keepdims=True) + 1e-3)
        h = layers.Conv2D(8, 3, padding="same", activation="relu")(h)
        h = layers.MaxPooling2D()(h)
        h = layers.Conv2D(16, 3, padding="same", activation="relu")(h)
        h = layers.MaxPooling2D()(h)
        h = layers.GlobalAveragePooling2D()(h)
        model = keras.Model(inp, layers.Dense(len(CLASSES), activation="softmax")(h))
        model.compile("adam", "sparse_categorical_crossentropy")
        model.fit(x[..., ::-1].astype(np.float32) / 255.0, y, epochs=1, batch_size=32, verbose=0)
        model.save(base / "tiny.keras")
    return ClassifierData(
        name="tiny",
        model=base / "tiny.keras",
        calibration=calib,
        eval_data=evals,
        preprocess=ImagePreprocess(resize="stretch", interpolation="area", color="rgb", scale=1 / 255),
        labels=CLASSES,
        calib_count=40,
        eval_count=60,
    )


def _cfg(tmp_path: Path) -> BenchConfig:
    return BenchConfig(
        threads=2, runs=10, calls=2, max_calls=2, converter_runs=5, quiet_budget_s=0.0, build_dir=tmp_path
    )


def test_classifier_figures_have_finite_ratios_and_a_report(tiny: ClassifierData, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    res = classifier_figures(
        tiny, cfg, QuietWait(0.25, 0.0), keep_float_standardization=True, log_fn=lambda _m: None
    )
    assert set(res["formats"]) == {"onnx", "tflite"}
    for f in res["formats"].values():
        assert _finite_positive(f["speedup"]), f
        assert _finite_positive(f["size_ratio"]) and _finite_positive(f["converter_speedup"])
        assert f["latency"]["rounds"] == 2 * 2  # 2 calls x (10 runs / block 5)
        assert 0.0 <= f["top1_fp32"] <= 1.0 and 0.0 <= f["top1_int8"] <= 1.0
        assert math.isfinite(f["loss_points"])
        assert (tmp_path / "convert" / "tiny" / f["int8_file"]).is_file()
    std = res["tflite_std_float"]
    assert len(std["kept_float"]) >= 3  # MEAN, SUB, ..., before the first CONV_2D
    assert std["precision"] == "mixed"
    assert _finite_positive(std["speedup"]) and _finite_positive(std["size_ratio"])

    report: dict[str, Any] = {
        "config": {"cpus": 2, "threads": 2, "onnxruntime": "x", "calls": 2, "runs": 10, "max_load": 0.25},
        "shapes96": res,
        "pruning": {"available": False, "reason": "not available yet", "ratio": 0.3},
        "detector": {"available": False, "reason": "not available yet"},
        "needed_changes": [],
    }
    rows = summary_rows(report)
    assert any("ORT int8 speedup" in r[0] for r in rows)
    assert any("standardization float" in r[0] for r in rows)
    assert all(r[3] in ("PASS", "FAIL", "-") for r in rows)
    assert sum("not available yet" in r[1] for r in rows) == 2
    text = format_report(report, "PYTHONPATH=. python bench/convert.py")
    assert "command: PYTHONPATH=. python bench/convert.py" in text
    json.dumps(report, default=str)  # --json must be able to write it


def test_hostile_model_is_float_equivalent(tiny: ClassifierData, tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((4, SIZE, SIZE, 3), dtype=np.float32)
    meta = make_hostile_keras(tiny.model, tmp_path / "hostile.keras", x, scale=1e4)
    assert meta["pool"] and 0 <= meta["channel"] < meta["channels"]
    assert meta["float_max_abs_diff"] < 1e-3
    with quiet_tf():
        import keras

        hostile = keras.models.load_model(tmp_path / "hostile.keras")
    names = [layer.name for layer in hostile.layers]
    assert names.index("hostile_scale_up") < names.index(meta["pool"]) < names.index("hostile_scale_down")


def test_paired_latency_structure(tiny: ClassifierData, tmp_path: Path) -> None:
    from converters.sources import load_source

    with quiet_tf():
        source = load_source(tiny.model)
        made = source.fp32_tflite(tmp_path / "m.tflite")
    path = tmp_path / "m.tflite"
    assert not hasattr(made, "reason")
    lat = paired_latency(path, path, _cfg(tmp_path), QuietWait(0.25, 0.0))
    assert _finite_positive(lat["speedup"]) and _finite_positive(lat["base_p50_ms"])
    assert lat["calls"] == 2 and len(lat["speedup_per_call"]) == 2


def test_hostile_figures_run_both_conversions(tiny: ClassifierData, tmp_path: Path) -> None:
    from bench.convert import hostile_figures

    res = hostile_figures(tiny, _cfg(tmp_path), log_fn=lambda _m: None)
    assert res["max_drop"] == 0.01 and isinstance(res["budget_met"], bool)
    assert res["model"]["float_max_abs_diff"] < 1e-3
    for fmt in ("onnx", "tflite"):
        f = res[fmt]
        assert math.isfinite(f["plain_loss_points"]) and math.isfinite(f["fallback_loss_points"])
        assert isinstance(f["kept_float"], list)
        assert all({"name", "reason"} <= set(k) for k in f["kept_float"])
    rows = summary_rows({"hostile": res})
    assert len(rows) == 4 and all(r[3] in ("PASS", "FAIL", "-") for r in rows)


def test_hooks_say_not_available_without_their_inputs(tiny: ClassifierData, tmp_path: Path) -> None:
    from bench.convert import NOT_AVAILABLE, detector_figures, pruning_figures

    cfg = _cfg(tmp_path)
    cfg.detector_dir = tmp_path / "no_detector"
    quiet = QuietWait(0.25, 0.0)
    assert detector_figures(cfg, quiet, log_fn=lambda _m: None) == {
        "available": False,
        "reason": NOT_AVAILABLE,
    }
    assert pruning_figures(tiny, None, cfg, quiet, log_fn=lambda _m: None)["available"] is False
    rows = summary_rows({"detector": {"available": False, "reason": NOT_AVAILABLE}})
    assert rows and rows[0][1] == NOT_AVAILABLE
