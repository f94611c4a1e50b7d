"""Full-integer int8 TFLite, per-layer damage and float fallback on real trained Keras models.

One small CNN is trained once per session on scikit-learn's 8x8 digits (seconds on a CPU); a
held-out split measures accuracy. A quantization-hostile copy of it multiplies one channel by
1e4 and divides it back later: the float model is unchanged, but a per-tensor int8 scale
stretched by that channel crushes every other channel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters.evaluate import accuracy_drop
from converters.sensitivity_tflite import (
    fallback_tflite,
    layer_errors,
    predict_tflite,
)
from converters.sources import SourceModel, keras_module, load_source, quiet_tf
from converters.tflite_quant import (
    CalibratedTFLite,
    float_compute_ops,
    io_quantization,
    quantize_tflite,
)
from converters.types import Artifact, CalibrationSet
from edge_runtime.backends import BackendOptions, LiteRTBackend
from edge_runtime.errors import CalibrationError, ConversionError

SEED = 7


@pytest.fixture(scope="module")
def digits() -> dict[str, Any]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(x))
    x, y = x[order], y[order]
    return {"x_train": x[:1400], "y_train": y[:1400], "x_test": x[1400:], "y_test": y[1400:]}


@pytest.fixture(scope="module")
def calib(digits: dict[str, Any]) -> CalibrationSet:
    """The one calibration set (training images, like the ONNX path would get)."""
    return CalibrationSet(digits["x_train"][:300], description="digits train[:300]")


@pytest.fixture(scope="module")
def held_out(digits: dict[str, Any]) -> CalibrationSet:
    return CalibrationSet(digits["x_test"], digits["y_test"], "digits held-out")


@pytest.fixture(scope="module")
def trained(digits: dict[str, Any]) -> Any:
    """Conv 32 -> conv 64 -> dense 64 -> softmax 10 (281 k parameters), trained for 8 epochs."""
    keras = keras_module()
    from keras import layers

    keras.utils.set_random_seed(SEED)
    inp = keras.Input((8, 8, 1), name="image")
    h = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inp)
    h = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(h)
    h = layers.Flatten(name="flat")(h)
    h = layers.Dense(64, activation="relu", name="fc")(h)
    out = layers.Dense(10, activation="softmax", name="probs")(h)
    model = keras.Model(inp, out, name="digits_cnn")
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    with quiet_tf():
        model.fit(digits["x_train"], digits["y_train"], epochs=8, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tflite")


@pytest.fixture(scope="module")
def source(trained: Any, work: Path) -> SourceModel:
    path = work / "digits.keras"
    with quiet_tf():
        trained.save(path)
    return load_source(path)


@pytest.fixture(scope="module")
def fp32(source: SourceModel, work: Path) -> Path:
    art = source.fp32_tflite(work / "fp32.tflite")
    assert isinstance(art, Artifact) and art.precision == "fp32"
    return art.path


@pytest.fixture(scope="module")
def hostile(trained: Any, work: Path) -> SourceModel:
    """The trained CNN with conv1's channel 0 boosted 1e4x, max-pooled, then divided back."""
    keras = keras_module()
    import tensorflow as tf
    from keras import layers

    class Scale(layers.Layer):
        def __init__(self, factors: np.ndarray, **kw: Any) -> None:
            super().__init__(**kw)
            self.factors = np.asarray(factors, np.float32)

        def call(self, x: Any) -> Any:
            return x * self.factors

    boost = np.ones(32, np.float32)
    boost[0] = 1e4
    inp = keras.Input((8, 8, 1), name="image")
    h = trained.get_layer("conv1")(inp)
    h = Scale(boost, name="boost")(h)
    h = layers.MaxPooling2D(1, name="pool")(h)
    h = Scale(1.0 / boost, name="unboost")(h)
    for name in ("conv2", "flat", "fc", "probs"):
        h = trained.get_layer(name)(h)
    model = keras.Model(inp, h, name="hostile")
    path = work / "hostile_saved_model"
    spec = tf.TensorSpec((1, 8, 8, 1), tf.float32, name="image")
    with quiet_tf():
        model.export(str(path), format="tf_saved_model", input_signature=[spec], verbose=False)
    return load_source(path)


def _top1(model: Path | bytes, data: CalibrationSet) -> float:
    out = predict_tflite(model, data.inputs)
    return float(np.mean(np.argmax(out, 1) == data.labels))


# --------------------------------------------------------------------------- int8


def test_int8_full_integer_small_and_accurate(
    source: SourceModel, fp32: Path, calib: CalibrationSet, held_out: CalibrationSet, work: Path
) -> None:
    out = work / "int8.tflite"
    art = quantize_tflite(source, out, calib)
    assert (art.format, art.precision, art.path) == ("tflite", "int8", out)
    data = out.read_bytes()
    assert float_compute_ops(data) == []
    io = io_quantization(data)
    for _name, dtype, scale, _zp in io["inputs"] + io["outputs"]:
        assert dtype == "int8" and scale > 0
    ratio = fp32.stat().st_size / out.stat().st_size
    print(f"fp32 {fp32.stat().st_size} B / int8 {out.stat().st_size} B = {ratio:.2f}x")
    assert ratio >= 3.5
    acc_f, acc_q = _top1(fp32, held_out), _top1(out, held_out)
    print(f"held-out top-1: fp32 {acc_f:.4f}, int8 {acc_q:.4f}")
    assert acc_f > 0.9
    assert acc_f - acc_q <= 0.01
    assert not list(work.glob(".*.tmp"))


def test_int8_runs_on_the_device_backend(
    source: SourceModel, calib: CalibrationSet, held_out: CalibrationSet, work: Path
) -> None:
    """LiteRTBackend reports the model's int8 scale/zero point and returns dequantized floats."""
    out = work / "int8_device.tflite"
    quantize_tflite(source, out, calib)
    backend = LiteRTBackend(out, BackendOptions(threads=2))
    try:
        spec = backend.inputs[0]
        assert spec.dtype == "int8" and spec.quantized and backend.outputs[0].quantized
        assert spec.scale is not None and spec.zero_point is not None
        hits = 0
        for x, label in zip(held_out.inputs, held_out.labels, strict=True):
            q = np.clip(np.round(x[None] / spec.scale + spec.zero_point), -128, 127).astype(np.int8)
            (probs,) = backend.run([q])
            assert probs.dtype == np.float32
            hits += int(np.argmax(probs) == label)
    finally:
        backend.close()
    assert hits / len(held_out) > 0.9


def test_float_io_option(source: SourceModel, calib: CalibrationSet, work: Path) -> None:
    out = work / "int8_floatio.tflite"
    quantize_tflite(source, out, calib, int8_io=False)
    io = io_quantization(out.read_bytes())
    assert io["inputs"][0][1] == "float32" and io["outputs"][0][1] == "float32"


def test_mixed_with_denylist(source: SourceModel, calib: CalibrationSet, work: Path) -> None:
    out = work / "mixed.tflite"
    art = quantize_tflite(source, out, calib, denylist=("CONV_2D",))
    assert art.precision == "mixed"
    floats = float_compute_ops(out.read_bytes())
    assert {op.type for op in floats} == {"CONV_2D"} and len(floats) == 2
    assert sorted(art.float_nodes) == sorted(op.name for op in floats)
    io = io_quantization(out.read_bytes())
    assert io["inputs"][0][1] == "int8"
    with pytest.raises(ConversionError, match="names no op"):
        quantize_tflite(source, work / "never.tflite", calib, denylist=("no_such_layer",))
    assert not (work / "never.tflite").exists()


def test_float_tflite_source_quantizes_too(
    fp32: Path, calib: CalibrationSet, held_out: CalibrationSet, work: Path
) -> None:
    src = load_source(fp32)
    out = work / "from_tflite_int8.tflite"
    art = quantize_tflite(src, out, calib)
    assert art.precision == "int8" and float_compute_ops(out.read_bytes()) == []
    assert _top1(fp32, held_out) - _top1(out, held_out) <= 0.01


def test_onnx_source_cannot_make_tflite(tmp_path: Path, calib: CalibrationSet) -> None:
    from conftest import build_cnn_onnx

    src = load_source(build_cnn_onnx(tmp_path / "m.onnx", size=8))
    with pytest.raises(ConversionError, match="onnx2tf"):
        quantize_tflite(src, tmp_path / "q.tflite", calib)
    assert not (tmp_path / "q.tflite").exists()


def test_calibration_problems_are_named(source: SourceModel, work: Path) -> None:
    out = work / "bad_calib.tflite"
    with pytest.raises(CalibrationError, match="empty"):
        quantize_tflite(source, out, CalibrationSet(np.zeros((0, 8, 8, 1), np.float32)))
    with pytest.raises(CalibrationError, match=r"\(9, 8, 1\)"):
        quantize_tflite(source, out, CalibrationSet(np.zeros((4, 9, 8, 1), np.float32)))
    bad = np.zeros((4, 8, 8, 1), np.float32)
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(CalibrationError, match="NaN"):
        quantize_tflite(source, out, CalibrationSet(bad))
    assert not out.exists()


def test_op_without_int8_kernel_is_refused_and_nothing_written(work: Path, calib: CalibrationSet) -> None:
    keras = keras_module()
    import tensorflow as tf
    from keras import layers, ops

    inp = keras.Input((8, 8, 1), name="image")
    h = layers.Conv2D(4, 3, padding="same")(inp)
    h = ops.sin(h)
    out = layers.Dense(3)(layers.Flatten()(h))
    path = work / "sin_saved_model"
    with quiet_tf():
        keras.Model(inp, out).export(
            str(path), format="tf_saved_model",
            input_signature=[tf.TensorSpec((1, 8, 8, 1), tf.float32, name="image")], verbose=False,
        )  # fmt: skip
    src = load_source(path)
    target = work / "sin_int8.tflite"
    target.write_bytes(b"previous model")
    with pytest.raises(ConversionError, match=r"SIN .*no int8 kernel.*--max-accuracy-drop"):
        quantize_tflite(src, target, calib)
    assert target.read_bytes() == b"previous model"
    assert not list(work.glob(".sin_int8*"))
    # kept float on purpose: a mixed model
    art = quantize_tflite(src, target, calib, denylist=("SIN",))
    assert art.precision == "mixed"
    assert [op.type for op in float_compute_ops(target.read_bytes())] == ["SIN"]
    # the fallback keeps it float by itself and says why
    res = fallback_tflite(src, calib, CalibrationSet(calib.inputs[:50]), 0.5, work / "sin_fb.tflite")
    assert res.artifact.precision == "mixed"
    assert [why for _, why in res.kept_float] == ["SIN has no int8 kernel"]


# --------------------------------------------------------------------------- damage and fallback


def test_hostile_model_loses_accuracy_and_layer_errors_find_it(
    hostile: SourceModel, calib: CalibrationSet, held_out: CalibrationSet, work: Path
) -> None:
    fp32 = hostile.float_tflite_bytes()
    session = CalibratedTFLite(hostile, calib)
    int8 = session.quantize(())
    loss = _top1(fp32, held_out) - _top1(int8, held_out)
    print(f"hostile model: plain int8 loses {loss * 100:.1f} points")
    assert loss > 0.05
    errors = layer_errors(hostile, calib, samples=16)
    worst = errors[:3]
    assert {e.op for e in worst} <= {"CONV_2D", "MUL", "MAX_POOL_2D"}
    assert any("boost" in e.name or "pool" in e.name for e in worst)
    assert all(e.sqnr_db < 10 for e in worst)
    assert all(e.sqnr_db > 20 for e in errors[3:])  # the rest quantize fine
    assert worst[0].crushed_channels > 0.9


def test_fallback_keeps_fewest_layers_float(
    hostile: SourceModel, calib: CalibrationSet, held_out: CalibrationSet, work: Path
) -> None:
    out = work / "hostile_fallback.tflite"
    artifact, kept, drop, met = fallback_tflite(hostile, calib, held_out, 0.01, out, max_trials=10)
    print(f"fallback: drop {drop:.4f}, kept float {[(n[:40], r[:60]) for n, r in kept]}")
    assert met and drop <= 0.01
    assert artifact.precision == "mixed" and artifact.path == out
    names = [n for n, _ in kept]
    assert any("boost" in n for n in names) and any("unboost" in n for n in names)
    total = len(CalibratedTFLite(hostile, calib).ops)
    assert len(kept) <= 4 < total
    assert all(reason for _, reason in kept)
    floats = {op.name for op in float_compute_ops(out.read_bytes())}
    assert floats == set(names)
    assert io_quantization(out.read_bytes())["inputs"][0][1] == "int8"
    # the written model is what was measured
    ref = predict_tflite(hostile.float_tflite_bytes(), held_out.inputs)
    measured, _ = accuracy_drop(ref, predict_tflite(out, held_out.inputs), held_out.labels)
    assert measured == pytest.approx(drop)


def test_fallback_on_a_good_model_keeps_everything_int8(
    source: SourceModel, calib: CalibrationSet, held_out: CalibrationSet, work: Path
) -> None:
    unlabeled = CalibrationSet(held_out.inputs)
    res = fallback_tflite(source, calib, unlabeled, 0.02, work / "good_fallback.tflite")
    assert res.met and res.kept_float == [] and res.artifact.precision == "int8"


def test_fallback_budget_not_met_reports_best(
    hostile: SourceModel, calib: CalibrationSet, held_out: CalibrationSet, work: Path
) -> None:
    res = fallback_tflite(hostile, calib, held_out, 0.0, work / "hostile_tight.tflite", max_trials=2)
    assert res.artifact.path.exists()
    assert res.met == (res.achieved_drop <= 0.0)
    with pytest.raises(ConversionError, match="fraction"):
        fallback_tflite(hostile, calib, held_out, 5.0, work / "x.tflite")
