"""Source models: every input kind produces what it can, Skipped with a reason otherwise.

Keras/SavedModel sources are small real Keras CNNs (random weights are enough to compare
exports numerically); ONNX and float TFLite sources are the committed trained demo models.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters.sources import SourceModel, keras_module, load_source, quiet_tf
from converters.types import Artifact, CalibrationSet, Skipped
from edge_runtime.errors import ConversionError

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo" / "shapes"
SIZE = 16


def _cnn(input_shape: tuple[int | None, ...] = (SIZE, SIZE, 3)) -> Any:
    keras = keras_module()
    from keras import layers

    keras.utils.set_random_seed(3)
    inp = keras.Input(input_shape, name="image")
    h = layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    h = layers.GlobalAveragePooling2D()(h)
    out = layers.Dense(4, activation="softmax", name="probs")(h)
    return keras.Model(inp, out)


@pytest.fixture(scope="module")
def keras_model() -> Any:
    return _cnn()


@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    return np.random.default_rng(0).random((1, SIZE, SIZE, 3), dtype=np.float32)


def _run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def _run_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    interp.allocate_tensors()
    detail = interp.get_input_details()[0]
    assert list(detail["shape"]) == list(x.shape)
    interp.set_tensor(detail["index"], x)
    interp.invoke()
    return np.asarray(interp.get_tensor(interp.get_output_details()[0]["index"]))


def _check_all(src: SourceModel, out: Path, x: np.ndarray, expected: np.ndarray) -> None:
    onnx_art = src.fp32_onnx(out / "m.onnx")
    tfl_art = src.fp32_tflite(out / "m.tflite")
    f16_art = src.fp16_tflite(out / "m16.tflite")
    for art, precision in ((onnx_art, "fp32"), (tfl_art, "fp32"), (f16_art, "fp16")):
        assert isinstance(art, Artifact) and art.precision == precision and art.path.is_file()
    np.testing.assert_allclose(_run_onnx(out / "m.onnx", x), expected, atol=1e-5)
    np.testing.assert_allclose(_run_tflite(out / "m.tflite", x), expected, atol=1e-5)
    np.testing.assert_allclose(_run_tflite(out / "m16.tflite", x), expected, atol=2e-2)
    assert (out / "m16.tflite").stat().st_size < (out / "m.tflite").stat().st_size
    assert not list(out.glob(".*.tmp"))


def test_keras_source(keras_model: Any, sample: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "cnn.keras"
    with quiet_tf():
        keras_model.save(path)
        expected = keras_model.predict(sample, verbose=0)
    src = load_source(path)
    assert (src.kind, src.input_name, src.input_shape, src.layout) == (
        "keras",
        "image",
        (1, SIZE, SIZE, 3),
        "nhwc",
    )
    assert [o.name for o in src.outputs] == ["probs"]
    assert src.tflite_unavailable_reason() is None
    _check_all(src, tmp_path, sample, expected)
    import onnx

    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["probs"]
    tmp = src.saved_model_dir()
    assert tmp.is_dir()
    src.close()
    assert not tmp.exists()


def test_saved_model_source_with_dynamic_batch(keras_model: Any, sample: np.ndarray, tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    with quiet_tf():
        keras_model.export(str(saved), format="tf_saved_model", verbose=False)  # batch None
        expected = keras_model.predict(sample, verbose=0)
    before = sorted(p.relative_to(saved) for p in saved.rglob("*"))
    with load_source(saved) as src:
        assert src.kind == "saved_model" and src.input_shape == (1, SIZE, SIZE, 3)
        assert src.saved_model_dir() != saved  # re-saved with batch 1
        out = tmp_path / "out"
        _check_all(src, out, sample, expected)
    assert sorted(p.relative_to(saved) for p in saved.rglob("*")) == before  # source untouched


def test_onnx_source_copies_and_skips_tflite(tmp_path: Path) -> None:
    src = load_source(DEMO / "model.onnx")
    assert (src.kind, src.input_name, src.input_shape, src.layout) == (
        "onnx",
        "image",
        (1, 64, 64, 3),
        "nhwc",
    )
    art = src.fp32_onnx(tmp_path / "copy.onnx")
    assert isinstance(art, Artifact)
    assert (tmp_path / "copy.onnx").read_bytes() == (DEMO / "model.onnx").read_bytes()
    for made in (src.fp32_tflite(tmp_path / "a.tflite"), src.fp16_tflite(tmp_path / "b.tflite")):
        assert isinstance(made, Skipped) and "onnx2tf" in made.reason and "pip install onnx2tf" in made.reason
    assert not (tmp_path / "a.tflite").exists()


def test_float_tflite_source(tmp_path: Path) -> None:
    from models.shapes import data

    src = load_source(DEMO / "model.tflite")
    assert src.kind == "tflite" and src.input_shape == (1, 64, 64, 3) and src.layout == "nhwc"
    art = src.fp32_tflite(tmp_path / "copy.tflite")
    assert isinstance(art, Artifact)
    assert (tmp_path / "copy.tflite").read_bytes() == (DEMO / "model.tflite").read_bytes()
    f16 = src.fp16_tflite(tmp_path / "f16.tflite")
    assert isinstance(f16, Skipped) and "Keras or SavedModel" in f16.reason
    onnx_art = src.fp32_onnx(tmp_path / "from_tflite.onnx")
    assert isinstance(onnx_art, Artifact) and "from_tflite" in onnx_art.notes[0]
    images, _ = data.make_dataset(4, seed=99)
    for bgr in images:
        x = data.preprocess(bgr)[None]
        np.testing.assert_allclose(
            _run_onnx(tmp_path / "from_tflite.onnx", x), _run_tflite(DEMO / "model.tflite", x), atol=1e-4
        )


def test_unknown_input_dims_need_input_shape(tmp_path: Path, sample: np.ndarray) -> None:
    path = tmp_path / "fcn.keras"
    model = _cnn((None, None, 3))
    with quiet_tf():
        model.save(path)
        expected = model.predict(sample, verbose=0)
    with pytest.raises(ConversionError, match=r"unknown dimensions.*input_shape"):
        load_source(path)
    with pytest.raises(ConversionError, match="does not fit"):
        load_source(path, input_shape=(1, SIZE, 3))
    src = load_source(path, input_shape=(1, SIZE, SIZE, 3))
    assert src.input_shape == (1, SIZE, SIZE, 3)
    assert isinstance(src.fp32_tflite(tmp_path / "fcn.tflite"), Artifact)
    np.testing.assert_allclose(_run_tflite(tmp_path / "fcn.tflite", sample), expected, atol=1e-5)


def test_quantized_tflite_is_not_a_source(keras_model: Any, tmp_path: Path) -> None:
    from converters.tflite_quant import quantize_tflite

    path = tmp_path / "cnn.keras"
    with quiet_tf():
        keras_model.save(path)
    calib = CalibrationSet(np.random.default_rng(1).random((8, SIZE, SIZE, 3), dtype=np.float32))
    quantize_tflite(load_source(path), tmp_path / "q.tflite", calib)
    with pytest.raises(ConversionError, match=r"already quantized.*float"):
        load_source(tmp_path / "q.tflite")


# --------------------------------------------------------------------------- refused inputs


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.onnx", "does not exist"),
        (lambda d: _write(d / "model.pt", b"torch"), r"unsupported model type '\.pt'.*torch\.onnx\.export"),
        (lambda d: _write(d / "model.xyz", b"?"), "unsupported model type"),
        (lambda d: _write(d / "bad.onnx", b"\x08\x07garbage" * 10), "not a readable ONNX model"),
        (
            lambda d: _write(d / "bad.tflite", (DEMO / "model.tflite").read_bytes()[:200]),
            "not a readable TFLite",
        ),
        (lambda d: _write(d / "bad.keras", b"not a zip"), r"not a valid \.keras file"),
        (lambda d: (d / "empty_dir").mkdir() or d / "empty_dir", "not a SavedModel"),
    ],
)
def test_unusable_files_raise_conversion_error(make: Any, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=message):
        load_source(make(tmp_path))


def test_corrupt_saved_model(tmp_path: Path) -> None:
    bad = tmp_path / "sm"
    bad.mkdir()
    (bad / "saved_model.pb").write_bytes(b"\x00\x01broken")
    with pytest.raises(ConversionError, match="cannot load the SavedModel"):
        load_source(bad)


def test_several_inputs_are_refused(tmp_path: Path) -> None:
    keras = keras_module()
    from keras import layers

    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    model = keras.Model([a, b], layers.Dense(2)(layers.Concatenate()([a, b])))
    with quiet_tf():
        model.save(tmp_path / "two.keras")
    with pytest.raises(ConversionError, match=r"2 inputs.*exactly one input"):
        load_source(tmp_path / "two.keras")

    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["z"])],
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("x", "y")],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "two.onnx")
    with pytest.raises(ConversionError, match="exactly one input"):
        load_source(tmp_path / "two.onnx")


def test_lambda_layers_need_trust(tmp_path: Path) -> None:
    keras = keras_module()
    from keras import layers

    inp = keras.Input((4,), name="x")
    with quiet_tf():
        keras.Model(inp, layers.Lambda(lambda t: t * 2.0)(inp)).save(tmp_path / "lam.keras")
    with pytest.raises(ConversionError, match="trusted=True"):
        load_source(tmp_path / "lam.keras")
    assert load_source(tmp_path / "lam.keras", trusted=True).input_shape == (1, 4)


def test_demo_copy_is_left_alone(tmp_path: Path) -> None:
    """Sources never write next to the source model."""
    copy = tmp_path / "src"
    shutil.copytree(DEMO, copy)
    src = load_source(copy / "model.tflite")
    src.fp32_tflite(tmp_path / "out.tflite")
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in DEMO.iterdir())
