"""Full-integer int8 TFLite from a source model and the shared calibration set.

:func:`quantize_tflite` makes the model the device's :class:`~edge_runtime.backends.LiteRTBackend`
runs: every op int8 (``TFLITE_BUILTINS_INT8``), weights per-channel, activations per-tensor,
calibrated on the **same** :class:`~converters.types.CalibrationSet` the ONNX path uses, with
int8 input and output tensors whose scale/zero point the backend applies (so the device feeds the
preprocessed floats and reads floats back). With a ``denylist`` the named ops stay float
(``TFLITE_BUILTINS`` allowed too) and the artifact's precision is ``"mixed"``.

Calibration happens once per :class:`CalibratedTFLite`; the calibrated model is then quantized as
often as needed with different denylists (what :mod:`converters.sensitivity_tflite` does to find
the fewest layers to keep float):

* Keras/SavedModel sources are calibrated by ``tf.lite.experimental.QuantizationDebugger`` on a
  ``TFLiteConverter`` set up for full-integer quantization (the public API for "calibrate once,
  quantize with denylisted nodes").
* a float ``.tflite`` source has no TensorFlow graph, so it is calibrated with TensorFlow's own
  calibrator on the flatbuffer (``tensorflow.lite.python.optimize.calibrator``, what the
  converter uses inside; an internal API of the pinned tensorflow-cpu 2.21).
* re-quantizing uses ``tensorflow.lite.python.convert.mlir_quantize``, the function behind
  ``QuantizationDebugger.get_nondebug_quantized_model`` (same internal-API caveat).

The plain int8 model of a Keras/SavedModel source is made by ``TFLiteConverter.convert`` itself.
TensorFlow silently leaves an op float when it has no int8 kernel, even with
``TFLITE_BUILTINS_INT8``; such a result is refused with a :class:`ConversionError` naming the op
and the fix, never returned as "int8".

Measured on the reference machine (AMD EPYC Zen 5, AVX-512 VNNI, LiteRTBackend/XNNPACK, 2
threads, :func:`converters.evaluate.compare_latency` medians on a shared, noisy host):

* Keras MobileNetV2 224 (random weights): fp32 2.0-4.6 ms, int8 1.0-2.3 ms, 1.9-2.1x; 3.53x
  smaller.
* the committed shapes CNN (64x64, 85 k params, 15 M MACs): 0.19 ms in both precisions - its
  per-image standardization (MEAN, SQUARED_DIFFERENCE, RSQRT ...) has no fast int8 XNNPACK
  kernel; with those 7 ops denylisted (float) the rest int8: 0.09 ms, 2.0x, 99.3 % vs 99.4 %
  top-1. 3.49x smaller (fixed overhead weighs on 85 k weights).
* the same recipe at 96x96 with a wider BN CNN (1.18 M params, ~120 M MACs): full int8 2.3x,
  with float standardization 3.6x; top-1 99.7 % (fp32) vs 99.4 % (int8), 3.89x smaller.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from converters.sources import (
    SourceModel,
    quiet_tf,
    run_tflite_converter,
    tensorflow_module,
    write_atomic,
)
from converters.types import Artifact, CalibrationSet, Precision
from edge_runtime.errors import CalibrationError, ConversionError, EdgeRuntimeError

__all__ = [
    "CalibratedTFLite",
    "OpInfo",
    "check_inputs",
    "float_compute_ops",
    "io_quantization",
    "load_interpreter",
    "quantize_tflite",
    "representative_dataset",
    "tflite_ops",
]

log = logging.getLogger(__name__)

F32Array = npt.NDArray[np.float32]

_CONVERSION_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})
_OP_TYPE = re.compile(r"^[A-Z][A-Z0-9_]*$")


# --------------------------------------------------------------------------- model structure


@dataclass(frozen=True)
class OpInfo:
    """One op of a TFLite model. ``name`` (its first output tensor) is what a denylist names."""

    index: int
    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    output_dtype: str
    input_ids: tuple[int, ...] = ()
    output_ids: tuple[int, ...] = ()


def load_interpreter(model: bytes, *, preserve: bool = False, threads: int = 1) -> Any:
    """A LiteRT interpreter without default delegates (so every op and tensor is visible).

    ``preserve`` keeps every intermediate tensor readable after ``invoke`` (for layer errors).
    """
    from edge_runtime.backends.litert import interpreter_module

    mod = interpreter_module()
    try:
        interp = mod.Interpreter(
            model_content=model,
            num_threads=threads,
            experimental_op_resolver_type=mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            experimental_preserve_all_tensors=preserve,
        )
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ConversionError(f"LiteRT cannot load the converted model: {str(exc).strip()[:300]}") from exc
    return interp


def tflite_ops(model: bytes) -> list[OpInfo]:
    """The ops of a TFLite flatbuffer in execution order."""
    interp = load_interpreter(model)
    names = {int(d["index"]): str(d["name"]) for d in interp.get_tensor_details()}
    dtypes = {int(d["index"]): np.dtype(d["dtype"]).name for d in interp.get_tensor_details()}
    ops: list[OpInfo] = []
    for op in interp._get_ops_details():
        outs = tuple(int(i) for i in op["outputs"] if i >= 0)
        ins = tuple(int(i) for i in op["inputs"] if i >= 0)
        if not outs:
            continue
        ops.append(
            OpInfo(
                index=int(op["index"]),
                type=str(op["op_name"]),
                name=names.get(outs[0], str(outs[0])),
                inputs=tuple(names.get(i, str(i)) for i in ins),
                outputs=tuple(names.get(i, str(i)) for i in outs),
                output_dtype=dtypes.get(outs[0], "?"),
                input_ids=ins,
                output_ids=outs,
            )
        )
    return ops


def float_compute_ops(model: bytes) -> list[OpInfo]:
    """Ops that compute in float (not QUANTIZE/DEQUANTIZE) - none in a true int8 model."""
    return [
        op
        for op in tflite_ops(model)
        if op.type not in _CONVERSION_OPS and op.output_dtype in ("float32", "float16")
    ]


def io_quantization(model: bytes) -> dict[str, list[tuple[str, str, float, int]]]:
    """``{"inputs": [(name, dtype, scale, zero_point)], "outputs": [...]}`` of a TFLite model."""
    interp = load_interpreter(model)

    def rows(details: list[dict[str, Any]]) -> list[tuple[str, str, float, int]]:
        return [
            (
                str(d["name"]),
                np.dtype(d["dtype"]).name,
                float(d["quantization"][0]),
                int(d["quantization"][1]),
            )
            for d in details
        ]

    return {"inputs": rows(interp.get_input_details()), "outputs": rows(interp.get_output_details())}


# --------------------------------------------------------------------------- data


def check_inputs(data: CalibrationSet, source: SourceModel, what: str = "calibration") -> F32Array:
    """``data.inputs`` as float32 ``(N, *input_shape[1:])``, or :class:`CalibrationError`."""
    x = np.asarray(data.inputs)
    want = tuple(source.input_shape[1:])
    if x.ndim == 0 or len(x) == 0:
        raise CalibrationError(
            f"the {what} set is empty; give at least a few hundred representative samples "
            "(e.g. --calib DIR with images the device will see)"
        )
    if tuple(x.shape[1:]) != want:
        raise CalibrationError(
            f"the {what} samples have shape {tuple(x.shape[1:])} but {source.path.name} takes "
            f"{want} per sample (input {source.input_name!r}); make them with the model's preprocessing"
        )
    if not np.issubdtype(x.dtype, np.number):
        raise CalibrationError(f"the {what} inputs are {x.dtype}, not numbers; give float32 model inputs")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise CalibrationError(
            f"the {what} inputs contain NaN or infinity; fix the data or its preprocessing"
        )
    if what == "calibration" and len(x) < 32:
        log.warning("only %d calibration samples: int8 ranges may not cover what the device sees", len(x))
    return x


def representative_dataset(x: F32Array) -> Callable[[], Iterator[list[F32Array]]]:
    """TFLite's ``representative_dataset``: one batch-1 sample per step, in order."""

    def gen() -> Iterator[list[F32Array]]:
        for i in range(len(x)):
            yield [x[i : i + 1]]

    return gen


def _int8_converter(source: SourceModel, x: F32Array, *, int8_io: bool, allow_float: bool) -> Any:
    tf = tensorflow_module("int8 quantization to TFLite")
    conv = source.tflite_converter()
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative_dataset(x)
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if allow_float:
        ops.append(tf.lite.OpsSet.TFLITE_BUILTINS)
    conv.target_spec.supported_ops = ops
    if int8_io:
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    return conv


# --------------------------------------------------------------------------- calibrate once


class CalibratedTFLite:
    """A source's float TFLite model with int8 calibration statistics, quantized on demand.

    ``ops`` lists the float model's ops (names match the quantized models'); :meth:`quantize`
    returns int8 (empty denylist) or mixed flatbuffers without calibrating again.
    """

    def __init__(self, source: SourceModel, calib: CalibrationSet) -> None:
        reason = source.tflite_unavailable_reason()
        if reason is not None:
            raise ConversionError(f"no int8 TFLite can be made from {source.path.name}: {reason}")
        self.source = source
        self.inputs = check_inputs(calib, source)
        self.description = calib.description
        if source.is_tensorflow:
            self.calibrated, self.route = self._calibrate_converter()
        else:
            self.calibrated, self.route = self._calibrate_flatbuffer()
        self.ops = tflite_ops(self.calibrated)
        self._by_name = {op.name: op for op in self.ops}
        log.info("calibrated %s on %d samples (%s)", source.path.name, len(self.inputs), self.route)

    def _calibrate_converter(self) -> tuple[bytes, str]:
        tf = tensorflow_module("int8 quantization to TFLite")
        conv = _int8_converter(self.source, self.inputs, int8_io=True, allow_float=True)
        try:
            with quiet_tf():
                debugger = tf.lite.experimental.QuantizationDebugger(
                    converter=conv,
                    debug_dataset=representative_dataset(self.inputs[:1]),
                    debug_options=tf.lite.experimental.QuantizationDebugOptions(fully_quantize=True),
                )
        except EdgeRuntimeError:
            raise
        except Exception as exc:
            raise _calibration_error(exc, self.source) from exc
        return bytes(debugger.calibrated_model), "TFLiteConverter + QuantizationDebugger calibration"

    def _calibrate_flatbuffer(self) -> tuple[bytes, str]:
        tensorflow_module("int8 quantization of a .tflite")
        try:
            from tensorflow.lite.python.optimize import calibrator
        except ImportError as exc:  # pragma: no cover - other TensorFlow versions
            raise ConversionError(
                "this TensorFlow has no internal TFLite calibrator (tested with tensorflow-cpu 2.21); "
                "give the Keras or SavedModel source instead of the .tflite"
            ) from exc
        model = self.source.float_tflite_bytes()
        try:
            with quiet_tf():
                cal = calibrator.Calibrator(calibrator.add_intermediate_tensors(model))
                calibrated = cal.calibrate(representative_dataset(self.inputs))
        except Exception as exc:
            raise _calibration_error(exc, self.source) from exc
        return bytes(calibrated), "TFLite calibrator on the float flatbuffer"

    # -- denylists

    def resolve(self, denylist: Sequence[str]) -> list[str]:
        """Op (output tensor) names for denylist entries, in model order.

        An entry is an op's output tensor name (as :mod:`converters.sensitivity_tflite` reports
        it), one ``;``-separated part of it or a layer path prefix of a part
        (``model/conv2d_1``), or an op type in capitals (``MUL``: every op of that type).
        """
        chosen: set[str] = set()
        for entry in denylist:
            hits = self._match(entry)
            if not hits:
                sample = ", ".join(repr(op.name[:60]) for op in self.ops[:6])
                raise ConversionError(
                    f"denylist entry {entry!r} names no op of {self.source.path.name}; use an op output "
                    f"name from the sensitivity report (e.g. {sample}) or an op type such as "
                    f"{sorted({op.type for op in self.ops})[:6]}"
                )
            chosen.update(hits)
        return [op.name for op in self.ops if op.name in chosen]

    def _match(self, entry: str) -> list[str]:
        if entry in self._by_name:
            return [entry]
        if _OP_TYPE.match(entry):
            return [op.name for op in self.ops if op.type == entry]
        hits = []
        for op in self.ops:
            parts = op.name.split(";")
            if any(p == entry or p.startswith(entry.rstrip("/") + "/") for p in parts):
                hits.append(op.name)
        return hits

    def quantize(self, denylist: Sequence[str] = (), *, int8_io: bool = True) -> bytes:
        """The int8 model, keeping the denylisted ops float; int8 (or float) input/output."""
        tf = tensorflow_module("int8 quantization to TFLite")
        from tensorflow.lite.python import convert

        nodes = self.resolve(denylist)
        io_type = tf.int8 if int8_io else tf.float32
        try:
            with quiet_tf():
                data = convert.mlir_quantize(
                    self.calibrated,
                    disable_per_channel=False,
                    fully_quantize=int8_io,
                    input_data_type=io_type,
                    output_data_type=io_type,
                    denylisted_nodes=nodes or None,
                )
        except Exception as exc:
            raise ConversionError(
                f"int8 quantization of {self.source.path.name} failed: {' '.join(str(exc).split())[:400]}"
            ) from exc
        return bytes(data)


def _calibration_error(exc: Exception, source: SourceModel) -> ConversionError:
    message = " ".join(str(exc).split())
    if "failed to prepare" in message or "dimension" in message.lower() or "shape" in message.lower():
        return CalibrationError(
            f"calibrating {source.path.name} failed: {message[:300]}; the calibration inputs must have the "
            f"model's input shape {source.input_shape} and its preprocessing"
        )
    return ConversionError(f"int8 calibration of {source.path.name} failed: {message[:400]}")


# --------------------------------------------------------------------------- public entry point


def _no_int8_kernel_error(name: str, ops: list[OpInfo]) -> ConversionError:
    listed = ", ".join(f"{op.type} ({op.name[:80]})" for op in ops[:6])
    return ConversionError(
        f"{name}: op(s) {listed} have no int8 kernel, so a full-integer model is impossible; keep them "
        "float with --max-accuracy-drop (automatic fallback) or --keep-float NAME "
        f"(denylist={tuple(op.name for op in ops[:3])!r}), or replace the op in the model"
    )


def quantize_tflite(
    source: SourceModel,
    out_path: Path,
    calib: CalibrationSet,
    *,
    denylist: tuple[str, ...] = (),
    int8_io: bool = True,
) -> Artifact:
    """Write a full-integer int8 ``.tflite`` (``"mixed"`` when ``denylist`` keeps ops float).

    ``calib`` holds model-logical float inputs (the device's preprocessing); the same set feeds
    the ONNX quantizer. With ``int8_io`` the model takes and returns int8 tensors whose
    scale/zero point the device's LiteRTBackend applies. ``denylist`` entries are resolved by
    :meth:`CalibratedTFLite.resolve`. The file is written atomically; raises
    :class:`ConversionError` (an op without an int8 kernel, a converter failure, an ONNX source)
    or :class:`CalibrationError` (empty or mis-shaped calibration data).
    """
    out_path = Path(out_path)
    reason = source.tflite_unavailable_reason()
    if reason is not None:
        raise ConversionError(f"no int8 TFLite can be made from {source.path.name}: {reason}")
    x = check_inputs(calib, source)
    float_nodes: list[str] = []
    if not denylist and source.is_tensorflow:
        conv = _int8_converter(source, x, int8_io=int8_io, allow_float=False)
        data = run_tflite_converter(conv, source.path.name, "int8")
        route = "TFLiteConverter full-integer int8 (TFLITE_BUILTINS_INT8)"
    else:
        session = CalibratedTFLite(source, CalibrationSet(x, calib.labels, calib.description))
        float_nodes = session.resolve(denylist)
        data = session.quantize(float_nodes, int8_io=int8_io)
        route = session.route + " + mlir_quantize"
    floats = float_compute_ops(data)
    if not denylist and floats:
        raise _no_int8_kernel_error(source.path.name, floats)
    precision: Precision = "mixed" if float_nodes or floats else "int8"
    write_atomic(out_path, data)
    io = io_quantization(data)
    notes = [
        f"route: {route}",
        f"calibration: {len(x)} samples" + (f" ({calib.description})" if calib.description else ""),
        "io: " + ", ".join(f"{n} {dt} scale={s:.6g} zp={z}" for n, dt, s, z in io["inputs"] + io["outputs"]),
        f"size: {len(data)} bytes",
    ]
    if float_nodes:
        notes.append(f"kept float: {len(float_nodes)} op(s)")
    log.info("wrote %s (tflite %s, %d bytes, %d float ops)", out_path, precision, len(data), len(float_nodes))
    return Artifact("tflite", precision, out_path, float_nodes=list(float_nodes), notes=notes)
