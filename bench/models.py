"""Benchmark models: a MobileNetV2 built with ``onnx.helper`` and wrapped into a bundle.

The network follows MobileNetV2 (Sandler et al. 2018) layer for layer: a 3x3/2 stem, 17
inverted residual blocks (1x1 expand, 3x3 depthwise, linear 1x1 project, residual add when
the shape allows), a 1x1 conv to 1280 channels, global average pooling and a 1000-class
``Gemm`` head with softmax. Batch norm is folded into the conv biases (so there are no BN
nodes) and ReLU6 is ``Clip(0, 6)``. The weights are seeded He-normal random values: the
figures are about speed, and a random MobileNetV2 costs exactly what a trained one does.

The input is NHWC float32 (``1 x 224 x 224 x 3``) followed by a ``Transpose`` to NCHW, like a
TensorFlow export, so the same :func:`bench_preprocess` (stretch, RGB, ``x / 127.5 - 1``,
NHWC) suits both the ONNX model and an optional Keras-built ``.tflite`` one.

Built files are cached under ``bench/build/`` (git-ignored), keyed by their settings, so a
second run of the bench reuses them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "BUILD_DIR",
    "MobileNetV2Config",
    "bench_preprocess",
    "build_mobilenet_v2_onnx",
    "build_mobilenet_v2_tflite",
    "build_null_onnx",
    "count_params",
    "ensure_bundle",
    "ensure_onnx_model",
    "verify_onnx",
]

log = logging.getLogger(__name__)

BUILD_DIR = Path(__file__).resolve().parent / "build"

# (expansion t, output channels c, repeats n, first stride s), from the paper's table 2.
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_OPSET = 17


@dataclass(frozen=True)
class MobileNetV2Config:
    """Size of the network: ``width`` multiplier, input ``size`` (square), ``classes``."""

    width: float = 1.0
    size: int = 224
    classes: int = 1000
    seed: int = 0

    @property
    def tag(self) -> str:
        """A file-name-safe key for the cache."""
        return f"mobilenet_v2_w{self.width:g}_{self.size}_c{self.classes}_s{self.seed}"


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channel counts like the reference implementation (never down by more than 10%)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class _GraphBuilder:
    """Accumulates nodes and He-initialised, BN-folded initializers."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def _name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def _const(self, name: str, array: npt.NDArray[Any]) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def conv(
        self, x: str, cin: int, cout: int, kernel: int, stride: int, group: int = 1, relu6: bool = True
    ) -> str:
        """Conv (+ folded BN bias) [+ ReLU6]; He-normal weights with the conv's real fan-in."""
        from onnx import helper

        name = self._name("conv")
        fan_in = (cin // group) * kernel * kernel
        std = np.sqrt(2.0 / fan_in) if relu6 else np.sqrt(1.0 / fan_in)
        w = (self.rng.standard_normal((cout, cin // group, kernel, kernel)) * std).astype(np.float32)
        b = (self.rng.standard_normal(cout) * 0.01).astype(np.float32)
        pad = kernel // 2
        out = f"{name}_out"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self._const(f"{name}_w", w), self._const(f"{name}_b", b)],
                [out],
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
                group=group,
                name=name,
            )
        )
        if not relu6:
            return out
        act = f"{name}_relu6"
        self.nodes.append(helper.make_node("Clip", [out, "zero", "six"], [act], name=f"{name}_clip"))
        return act

    def add(self, a: str, b: str) -> str:
        from onnx import helper

        name = self._name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [f"{name}_out"], name=name))
        return f"{name}_out"


def build_mobilenet_v2_onnx(path: Path, config: MobileNetV2Config | None = None) -> Path:
    """Write a MobileNetV2 ONNX model (NHWC float32 input ``input``, softmax output ``probs``)."""
    import onnx
    from onnx import TensorProto, helper

    cfg = config or MobileNetV2Config()
    g = _GraphBuilder(cfg.seed)
    g.inits.append(onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    g.inits.append(onnx.numpy_helper.from_array(np.array(6.0, np.float32), "six"))
    g.nodes.append(helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"))
    cin = _make_divisible(32 * cfg.width)
    x = g.conv("nchw", 3, cin, 3, 2)
    for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
        cout = _make_divisible(c * cfg.width)
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            h = g.conv(x, cin, hidden, 1, 1) if t != 1 else x
            h = g.conv(h, hidden, hidden, 3, stride, group=hidden)
            h = g.conv(h, hidden, cout, 1, 1, relu6=False)
            x = g.add(x, h) if stride == 1 and cin == cout else h
            cin = cout
    last = _make_divisible(1280 * max(1.0, cfg.width))
    x = g.conv(x, cin, last, 1, 1)
    fc_w = (g.rng.standard_normal((cfg.classes, last)) * np.sqrt(1.0 / last)).astype(np.float32)
    fc_b = np.zeros(cfg.classes, np.float32)
    g.inits.append(onnx.numpy_helper.from_array(fc_w, "fc_w"))
    g.inits.append(onnx.numpy_helper.from_array(fc_b, "fc_b"))
    g.nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(
        g.nodes,
        "mobilenet_v2",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, cfg.size, cfg.size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, cfg.classes])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8
    model.producer_name = "edge-runtime bench (onnx.helper)"
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    onnx.save(model, tmp)
    tmp.replace(path)
    return path


def build_null_onnx(path: Path, size: int = 224, classes: int = 1000) -> Path:
    """A model with MobileNetV2's input and output but (almost) no compute: the first
    ``classes`` input values, softmaxed. Running the daemon on it measures the pipeline's own
    cost per result (the "inference" takes a few microseconds)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def ints(name: str, value: int) -> Any:
        return numpy_helper.from_array(np.array([value], np.int64), name)

    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"]),
            helper.make_node("Slice", ["flat", "start", "end", "axis"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        "null_model",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, size, size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, classes])],
        [ints("start", 0), ints("end", classes), ints("axis", 1)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def count_params(path: Path) -> int:
    """Number of weights (initializer elements, the two Clip bounds excluded) in an ONNX file."""
    import onnx

    model = onnx.load(path)
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name not in ("zero", "six"))


def verify_onnx(path: Path, threads: int = 1) -> npt.NDArray[np.float32]:
    """Run the model once with onnxruntime on a random input; check the softmax is sane."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [int(d) for d in inp.shape]
    x = np.random.default_rng(0).uniform(-1.0, 1.0, shape).astype(np.float32)
    (probs,) = sess.run(None, {inp.name: x})
    if not np.all(np.isfinite(probs)) or abs(float(probs.sum()) - 1.0) > 1e-3:
        raise RuntimeError(f"{path.name}: output is not a probability vector (sum {probs.sum()})")
    return np.asarray(probs, np.float32)


def ensure_onnx_model(config: MobileNetV2Config | None = None, build_dir: Path = BUILD_DIR) -> Path:
    """The cached ONNX model for ``config``, built (and verified) when missing."""
    cfg = config or MobileNetV2Config()
    path = build_dir / f"{cfg.tag}.onnx"
    if not path.is_file():
        log.info("building %s", path.name)
        build_mobilenet_v2_onnx(path, cfg)
        verify_onnx(path)
    return path


def bench_preprocess() -> Any:
    """The bundles' preprocessing: stretch to the model size, RGB, ``x / 127.5 - 1``, NHWC."""
    from edge_runtime.preprocess_spec import ImagePreprocess

    return ImagePreprocess(
        resize="stretch", color="rgb", layout="nhwc", scale=1.0 / 127.5, mean=(1.0,), std=(1.0,)
    )


def ensure_bundle(
    model: Path,
    *,
    size: int,
    build_dir: Path = BUILD_DIR,
    name: str | None = None,
    golden: int = 4,
    threads: int = 2,
) -> Path:
    """A bundle directory wrapping ``model`` (.onnx or .tflite), rebuilt when the model changed.

    The self-test frames are ``golden`` seeded random ``size x size`` BGR images.
    """
    from edge_runtime.bundle import create_bundle
    from edge_runtime.bundle.loader import sha256_file
    from edge_runtime.decoders.specs import ClassificationSpec

    out = build_dir / f"{model.stem}.{model.suffix.lstrip('.')}.bundle"
    digest = sha256_file(model)
    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
            if files[f"model{model.suffix}"]["sha256"] == digest:
                return out
        except (KeyError, ValueError, OSError):
            pass
    frames = np.random.default_rng(0).integers(0, 256, (golden, size, size, 3), dtype=np.uint8)
    create_bundle(
        out,
        models=[model],
        name=name or model.stem.replace(".", "_"),
        version="1.0.0",
        task="classification",
        preprocess=bench_preprocess(),
        decoder=ClassificationSpec(top_k=5),
        golden_frames=frames,
        description=f"edge-runtime bench model ({model.name}, random weights)",
        threads=threads,
        overwrite=True,
    )
    return out


_TFLITE_SCRIPT = textwrap.dedent(
    """
    import os, shutil, sys, tempfile
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    width, size, classes, seed, out = (float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                       int(sys.argv[4]), sys.argv[5])
    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=width, weights=None, classes=classes,
        classifier_activation="softmax")
    saved = tempfile.mkdtemp()
    try:
        # A SavedModel freezes the weights (a concrete function of a Keras 3 model would keep
        # them as resource variables); the converter folds batch norm into the convs.
        model.export(saved, format="tf_saved_model", verbose=False,
                     input_signature=[tf.TensorSpec((1, size, size, 3), tf.float32, name="input")])
        conv = tf.lite.TFLiteConverter.from_saved_model(saved)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        data = conv.convert()
    finally:
        shutil.rmtree(saved, ignore_errors=True)
    with open(out, "wb") as fh:
        fh.write(data)
    print(model.count_params())
    """
)


def build_mobilenet_v2_tflite(
    tf_python: Path, config: MobileNetV2Config | None = None, build_dir: Path = BUILD_DIR
) -> Path:
    """The cached float32 ``.tflite`` of Keras' MobileNetV2 (random weights), built when missing.

    TensorFlow is not in the device venv, so the model is built by running ``tf_python`` (a
    Python with ``tensorflow-cpu`` and ``keras``) in a subprocess. Optional: the bench only
    calls this when asked to (``--tf-python``).
    """
    cfg = config or MobileNetV2Config()
    path = build_dir / f"keras_{cfg.tag}.tflite"
    if path.is_file():
        return path
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".py", dir=build_dir, delete=False) as fh:
        fh.write(_TFLITE_SCRIPT)
        script = Path(fh.name)
    tmp = path.with_suffix(".tmp")
    try:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        subprocess.run(
            [str(tf_python), str(script), str(cfg.width), str(cfg.size), str(cfg.classes),
             str(cfg.seed), str(tmp)],
            check=True, env=env, capture_output=True, timeout=600,
        )  # fmt: skip
        tmp.replace(path)
    except subprocess.CalledProcessError as exc:
        tail = exc.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"building the .tflite with {tf_python} failed:\n{tail}") from exc
    finally:
        script.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    onnx_path = ensure_onnx_model()
    print(f"{onnx_path}: {count_params(onnx_path):,} parameters")
    print(f"bundle: {ensure_bundle(onnx_path, size=MobileNetV2Config().size)}")
    if len(sys.argv) > 1:
        tfl = build_mobilenet_v2_tflite(Path(sys.argv[1]))
        print(f"{tfl}: {tfl.stat().st_size / 1e6:.1f} MB")
