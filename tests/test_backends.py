"""Tests for edge_runtime.backends with real ONNX Runtime and LiteRT sessions on real models.

ONNX outputs are compared with a numpy forward pass of the same weights (read back from the
file with onnx.numpy_helper). TFLite models come from the committed demo bundles and, for
exact references and the int8 path, from tiny FULLY_CONNECTED flatbuffers written here with
LiteRT's own schema module (no TensorFlow needed).
"""

from __future__ import annotations

import gc
import shutil
import sys
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
import numpy.typing as npt
import onnx
import pytest
from ai_edge_litert import schema_py_generated as tfl
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.backends import (
    BACKENDS,
    FORMAT_BACKEND,
    BackendOptions,
    DelegateSpec,
    Dequantizer,
    LiteRTBackend,
    OnnxRuntimeBackend,
    load_backend,
)
from edge_runtime.backends.onnxruntime import available_providers
from edge_runtime.bundle import Bundle, TrustStore, create_bundle, open_bundle
from edge_runtime.decoders.specs import RawSpec
from edge_runtime.errors import (
    BackendError,
    InferenceError,
    ModelLoadError,
    ProviderUnavailableError,
)
from edge_runtime.model import load_model
from edge_runtime.preprocess import make_preprocessor
from edge_runtime.preprocess_spec import TensorPreprocess
from edge_runtime.selftest import run_selftest
from edge_runtime.types import TensorSpec

F32 = npt.NDArray[np.float32]
REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo"
DEMO_BUNDLES = ["shapes", "vibration"]


# ================================================================== references and builders


def numpy_cnn(path: Path, x: F32) -> npt.NDArray[np.float64]:
    """The conftest CNN computed with numpy from the file's own initializers."""
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in onnx.load(path).graph.initializer}
    w1, b1, w2, b2 = weights["w1"], weights["b1"], weights["w2"], weights["b2"]
    img = x.astype(np.float64)  # (N, H, W, 3), NHWC as the model takes it
    padded = np.pad(img, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = sliding_window_view(padded, (3, 3), axis=(1, 2))  # (N, H, W, C, kh, kw)
    conv = np.einsum("nhwcij,ocij->nhwo", patches, w1) + b1
    pooled = np.maximum(conv, 0.0).mean(axis=(1, 2))  # ReLU, global average pool
    logits = pooled @ w2.T + b2
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def save_onnx(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def build_range_onnx(path: Path) -> Path:
    """y = arange(0, 10, delta): fails on delta == 0, i.e. on the all-zero warm-up input."""
    nodes = [
        helper.make_node("Squeeze", ["delta"], ["d"]),
        helper.make_node("Range", ["start", "limit", "d"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "range",
        [helper.make_tensor_value_info("delta", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        [
            numpy_helper.from_array(np.array(0, np.float32), "start"),
            numpy_helper.from_array(np.array(10, np.float32), "limit"),
        ],
    )
    return save_onnx(graph, path)


def build_dynamic_onnx(path: Path) -> Path:
    """uint8 image with a dynamic batch -> float mean per image (Cast, ReduceMean)."""
    nodes = [
        helper.make_node("Cast", ["img"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f"], ["mean"], axes=[1, 2, 3], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "dyn",
        [helper.make_tensor_value_info("img", TensorProto.UINT8, ["batch", 8, 8, 3])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch"])],
    )
    return save_onnx(graph, path)


class FC:
    """A FULLY_CONNECTED layer as a real .tflite flatbuffer, float32 or full-integer int8."""

    def __init__(self, seed: int = 0, n_in: int = 4, n_out: int = 3) -> None:
        rng = np.random.default_rng(seed)
        self.w = rng.normal(0, 0.5, (n_out, n_in)).astype(np.float32)
        self.b = rng.normal(0, 0.5, n_out).astype(np.float32)
        # int8 quantization parameters (TFLite conventions: symmetric weights, int32 bias)
        self.in_scale, self.in_zp = 0.05, 3
        self.w_scale = 0.01
        self.out_scale, self.out_zp = 0.04, -7
        self.wq = np.clip(np.round(self.w / self.w_scale), -127, 127).astype(np.int8)
        self.bq = np.round(self.b / (self.in_scale * self.w_scale)).astype(np.int32)

    def write(self, path: Path, int8: bool) -> Path:
        buffers = [tfl.BufferT()]
        tensors: list[Any] = []

        def buffer(arr: npt.NDArray[Any]) -> int:
            buf = tfl.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(arr).tobytes(), np.uint8)
            buffers.append(buf)
            return len(buffers) - 1

        def tensor(name: str, shape: tuple[int, ...], ttype: int, buf: int = 0, q: Any = None) -> int:
            t = tfl.TensorT()
            t.name, t.shape, t.type, t.buffer = name, list(shape), ttype, buf
            if q is not None:
                t.quantization = tfl.QuantizationParametersT()
                t.quantization.scale, t.quantization.zeroPoint = [q[0]], [q[1]]
            tensors.append(t)
            return len(tensors) - 1

        n_out, n_in = self.w.shape
        if int8:
            x = tensor("x", (1, n_in), tfl.TensorType.INT8, q=(self.in_scale, self.in_zp))
            w = tensor("w", (n_out, n_in), tfl.TensorType.INT8, buffer(self.wq), (self.w_scale, 0))
            b = tensor(
                "b", (n_out,), tfl.TensorType.INT32, buffer(self.bq), (self.in_scale * self.w_scale, 0)
            )
            y = tensor("y", (1, n_out), tfl.TensorType.INT8, q=(self.out_scale, self.out_zp))
        else:
            x = tensor("x", (1, n_in), tfl.TensorType.FLOAT32)
            w = tensor("w", (n_out, n_in), tfl.TensorType.FLOAT32, buffer(self.w))
            b = tensor("b", (n_out,), tfl.TensorType.FLOAT32, buffer(self.b))
            y = tensor("y", (1, n_out), tfl.TensorType.FLOAT32)
        op = tfl.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = 0, [x, w, b], [y]
        op.builtinOptionsType = tfl.BuiltinOptions.FullyConnectedOptions
        op.builtinOptions = tfl.FullyConnectedOptionsT()
        graph = tfl.SubGraphT()
        graph.tensors, graph.inputs, graph.outputs, graph.operators, graph.name = (
            tensors,
            [x],
            [y],
            [op],
            "main",
        )
        code = tfl.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = tfl.BuiltinOperator.FULLY_CONNECTED
        code.version = 4 if int8 else 1
        model = tfl.ModelT()
        model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [graph], buffers
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        path.write_bytes(bytes(builder.Output()))
        return path

    def float_reference(self, x: F32) -> npt.NDArray[np.float64]:
        return x.astype(np.float64) @ self.w.T.astype(np.float64) + self.b

    def int8_reference(self, xq: npt.NDArray[np.int8]) -> npt.NDArray[np.float64]:
        """Real-valued output of the quantized layer: dequantized inputs, weights and bias."""
        x = self.in_scale * (xq.astype(np.float64) - self.in_zp)
        real = x @ (self.w_scale * self.wq.astype(np.float64)).T + self.bq * self.in_scale * self.w_scale
        q = np.clip(np.round(real / self.out_scale) + self.out_zp, -128, 127)
        return self.out_scale * (q - self.out_zp)


def corrupt_copies(src: Path, tmp_path: Path) -> list[Path]:
    """Random bytes and the first half of ``src``, both with ``src``'s suffix."""
    junk = tmp_path / f"junk{src.suffix}"
    junk.write_bytes(np.random.default_rng(0).bytes(max(2048, src.stat().st_size)))
    half = tmp_path / f"half{src.suffix}"
    data = src.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    return [junk, half]


@pytest.fixture(scope="module")
def fc() -> FC:
    return FC()


@pytest.fixture
def fc_float(tmp_path: Path, fc: FC) -> Path:
    return fc.write(tmp_path / "fc.tflite", int8=False)


@pytest.fixture
def fc_int8(tmp_path: Path, fc: FC) -> Path:
    return fc.write(tmp_path / "fc_int8.tflite", int8=True)


# ================================================================== ONNX Runtime


def test_onnx_outputs_match_numpy_reference(cnn_onnx: Path) -> None:
    backend = OnnxRuntimeBackend(cnn_onnx, BackendOptions(threads=1))
    try:
        rng = np.random.default_rng(0)
        for _ in range(3):
            x = rng.uniform(0, 1, (1, 32, 32, 3)).astype(np.float32)
            (probs,) = backend.run([x])
            assert probs.dtype == np.float32 and probs.shape == (1, 4)
            np.testing.assert_allclose(probs, numpy_cnn(cnn_onnx, x), rtol=1e-4, atol=1e-6)
    finally:
        backend.close()


def test_onnx_io_specs(cnn_onnx: Path, tmp_path: Path) -> None:
    backend = load_backend("onnxruntime", cnn_onnx, BackendOptions(warmup_runs=0))
    assert isinstance(backend, OnnxRuntimeBackend) and backend.name == "onnxruntime"
    assert backend.inputs == [TensorSpec("input", (1, 32, 32, 3), "float32")]
    assert backend.outputs == [TensorSpec("probs", (1, 4), "float32")]
    backend.close()
    dyn = OnnxRuntimeBackend(build_dynamic_onnx(tmp_path / "dyn.onnx"))
    assert dyn.inputs == [TensorSpec("img", (None, 8, 8, 3), "uint8")]
    assert dyn.outputs == [TensorSpec("mean", (None,), "float32")]
    batch = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    (means,) = dyn.run([batch])
    np.testing.assert_allclose(means, batch.reshape(5, -1).mean(axis=1), rtol=1e-5)


def test_backend_registry() -> None:
    assert {"onnxruntime": OnnxRuntimeBackend, "litert": LiteRTBackend} == BACKENDS
    assert FORMAT_BACKEND == {"onnx": "onnxruntime", "tflite": "litert"}
    with pytest.raises(BackendError, match=r"unknown backend 'tensorflow'.*litert.*onnxruntime"):
        load_backend("tensorflow", Path("x.pb"))


@pytest.mark.parametrize("threads", [1, 3])
def test_onnx_threads_option(cnn_onnx: Path, threads: int) -> None:
    backend = OnnxRuntimeBackend(cnn_onnx, BackendOptions(threads=threads, warmup_runs=0))
    try:
        options = backend._session.get_session_options()
        assert options.intra_op_num_threads == threads
        x = np.full((1, 32, 32, 3), 0.5, np.float32)
        np.testing.assert_allclose(backend.run([x])[0], numpy_cnn(cnn_onnx, x), rtol=1e-4, atol=1e-6)
    finally:
        backend.close()


def test_onnx_warmup_really_runs_the_model(tmp_path: Path) -> None:
    """Warm-up feeds zeros: a model that cannot take zeros fails at load, not on frame one."""
    path = build_range_onnx(tmp_path / "range.onnx")
    with pytest.raises(InferenceError, match="delta"):
        OnnxRuntimeBackend(path, BackendOptions(warmup_runs=1))
    backend = OnnxRuntimeBackend(path, BackendOptions(warmup_runs=0))
    (y,) = backend.run([np.array([2.5], np.float32)])
    np.testing.assert_array_equal(y, np.arange(0, 10, 2.5, dtype=np.float32))
    with pytest.raises(InferenceError, match=r"model expects \[\[1\]\]"):
        backend.run([np.array([0.0], np.float32)])


def test_onnx_auto_and_cpu_providers(cnn_onnx: Path) -> None:
    assert "cpu" in available_providers()
    assert "cuda" not in available_providers()  # this machine's onnxruntime is the CPU build
    auto = OnnxRuntimeBackend(cnn_onnx, BackendOptions(providers=("auto",), warmup_runs=0))
    assert auto.providers == ["CPUExecutionProvider"]
    cpu = OnnxRuntimeBackend(cnn_onnx, BackendOptions(providers=("cpu",), warmup_runs=0))
    assert cpu.providers == ["CPUExecutionProvider"]
    x = np.random.default_rng(3).uniform(0, 1, (1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(auto.run([x])[0], cpu.run([x])[0])


@pytest.mark.parametrize(
    ("provider", "hint"),
    [("cuda", "onnxruntime-gpu"), ("tensorrt", "TensorRT"), ("openvino", "onnxruntime-openvino")],
)
def test_onnx_unavailable_provider_says_what_to_install(cnn_onnx: Path, provider: str, hint: str) -> None:
    with pytest.raises(ProviderUnavailableError) as err:
        OnnxRuntimeBackend(cnn_onnx, BackendOptions(providers=(provider, "cpu")))
    msg = str(err.value)
    assert f"{provider!r} was requested" in msg and hint in msg and "'cpu'" in msg


@pytest.mark.parametrize("provider", ["gpu", "CUDAExecutionProvider", ""])
def test_onnx_unknown_provider(cnn_onnx: Path, provider: str) -> None:
    with pytest.raises(ProviderUnavailableError, match=r"unknown execution provider .*choose from .*'auto'"):
        OnnxRuntimeBackend(cnn_onnx, BackendOptions(providers=(provider,)))


def test_onnx_corrupt_and_truncated_models(cnn_onnx: Path, tmp_path: Path) -> None:
    for bad in corrupt_copies(cnn_onnx, tmp_path):
        with pytest.raises(ModelLoadError, match=rf"cannot load {bad.name}.*corrupt, truncated"):
            OnnxRuntimeBackend(bad)
    with pytest.raises(ModelLoadError, match=r"cannot read ONNX model .*missing\.onnx"):
        OnnxRuntimeBackend(tmp_path / "missing.onnx")


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((1, 16, 16, 3), np.float32),
        np.zeros((1, 3, 32, 32), np.float32),
        np.zeros((32, 32, 3), np.float32),
        np.zeros((1, 32, 32, 3), np.float64),
        np.zeros((1, 32, 32, 3), np.uint8),
    ],
)
def test_onnx_wrong_input_is_an_inference_error(cnn_onnx: Path, bad: F32) -> None:
    backend = OnnxRuntimeBackend(cnn_onnx, BackendOptions(warmup_runs=0))
    with pytest.raises(InferenceError) as err:
        backend.run([bad])
    assert f"inputs [{list(bad.shape)}]" in str(err.value) and "[[1, 32, 32, 3]]" in str(err.value)
    # the session is still usable afterwards
    x = np.zeros((1, 32, 32, 3), np.float32)
    np.testing.assert_allclose(backend.run([x])[0], numpy_cnn(cnn_onnx, x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("count", [0, 2])
def test_wrong_number_of_inputs_is_an_inference_error(cnn_onnx: Path, fc_float: Path, count: int) -> None:
    """Both backends report a wrong input count as InferenceError (not a bare ValueError)."""
    x = np.zeros((1, 32, 32, 3), np.float32)
    lite = LiteRTBackend(fc_float, BackendOptions(warmup_runs=0))
    with pytest.raises(InferenceError):
        lite.run([np.zeros((1, 4), np.float32)] * count)
    backend = OnnxRuntimeBackend(cnn_onnx, BackendOptions(warmup_runs=0))
    with pytest.raises(InferenceError):
        backend.run([x] * count)


# ================================================================== LiteRT on hand-built models


def test_litert_float_model_matches_numpy(fc_float: Path, fc: FC) -> None:
    backend = load_backend("litert", fc_float, BackendOptions(threads=1))
    assert isinstance(backend, LiteRTBackend) and backend.name == "litert"
    assert backend.inputs == [TensorSpec("x", (1, 4), "float32")]
    assert backend.outputs == [TensorSpec("y", (1, 3), "float32")]
    x = np.random.default_rng(5).normal(0, 1, (1, 4)).astype(np.float32)
    (y,) = backend.run([x])
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, fc.float_reference(x), rtol=1e-5, atol=1e-5)
    backend.close()


def test_litert_int8_model_specs_and_dequantized_outputs(fc_int8: Path, fc: FC) -> None:
    backend = LiteRTBackend(fc_int8, BackendOptions(threads=1))
    (inp,), (out,) = backend.inputs, backend.outputs
    assert (inp.name, inp.shape, inp.dtype, inp.zero_point) == ("x", (1, 4), "int8", fc.in_zp)
    assert inp.scale == pytest.approx(fc.in_scale) and inp.quantized
    assert (out.name, out.shape, out.dtype, out.zero_point) == ("y", (1, 3), "int8", fc.out_zp)
    assert out.scale == pytest.approx(fc.out_scale) and out.quantized
    rng = np.random.default_rng(6)
    for _ in range(20):
        xq = rng.integers(-128, 128, (1, 4)).astype(np.int8)
        (y,) = backend.run([xq])
        assert y.dtype == np.float32
        # the runtime's fixed-point requantization may round the other way: one quantum at most
        np.testing.assert_allclose(y, fc.int8_reference(xq), atol=fc.out_scale * 1.01)
        # and outputs lie exactly on the output quantization grid
        np.testing.assert_allclose(
            y / fc.out_scale + fc.out_zp, np.round(y / fc.out_scale + fc.out_zp), atol=1e-3
        )


def test_int8_bundle_end_to_end(tmp_path: Path, fc_int8: Path, fc: FC, keys: tuple[Path, Path]) -> None:
    """Float sensor windows -> quantized input -> int8 LiteRT -> dequantized outputs -> self-test."""
    rng = np.random.default_rng(7)
    windows = rng.normal(0, 1.5, (6, 2, 2)).astype(np.float32)
    root = create_bundle(
        tmp_path / "int8",
        models=[fc_int8],
        name="fc-int8",
        version="1.0.0",
        task="regression",
        preprocess=TensorPreprocess(layout="flat", window=2, channels=2),
        decoder=RawSpec(),
        golden_frames=windows,
        sign_key=keys[0],
    )
    bundle = open_bundle(root, require_signature=False)
    entry = bundle.model_entry("tflite")
    assert entry.precision == "int8"
    assert entry.inputs[0].scale == pytest.approx(fc.in_scale) and entry.inputs[0].zero_point == fc.in_zp
    model = load_model(bundle, "tflite")
    try:
        assert run_selftest(model).passed
        for window in windows:
            (y,), _ = model.infer(window)
            xq = np.clip(np.round(window.reshape(1, 4) / fc.in_scale) + fc.in_zp, -128, 127).astype(np.int8)
            np.testing.assert_allclose(y, fc.int8_reference(xq), atol=fc.out_scale * 1.01)
            # and close to the float layer, within the quantization error
            np.testing.assert_allclose(y, fc.float_reference(window.reshape(1, 4)), atol=0.2)
    finally:
        model.close()


def test_litert_corrupt_and_truncated_models(fc_float: Path, tmp_path: Path) -> None:
    for bad in corrupt_copies(fc_float, tmp_path):
        with pytest.raises(ModelLoadError, match=rf"cannot load {bad.name}.*corrupt, truncated"):
            LiteRTBackend(bad)
    with pytest.raises(ModelLoadError, match=r"cannot read TFLite model .*missing\.tflite"):
        LiteRTBackend(tmp_path / "missing.tflite")


def load_with_missing_delegate(model: Path, library: str) -> tuple[str, list[str]]:
    """Load ``model`` with a delegate library that does not exist.

    Returns the ProviderUnavailableError message and the "Exception ignored in ..." errors
    raised while the failed attempt's objects were freed. Those are caught here, while the
    objects are freed on purpose, so they cannot surface later in an unrelated test.
    """
    ignored: list[str] = []
    old_hook = sys.unraisablehook

    def hook(args: Any) -> None:
        ignored.append(f"{args.exc_type.__name__}: {args.exc_value} in {args.object!r}")

    sys.unraisablehook = hook
    try:
        try:
            LiteRTBackend(model, BackendOptions(delegates=(DelegateSpec(library, {"device": "usb"}),)))
        except ProviderUnavailableError as exc:
            message = str(exc)
        else:
            pytest.fail("a missing delegate library was accepted")
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    return message, ignored


def test_litert_missing_delegate_library(fc_float: Path) -> None:
    message, _ = load_with_missing_delegate(fc_float, "libedgetpu-does-not-exist.so.1")
    assert "'libedgetpu-does-not-exist.so.1' could not be loaded" in message
    assert "install the delegate library" in message and "[model] delegates" in message


def test_litert_missing_delegate_leaves_no_broken_delegate_behind(fc_float: Path) -> None:
    """No half-built LiteRT Delegate whose __del__ raises later ("Exception ignored in ...")."""
    _, ignored = load_with_missing_delegate(fc_float, "libedgetpu-does-not-exist.so.1")
    assert ignored == []


@pytest.mark.parametrize(
    "bad", [np.zeros((1, 5), np.float32), np.zeros((2, 4), np.float32), np.zeros((1, 4), np.int8)]
)
def test_litert_wrong_input_is_an_inference_error(fc_float: Path, fc: FC, bad: F32) -> None:
    backend = LiteRTBackend(fc_float, BackendOptions(warmup_runs=0))
    with pytest.raises(InferenceError, match=r"LiteRT invoke failed.*model expects \[\[1, 4\]\]"):
        backend.run([bad])
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(backend.run([x])[0], fc.float_reference(x), rtol=1e-5, atol=1e-5)


# ================================================================== LiteRT on the demo bundles


def demo_bundle(name: str) -> Path:
    root = DEMO / name
    assert (root / "model.tflite").is_file(), f"demo bundle {root} has no model.tflite"
    return root


def open_demo(name: str) -> Bundle:
    """A demo bundle, verified against the demo public key that ships with it."""
    bundle = open_bundle(demo_bundle(name), trust=TrustStore.from_files([DEMO / "keys" / "demo.pub"]))
    assert bundle.signed_by is not None
    return bundle


@pytest.mark.parametrize("name", DEMO_BUNDLES)
def test_demo_tflite_agrees_with_its_onnx_model(name: str) -> None:
    """Both models of a demo bundle give the same outputs on its golden inputs."""
    bundle = open_demo(name)
    lite_entry, onnx_entry = bundle.model_entry("tflite"), bundle.model_entry("onnx")
    lite = LiteRTBackend(bundle.path(lite_entry.path), BackendOptions(threads=2))
    ort_backend = OnnxRuntimeBackend(bundle.path(onnx_entry.path), BackendOptions(threads=2))
    try:
        assert [s.to_dict() for s in lite.inputs] == [t.to_spec().to_dict() for t in lite_entry.inputs]
        assert [s.to_dict() for s in lite.outputs] == [t.to_spec().to_dict() for t in lite_entry.outputs]
        assert [s.shape for s in lite.inputs] == [s.shape for s in ort_backend.inputs]
        assert [s.shape for s in lite.outputs] == [s.shape for s in ort_backend.outputs]
        data = bundle.selftest_data()
        pre_lite = make_preprocessor(bundle.manifest.preprocess, lite.inputs[0])
        pre_onnx = make_preprocessor(bundle.manifest.preprocess, ort_backend.inputs[0])
        buf_lite, buf_onnx = pre_lite.new_buffer(), pre_onnx.new_buffer()
        for i, frame in enumerate(data["frames"]):
            pre_lite(frame, buf_lite)
            pre_onnx(frame, buf_onnx)
            out_lite, out_onnx = lite.run([buf_lite]), ort_backend.run([buf_onnx])
            for k, (a, b) in enumerate(zip(out_lite, out_onnx, strict=True)):
                scale = lite.outputs[k].scale or 0.0
                np.testing.assert_allclose(a, b, atol=max(1e-4, 2 * scale), rtol=1e-3)
                np.testing.assert_allclose(a, data[f"tflite.out{k}"][i], atol=1e-5, rtol=1e-5)
    finally:
        lite.close()
        ort_backend.close()


@pytest.mark.parametrize("name", DEMO_BUNDLES)
def test_demo_tflite_selftest_and_warmup(name: str) -> None:
    bundle = open_demo(name)
    model = load_model(bundle, "tflite", BackendOptions(threads=1, warmup_runs=3))
    try:
        report = run_selftest(model)
        assert report.passed and report.matched == report.frames > 0
    finally:
        model.close()


@pytest.mark.parametrize("name", DEMO_BUNDLES)
def test_demo_tflite_corrupt_and_truncated(name: str, tmp_path: Path) -> None:
    src = demo_bundle(name) / "model.tflite"
    for bad in corrupt_copies(src, tmp_path):
        with pytest.raises(ModelLoadError, match=rf"LiteRT cannot load {bad.name}"):
            LiteRTBackend(bad)


def test_demo_tflite_missing_delegate(tmp_path: Path) -> None:
    src = shutil.copyfile(demo_bundle("shapes") / "model.tflite", tmp_path / "model.tflite")
    message, _ = load_with_missing_delegate(src, "libnope.so")
    assert "'libnope.so' could not be loaded" in message


# ================================================================== Dequantizer


@pytest.mark.parametrize(
    ("dtype", "scale", "zero_point"),
    [("int8", 0.0173, -7), ("uint8", 0.0039215, 128), ("int16", 0.00012, 0), ("int8", 1.0, 0)],
)
def test_dequantizer_formula(dtype: str, scale: float, zero_point: int) -> None:
    info = np.iinfo(dtype)
    raw = np.random.default_rng(1).integers(info.min, info.max + 1, (2, 50)).astype(dtype)
    dq = Dequantizer(TensorSpec("y", (2, 50), dtype, scale, zero_point))
    out = dq(raw)
    assert out.dtype == np.float32 and out.shape == raw.shape
    np.testing.assert_allclose(out, scale * (raw.astype(np.float64) - zero_point), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(raw, np.random.default_rng(1).integers(info.min, info.max + 1, (2, 50)))


def test_dequantizer_float_and_unquantized() -> None:
    floats = np.linspace(-1, 1, 7, dtype=np.float32)
    assert Dequantizer(TensorSpec("y", (7,), "float32"))(floats) is floats
    ints = np.arange(-3, 4, dtype=np.int32)
    out = Dequantizer(TensorSpec("y", (7,), "int32"))(ints)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, ints.astype(np.float64))
    # an int8 tensor without quantization parameters is cast, not scaled
    raw = np.array([-128, 0, 127], np.int8)
    np.testing.assert_array_equal(Dequantizer(TensorSpec("y", (3,), "int8"))(raw), [-128.0, 0.0, 127.0])
