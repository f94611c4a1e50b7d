"""Shared recipe plumbing that needs TensorFlow: seeding, ONNX/TFLite export, version report.

Only the recipes import this module (host side, ``tensorflow-cpu`` installed); the device
runtime and the tests never do.
"""

from __future__ import annotations

import json
import os
import platform
import random
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import numpy.typing as npt
import tensorflow as tf

__all__ = [
    "compare_outputs",
    "export_onnx",
    "export_tflite",
    "seed_everything",
    "tool_versions",
    "write_json",
]

ONNX_OPSET = 17


def seed_everything(seed: int) -> bool:
    """Seed python, numpy and TensorFlow; returns whether TF op determinism is enabled."""
    import keras

    random.seed(seed)
    np.random.seed(seed)  # legacy global state, for any library that still uses it
    keras.utils.set_random_seed(seed)
    try:
        tf.config.experimental.enable_op_determinism()
    except (AttributeError, RuntimeError):  # pragma: no cover - older/odd TF builds
        return False
    return True


def _serving_fn(model: Any, input_shape: tuple[int, ...], input_name: str) -> Any:
    spec = tf.TensorSpec(input_shape, tf.float32, name=input_name)

    @tf.function(input_signature=[spec])
    def serve(x: tf.Tensor) -> tf.Tensor:
        return model(x, training=False)

    return serve


def export_onnx(
    model: Any,
    path: Path,
    input_shape: tuple[int, ...],
    input_name: str,
    output_name: str,
) -> str:
    """Export with tf2onnx (``from_keras``, falling back to ``from_function``); returns the route."""
    import onnx
    import tf2onnx

    spec = (tf.TensorSpec(input_shape, tf.float32, name=input_name),)
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=ONNX_OPSET)
        route = f"tf2onnx.convert.from_keras (opset {ONNX_OPSET})"
    except Exception:  # noqa: BLE001 - any converter failure: try the tf.function route
        fn = _serving_fn(model, input_shape, input_name)
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=ONNX_OPSET)
        route = f"tf2onnx.convert.from_function (opset {ONNX_OPSET})"
    # one clear output name for the runtime and the manifest
    old = proto.graph.output[0].name
    if old != output_name:
        for node in proto.graph.node:
            node.output[:] = [output_name if o == old else o for o in node.output]
            node.input[:] = [output_name if i == old else i for i in node.input]
        proto.graph.output[0].name = output_name
    from converters.sources import canonical_constant_names

    canonical_constant_names(proto.graph)
    proto.producer_name = "edge-runtime models recipe (tf2onnx)"
    onnx.checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())
    return route


def export_tflite(model: Any, path: Path, input_shape: tuple[int, ...], input_name: str) -> str:
    """Float32 TFLite: Keras ``model.export`` (SavedModel, batch fixed to 1) + TFLiteConverter."""
    import tempfile

    spec = tf.TensorSpec(input_shape, tf.float32, name=input_name)
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "saved_model"
        model.export(str(saved), format="tf_saved_model", input_signature=[spec], verbose=False)
        conv = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        path.write_bytes(conv.convert())
    return "keras Model.export (SavedModel) + tf.lite.TFLiteConverter.from_saved_model (float32)"


def compare_outputs(
    reference: npt.NDArray[np.float32],
    onnx_out: npt.NDArray[np.float32],
    tflite_out: npt.NDArray[np.float32],
    argmax: bool,
) -> dict[str, Any]:
    """Max abs / relative difference of each export to the Keras outputs (and argmax agreement)."""
    out: dict[str, Any] = {"n": len(reference)}
    scale = float(np.max(np.abs(reference))) or 1.0
    for name, other in (("onnx", onnx_out), ("tflite", tflite_out)):
        diff = float(np.max(np.abs(other.astype(np.float64) - reference)))
        out[f"{name}_max_abs_diff"] = diff
        out[f"{name}_max_rel_diff"] = diff / scale
        if argmax:
            out[f"{name}_argmax_agree"] = float(np.mean(np.argmax(other, -1) == np.argmax(reference, -1)))
    return out


def tool_versions() -> dict[str, str]:
    """Exact versions of the training/conversion toolchain (recorded in ``metrics.json``)."""
    names = [
        "tensorflow-cpu",
        "keras",
        "tf2onnx",
        "onnx",
        "onnxruntime",
        "ai-edge-litert",
        "opencv-python-headless",
        "numpy",
        "scikit-learn",
        "protobuf",
    ]
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Pretty JSON with a trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
