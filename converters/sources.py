"""Source models: load one once, and derive every float reference from it.

:func:`load_source` accepts a Keras 3 model (``.keras``, legacy ``.h5``), a TensorFlow
SavedModel directory, an ONNX model (``.onnx``) or a float TFLite model (``.tflite``) and
returns a :class:`SourceModel` that knows its kind and its single input (name, shape, guessed
layout), and produces the float references the quantizers and the report compare against:

============  ===================================  ==========================  ============
source        ``fp32_onnx``                        ``fp32_tflite``             ``fp16_tflite``
============  ===================================  ==========================  ============
Keras         SavedModel -> tf2onnx (opset 17)     SavedModel -> TFLiteConverter  same, fp16 weights
SavedModel    tf2onnx (opset 17)                   TFLiteConverter             same, fp16 weights
ONNX          copy                                 Skipped (needs onnx2tf)     Skipped
TFLite        tf2onnx ``from_tflite`` (opset 17)   copy                        Skipped
============  ===================================  ==========================  ============

A Keras model goes through ``Model.export`` to a SavedModel first (batch fixed to 1, like the
recipes in ``models/``), so Keras and SavedModel sources share one conversion path; converting
from a ``tf.function`` instead silently dropped weights in our tests. A SavedModel whose
serving signature has a dynamic batch is re-saved with batch 1 for the same reason.

Every file is written atomically (a temporary file renamed into place), so a failed step never
leaves a half-written model. Problems raise :class:`~edge_runtime.errors.ConversionError` naming
the problem and the fix; a missing converter package raises
:class:`~edge_runtime.errors.MissingDependencyError`. TensorFlow, Keras, tf2onnx and onnx are
imported lazily, only by the step that needs them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import warnings
import weakref
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from converters import deps
from converters.types import Artifact, Precision, Skipped
from edge_runtime.errors import (
    CalibrationError,
    ConversionError,
    EdgeRuntimeError,
    MissingDependencyError,
)

__all__ = [
    "ONNX_OPSET",
    "ONNX_TO_TFLITE_REASON",
    "SourceKind",
    "SourceModel",
    "TensorInfo",
    "canonical_constant_names",
    "guess_layout",
    "keras_module",
    "load_source",
    "quiet_tf",
    "rename_outputs",
    "run_tflite_converter",
    "tensorflow_module",
    "write_atomic",
]

log = logging.getLogger(__name__)

SourceKind = Literal["keras", "saved_model", "onnx", "tflite"]
Layout = Literal["nhwc", "nchw", "nwc", "ncw", "flat", "unknown"]

ONNX_OPSET = 17
"""ONNX opset of every exported model (what the device's onnxruntime and the recipes use)."""

ONNX_TO_TFLITE_REASON = (
    "ONNX->TFLite needs onnx2tf, not installed: pip install onnx2tf "
    "(or convert from the Keras/SavedModel source, which needs nothing extra)"
)

_TF_KINDS = ("keras", "saved_model")
_SERVING = "serving_default"
_UNSUPPORTED_HINTS = {
    ".pt": "a PyTorch file: export it to ONNX first with torch.onnx.export(...) and convert the .onnx",
    ".pth": "a PyTorch file: export it to ONNX first with torch.onnx.export(...) and convert the .onnx",
    ".pb": "a frozen TF1 graph: load it in TensorFlow and save a SavedModel (tf.saved_model.save)",
    ".pbtxt": "a TF graph in text form: save a SavedModel (tf.saved_model.save) instead",
    ".mlmodel": "a Core ML model: convert from the original training framework instead",
    ".engine": "a TensorRT engine, which is built for one GPU: convert from the ONNX model instead",
    ".bin": "an unknown binary: give a .keras, SavedModel directory, .onnx or float .tflite",
}


# --------------------------------------------------------------------------- helpers


def tensorflow_module(purpose: str = "Converting to TFLite") -> Any:
    """TensorFlow, imported lazily with its C++ logging quieted (``TF_CPP_MIN_LOG_LEVEL``)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return deps.tensorflow(purpose)


def keras_module(purpose: str = "Loading a Keras model") -> Any:
    """Keras 3 (installed with TensorFlow), imported lazily."""
    tensorflow_module(purpose)
    try:
        import keras
    except ImportError as exc:
        raise MissingDependencyError("keras", "convert", purpose) from exc
    return keras


@contextlib.contextmanager
def quiet_tf() -> Iterator[None]:
    """Silence the deprecation/user warnings TensorFlow, Keras and tf2onnx emit inside a call.

    Only the categories these libraries use for chatter are ignored, and only inside the block;
    anything else (e.g. numpy ``RuntimeWarning``) still surfaces.
    """
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning, UserWarning):
            warnings.simplefilter("ignore", category)
        yield


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    Readers see either the old file or the complete new one; on any error the temporary file is
    removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ConversionError(f"cannot write {path}: {exc}; check the output folder") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConversionError(f"cannot write {path}: {exc}; check the output folder and free space") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _first_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text[:limit] or type(exc).__name__


def _safe_name(name: str) -> str:
    """A TensorFlow-legal tensor name (``[A-Za-z0-9._/-]``, starting with a letter/digit)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.]", "_", name.split(":", maxsplit=1)[0]) or "input"
    return cleaned if cleaned[0].isalnum() else f"x{cleaned}"


def guess_layout(shape: tuple[int | None, ...], kind: SourceKind) -> Layout:
    """Best guess of the input layout from its shape (TF sources default to channels-last)."""
    channels = (1, 3, 4)
    tf_like = kind != "onnx"
    if len(shape) == 4:
        last, first = shape[3], shape[1]
        if last in channels and first not in channels:
            return "nhwc"
        if first in channels and last not in channels:
            return "nchw"
        return "nhwc" if tf_like else "nchw"
    if len(shape) == 3:
        return "nwc" if tf_like else "ncw"
    if len(shape) == 2:
        return "flat"
    return "unknown"


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output: name, shape (``None`` for dynamic dims) and dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"


def _fix_shape(
    name: str, shape: tuple[int | None, ...], override: tuple[int, ...] | None, where: str
) -> tuple[int, ...]:
    """Batch 1 and every other dimension known (from the model or ``override``)."""
    if override is not None:
        if len(override) != len(shape) or any(
            d is not None and d != o for d, o in zip(shape[1:], override[1:], strict=True)
        ):
            raise ConversionError(
                f"input_shape={tuple(override)} does not fit input {name!r} of {where}, whose shape is "
                f"{_fmt_shape(shape)}; give a shape of the same rank that keeps the known dimensions"
            )
        return (1, *(int(d) for d in override[1:]))
    if not shape:
        raise ConversionError(f"input {name!r} of {where} is a scalar; the converter needs a batched tensor")
    if any(d is None for d in shape[1:]):
        raise ConversionError(
            f"input {name!r} of {where} has unknown dimensions {_fmt_shape(shape)}; the device needs a "
            "fixed input size: pass input_shape=(1, ...) (CLI: --input-shape 1,224,224,3)"
        )
    return (1, *(int(d) for d in shape[1:] if d is not None))


def _fmt_shape(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


# --------------------------------------------------------------------------- the model


class SourceModel:
    """A loaded source model and the float references derived from it.

    Made by :func:`load_source`. ``input`` is the model's one input with batch fixed to 1
    (``input.shape``) as the converted models take it; ``layout`` is a guess from that shape.
    Keras sources are exported to a temporary SavedModel on first use; call :meth:`close` (or
    use the object as a context manager) to remove it early - it is removed at exit otherwise.
    """

    def __init__(
        self,
        path: Path,
        kind: SourceKind,
        input: TensorInfo,
        outputs: tuple[TensorInfo, ...],
        *,
        handle: Any = None,
    ) -> None:
        self.path = path
        self.kind: SourceKind = kind
        self.input = input
        self.outputs = outputs
        self.layout: Layout = guess_layout(input.shape, kind)
        self._handle = handle  # keras.Model / loaded SavedModel; None for onnx/tflite
        self._tmp: Path | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._saved_model: Path | None = path if kind == "saved_model" else None
        self._fixed_saved_model = False
        self._float_tflite: bytes | None = None

    # -- description

    @property
    def input_name(self) -> str:
        """Name of the model input (as the source names it)."""
        return self.input.name

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Input shape with batch 1 (every dimension known)."""
        return tuple(int(d) if d is not None else 1 for d in self.input.shape)

    def __repr__(self) -> str:
        return (
            f"SourceModel({self.path.name!r}, kind={self.kind}, input={self.input.name!r} "
            f"{_fmt_shape(self.input.shape)} {self.layout}, outputs={[o.name for o in self.outputs]})"
        )

    @property
    def is_tensorflow(self) -> bool:
        """Whether the source is a Keras model or SavedModel (TFLiteConverter can read it)."""
        return self.kind in _TF_KINDS

    def tflite_unavailable_reason(self) -> str | None:
        """Why no TFLite model (float or int8) can be made from this source, or ``None``."""
        if self.kind == "onnx":
            return ONNX_TO_TFLITE_REASON
        return None

    # -- lifecycle

    def close(self) -> None:
        """Remove the temporary SavedModel, if one was made (it is made again when needed)."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._tmp = None
        self._saved_model = self.path if self.kind == "saved_model" else None
        self._fixed_saved_model = False

    def __enter__(self) -> SourceModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tmpdir(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="edgert-source-"))
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._tmp), True)
        return self._tmp

    # -- SavedModel / converter access (TF sources)

    def saved_model_dir(self) -> Path:
        """A SavedModel of the source with a batch-1 ``serving_default`` signature (TF sources)."""
        if not self.is_tensorflow:
            raise ConversionError(
                f"{self.path.name} is a {self.kind} model, which TensorFlow cannot read; "
                "give the Keras or SavedModel source"
            )
        if self.kind == "keras" and self._saved_model is None:
            self._saved_model = self._export_keras()
        elif self.kind == "saved_model" and not self._fixed_saved_model:
            self._saved_model = self._batch1_saved_model()
            self._fixed_saved_model = True
        assert self._saved_model is not None
        return self._saved_model

    def _keras(self) -> Any:
        if self._handle is None:  # closed: load again
            self._handle = _keras_load(self.path, trusted=False)
        return self._handle

    def _export_keras(self) -> Path:
        tf = tensorflow_module("Exporting a Keras model")
        out = self._tmpdir() / "saved_model"
        spec = tf.TensorSpec(self.input_shape, tf.float32, name=_safe_name(self.input.name))
        try:
            with quiet_tf():
                self._keras().export(str(out), format="tf_saved_model", input_signature=[spec], verbose=False)
        except Exception as exc:
            raise ConversionError(
                f"Keras cannot export {self.path.name} to a SavedModel ({_first_line(exc)}); check that the "
                "model runs on one input of shape "
                f"{self.input_shape} (custom layers need get_config and registration)"
            ) from exc
        log.info("exported %s to a SavedModel (batch 1)", self.path.name)
        return out

    def _batch1_saved_model(self) -> Path:
        """Re-save a SavedModel whose signature batch is dynamic with batch 1 (else use it as is)."""
        tf = tensorflow_module("Reading a SavedModel")
        loaded = self._handle if self._handle is not None else _tf_load_saved_model(self.path)
        sig = loaded.signatures[_signature_key(loaded, self.path)]
        key, spec = next(iter(sig.structured_input_signature[1].items()))
        if tuple(spec.shape.as_list()) == self.input_shape:
            return self.path
        fixed = tf.TensorSpec(self.input_shape, spec.dtype, name=key)

        @tf.function(input_signature=[fixed])  # type: ignore[untyped-decorator]
        def serve(x: Any) -> Any:
            return sig(**{key: x})

        out = self._tmpdir() / "saved_model_batch1"
        try:
            with quiet_tf():
                tf.saved_model.save(loaded, str(out), signatures={_SERVING: serve.get_concrete_function()})
        except Exception as exc:
            raise ConversionError(
                f"cannot fix the input shape of SavedModel {self.path} to {self.input_shape} "
                f"({_first_line(exc)}); export it with a fixed input signature instead"
            ) from exc
        log.info("re-saved %s with input shape %s", self.path, self.input_shape)
        return out

    def tflite_converter(self) -> Any:
        """A fresh ``tf.lite.TFLiteConverter`` for the batch-1 SavedModel (TF sources)."""
        tf = tensorflow_module()
        saved = self.saved_model_dir()
        try:
            with quiet_tf():
                return tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=[_SERVING])
        except Exception as exc:
            raise ConversionError(
                f"TFLiteConverter cannot read the SavedModel of {self.path.name}: {_first_line(exc)}"
            ) from exc

    # -- float TFLite bytes (cached)

    def float_tflite_bytes(self) -> bytes:
        """The fp32 TFLite flatbuffer of the source (converted once, then cached)."""
        if self._float_tflite is None:
            reason = self.tflite_unavailable_reason()
            if reason is not None:
                raise ConversionError(f"no TFLite model can be made from {self.path.name}: {reason}")
            if self.kind == "tflite":
                self._float_tflite = self.path.read_bytes()
            else:
                tf = tensorflow_module()
                conv = self.tflite_converter()
                conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
                self._float_tflite = run_tflite_converter(conv, self.path.name, "float32")
        return self._float_tflite

    # -- artifacts

    def fp32_tflite(self, out: Path) -> Artifact | Skipped:
        """Float32 ``.tflite`` (TF sources: TFLiteConverter; TFLite: copy; ONNX: Skipped)."""
        reason = self.tflite_unavailable_reason()
        if reason is not None:
            return Skipped("tflite", "fp32", reason)
        data = self.float_tflite_bytes()
        write_atomic(out, data)
        route = "copy of the source" if self.kind == "tflite" else "SavedModel -> TFLiteConverter (float32)"
        return _artifact("tflite", "fp32", out, route)

    def fp16_tflite(self, out: Path) -> Artifact | Skipped:
        """``.tflite`` with float16 weights (dequantized to float32 at load), TF sources only."""
        if self.kind == "onnx":
            return Skipped("tflite", "fp16", ONNX_TO_TFLITE_REASON)
        if self.kind == "tflite":
            return Skipped(
                "tflite",
                "fp16",
                "a .tflite cannot be re-converted by TFLiteConverter; give the Keras or SavedModel "
                "source for float16 weights",
            )
        tf = tensorflow_module()
        conv = self.tflite_converter()
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        data = run_tflite_converter(conv, self.path.name, "float16")
        write_atomic(out, data)
        return _artifact("tflite", "fp16", out, "SavedModel -> TFLiteConverter (float16 weights)")

    def fp32_onnx(self, out: Path) -> Artifact | Skipped:
        """Float32 ``.onnx`` (copy for ONNX; tf2onnx opset 17 otherwise)."""
        if self.kind == "onnx":
            write_atomic(out, self.path.read_bytes())
            return _artifact("onnx", "fp32", out, "copy of the source")
        tf2onnx = deps.tf2onnx()
        if self.kind == "tflite":
            route = f"tf2onnx.convert.from_tflite (opset {ONNX_OPSET})"
            convert = lambda: tf2onnx.convert.from_tflite(str(self.path), opset=ONNX_OPSET)  # noqa: E731
        else:
            saved = self.saved_model_dir()
            route = f"SavedModel -> tf2onnx (opset {ONNX_OPSET})"
            convert = lambda: _tf2onnx_saved_model(tf2onnx, saved)  # noqa: E731
        proto = _run_tf2onnx(convert, self.path.name)
        onnx = deps.onnx()
        if self.kind == "keras":
            rename_outputs(proto.graph, [o.name for o in self.outputs])
        canonical_constant_names(proto.graph)
        proto.producer_name = "edge-runtime converter (tf2onnx)"
        try:
            onnx.checker.check_model(proto)
        except Exception as exc:
            raise ConversionError(
                f"tf2onnx produced an invalid ONNX model for {self.path.name}: {_first_line(exc)}; "
                "report the op above or convert from a different source format"
            ) from exc
        write_atomic(out, proto.SerializeToString())
        return _artifact("onnx", "fp32", out, route)


def _artifact(fmt: Literal["onnx", "tflite"], precision: Precision, path: Path, route: str) -> Artifact:
    size = path.stat().st_size
    log.info("wrote %s (%s %s, %d bytes) via %s", path, fmt, precision, size, route)
    return Artifact(fmt, precision, path, notes=[f"route: {route}", f"size: {size} bytes"])


# --------------------------------------------------------------------------- conversions


_OP_PATTERNS = (
    re.compile(r"'(tf\.[A-Za-z0-9_]+)'"),
    re.compile(r"ops? (?:that are )?not supported[^:]*:\s*([A-Za-z0-9_.,\s]+)"),
    re.compile(r"'(tfl\.[a-z0-9_]+)' op"),
)


def _ops_in(message: str) -> list[str]:
    found: list[str] = []
    for pat in _OP_PATTERNS:
        for m in pat.findall(message):
            for part in str(m).split(","):
                op = part.strip()
                if op and op not in found:
                    found.append(op)
    return found[:8]


def run_tflite_converter(converter: Any, name: str, what: str) -> bytes:
    """Run ``converter.convert()``, translating TensorFlow's errors into ConversionError."""
    try:
        with quiet_tf():
            return bytes(converter.convert())
    except EdgeRuntimeError:
        raise
    except Exception as exc:
        message = " ".join(str(exc).split())
        ops = _ops_in(message)
        if (
            "representative" in message.lower()
            or "calibrat" in message.lower()
            or (isinstance(exc, RuntimeError) and "failed to prepare" in message)
        ):
            raise CalibrationError(
                f"calibration of {name} failed: {message[:300]}; the calibration inputs must have the "
                "model's input shape and be preprocessed exactly like the device does"
            ) from exc
        if ops:
            raise ConversionError(
                f"TFLiteConverter ({what}) cannot convert {name}: op(s) {', '.join(ops)} have no TFLite "
                "builtin kernel; replace them in the model with supported ops (LiteRT on the device has no "
                f"SELECT_TF_OPS/Flex) - converter said: {message[:300]}"
            ) from exc
        raise ConversionError(f"TFLiteConverter ({what}) cannot convert {name}: {message[:400]}") from exc


def _tf2onnx_saved_model(tf2onnx: Any, saved: Path) -> Any:
    from tf2onnx import tf_loader

    graph_def, inputs, outputs, renames = tf_loader.from_saved_model(
        str(saved), None, None, tag=["serve"], signatures=[_SERVING], return_tensors_to_rename=True
    )
    proto, _ = tf2onnx.convert.from_graph_def(
        graph_def, input_names=inputs, output_names=outputs, opset=ONNX_OPSET, tensors_to_rename=renames
    )
    return proto


def _run_tf2onnx(convert: Callable[[], Any], name: str) -> Any:
    try:
        with quiet_tf():
            result = convert()
    except EdgeRuntimeError:
        raise
    except Exception as exc:
        message = " ".join(str(exc).split())
        raise ConversionError(
            f"tf2onnx cannot convert {name} to ONNX opset {ONNX_OPSET}: {message[:400]}; if an op is "
            "unsupported, replace it in the model or export to ONNX from the training framework"
        ) from exc
    return result[0] if isinstance(result, tuple) else result


def rename_outputs(graph: Any, names: list[str]) -> None:
    """Give the ONNX graph outputs the source's output names (e.g. Keras layer names).

    Left alone when the counts differ or a name is already used inside the graph.
    """
    old = [o.name for o in graph.output]
    taken = {t for node in graph.node for t in (*node.input, *node.output)} | {
        i.name for i in graph.initializer
    }
    if len(old) != len(names) or len(set(names)) != len(names):
        return
    mapping = {o: n for o, n in zip(old, names, strict=True) if o != n}
    if any(n in taken for n in mapping.values()):
        return
    for node in graph.node:
        node.output[:] = [mapping.get(o, o) for o in node.output]
        node.input[:] = [mapping.get(i, i) for i in node.input]
    for out in graph.output:
        out.name = mapping.get(out.name, out.name)


def canonical_constant_names(graph: Any) -> None:
    """Rename tf2onnx's generated constants (``const_*``) after their first consumer, sorted.

    tf2onnx numbers folded constants in an order that varies from run to run; naming them after
    the node that uses them keeps the file stable (``models/export.py`` uses it too).
    """
    rename: dict[str, str] = {}
    generated = {i.name for i in graph.initializer if i.name.startswith("const_")}
    for node in graph.node:
        for idx, name in enumerate(node.input):
            if name in generated and name not in rename:
                rename[name] = f"{node.name}/input{idx}"
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
    inits = sorted(graph.initializer, key=lambda t: rename.get(t.name, t.name))
    for t in inits:
        t.name = rename.get(t.name, t.name)
    del graph.initializer[:]
    graph.initializer.extend(inits)


# --------------------------------------------------------------------------- loading


def load_source(
    path: str | Path, *, input_shape: tuple[int, ...] | None = None, trusted: bool = False
) -> SourceModel:
    """Load a source model: ``.keras``/``.h5``, a SavedModel directory, ``.onnx`` or float ``.tflite``.

    ``input_shape`` fixes unknown input dimensions (batch is always 1). ``trusted`` allows a
    ``.keras`` file to run Python code on load (``Lambda`` layers: Keras' ``safe_mode=False``);
    only set it for files you made. Raises :class:`ConversionError` for a missing, unsupported or
    corrupt file and for models with more than one input.
    """
    p = Path(path)
    if not p.exists():
        raise ConversionError(f"source model {p} does not exist; check the path")
    if p.is_dir():
        if not (p / "saved_model.pb").is_file():
            raise ConversionError(
                f"{p} is a directory without saved_model.pb, so not a SavedModel; give a SavedModel "
                "directory (tf.saved_model.save / keras Model.export) or a model file"
            )
        return _load_saved_model(p, input_shape)
    suffix = p.suffix.lower()
    if suffix in (".keras", ".h5", ".hdf5"):
        return _load_keras(p, input_shape, trusted)
    if suffix == ".onnx":
        return _load_onnx(p)
    if suffix == ".tflite":
        return _load_tflite(p)
    hint = _UNSUPPORTED_HINTS.get(suffix, "give a .keras, SavedModel directory, .onnx or float .tflite")
    raise ConversionError(f"{p.name}: unsupported model type {suffix or '(no suffix)'!r}: {hint}")


def _keras_load(path: Path, trusted: bool) -> Any:
    keras = keras_module()
    if path.suffix.lower() == ".keras" and not zipfile.is_zipfile(path):
        raise ConversionError(
            f"{path.name} is not a valid .keras file (not a zip archive: corrupt or truncated); "
            "save the model again with model.save('model.keras')"
        )
    try:
        with quiet_tf():
            return keras.saving.load_model(str(path), compile=False, safe_mode=not trusted)
    except Exception as exc:
        message = _first_line(exc)
        if "safe_mode" in message or "lambda" in message.lower():
            raise ConversionError(
                f"{path.name} has a Lambda layer with Python code, which is not loaded by default; "
                "replace it with a registered custom layer, or pass trusted=True (CLI --trust-keras-code) "
                "if you made this file"
            ) from exc
        raise ConversionError(
            f"Keras cannot load {path.name}: {message}; if it uses custom layers, register them with "
            "@keras.saving.register_keras_serializable, else re-save the model"
        ) from exc


def _load_keras(path: Path, input_shape: tuple[int, ...] | None, trusted: bool) -> SourceModel:
    model = _keras_load(path, trusted)
    inputs = list(getattr(model, "inputs", None) or [])
    if len(inputs) != 1:
        names = [getattr(t, "name", "?") for t in inputs]
        raise ConversionError(
            f"{path.name} has {len(inputs)} inputs {names}; the converter and the device support models "
            "with exactly one input: wrap the model so it takes one tensor (e.g. concatenate the inputs)"
        )
    kin = inputs[0]
    shape = tuple(None if d is None else int(d) for d in kin.shape)
    name = str(kin.name)
    fixed = _fix_shape(name, shape, input_shape, path.name)
    out_names = list(getattr(model, "output_names", None) or [])
    if len(out_names) != len(model.outputs):
        out_names = [str(o.name) for o in model.outputs]
    outputs = tuple(
        TensorInfo(str(n), tuple(None if d is None else int(d) for d in o.shape))
        for n, o in zip(out_names, model.outputs, strict=True)
    )
    src = SourceModel(path, "keras", TensorInfo(name, fixed, _dtype_name(kin.dtype)), outputs, handle=model)
    log.info("loaded %r", src)
    return src


def _dtype_name(dtype: Any) -> str:
    return str(getattr(dtype, "name", dtype)).replace("tf.", "")


def _tf_load_saved_model(path: Path) -> Any:
    tf = tensorflow_module("Reading a SavedModel")
    try:
        with quiet_tf():
            return tf.saved_model.load(str(path))
    except Exception as exc:
        raise ConversionError(
            f"TensorFlow cannot load the SavedModel {path}: {_first_line(exc)}; the directory is corrupt "
            "or incomplete (saved_model.pb and variables/ must both be there) - export it again"
        ) from exc


def _signature_key(loaded: Any, path: Path) -> str:
    keys = [k for k in loaded.signatures if not k.startswith("_")]
    if _SERVING in keys:
        return _SERVING
    if len(keys) == 1:
        return str(keys[0])
    raise ConversionError(
        f"SavedModel {path} has signatures {keys} and none is {_SERVING!r}; save it with "
        "signatures={'serving_default': fn} (keras Model.export does this)"
    )


def _load_saved_model(path: Path, input_shape: tuple[int, ...] | None) -> SourceModel:
    loaded = _tf_load_saved_model(path)
    sig = loaded.signatures[_signature_key(loaded, path)]
    args, kwargs = sig.structured_input_signature
    specs = dict(kwargs)
    if args or len(specs) != 1:
        raise ConversionError(
            f"SavedModel {path} takes {len(args) + len(specs)} inputs {sorted(specs)}; the converter and "
            "the device support models with exactly one input: export a signature with one tensor"
        )
    name, spec = next(iter(specs.items()))
    shape = tuple(spec.shape.as_list()) if spec.shape.rank is not None else ()
    fixed = _fix_shape(name, shape, input_shape, str(path))
    outs = sig.structured_outputs
    outputs = tuple(
        TensorInfo(str(k), tuple(v.shape.as_list()), v.dtype.name)
        for k, v in (outs.items() if isinstance(outs, dict) else enumerate(outs))
    )
    src = SourceModel(path, "saved_model", TensorInfo(name, fixed, spec.dtype.name), outputs, handle=loaded)
    log.info("loaded %r", src)
    return src


_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 11: "float64"}


def _load_onnx(path: Path) -> SourceModel:
    onnx = deps.onnx()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ConversionError(
            f"{path.name} is not a readable ONNX model ({_first_line(exc, 200)}): corrupt or truncated; "
            "export it again"
        ) from exc
    if not model.graph.node:
        raise ConversionError(
            f"{path.name} has an empty ONNX graph: corrupt or not an ONNX model; export it again"
        )
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ConversionError(
            f"{path.name} has {len(inputs)} inputs {[i.name for i in inputs]}; the converter and the device "
            "support models with exactly one input: export it with one input tensor"
        )

    def info(vi: Any) -> TensorInfo:
        tt = vi.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim
        )
        return TensorInfo(vi.name, dims, _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)))

    inp = info(inputs[0])
    shape = (1, *inp.shape[1:]) if inp.shape else inp.shape
    src = SourceModel(
        path, "onnx", TensorInfo(inp.name, shape, inp.dtype), tuple(info(o) for o in model.graph.output)
    )
    log.info("loaded %r", src)
    return src


def _load_tflite(path: Path) -> SourceModel:
    import numpy as np

    from edge_runtime.backends.litert import interpreter_module

    mod = interpreter_module()
    try:
        interp = mod.Interpreter(model_path=str(path), num_threads=1)
    except (ValueError, RuntimeError) as exc:
        raise ConversionError(
            f"{path.name} is not a readable TFLite model ({_first_line(exc, 200)}): corrupt or truncated; "
            "convert it again"
        ) from exc
    ins, outs = interp.get_input_details(), interp.get_output_details()
    if len(ins) != 1:
        raise ConversionError(
            f"{path.name} has {len(ins)} inputs {[d['name'] for d in ins]}; the converter and the device "
            "support models with exactly one input"
        )

    def info(d: dict[str, Any]) -> TensorInfo:
        dims = tuple(int(x) if x > 0 else None for x in d.get("shape_signature", d["shape"]))
        return TensorInfo(str(d["name"]), dims, np.dtype(d["dtype"]).name)

    inp = info(ins[0])
    quantized = [
        d["name"] for d in interp.get_tensor_details() if d["dtype"] in (np.int8, np.uint8, np.int16)
    ]
    if inp.dtype != "float32" or quantized:
        raise ConversionError(
            f"{path.name} is already quantized (input {inp.dtype}, {len(quantized)} integer tensors); the "
            "converter needs the float model: give the float .tflite, Keras or SavedModel source"
        )
    shape = (1, *inp.shape[1:]) if inp.shape else inp.shape
    src = SourceModel(path, "tflite", TensorInfo(inp.name, shape), tuple(info(d) for d in outs))
    log.info("loaded %r", src)
    return src
