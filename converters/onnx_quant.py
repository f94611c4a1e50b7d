"""ONNX int8 (static QDQ) and fp16 conversion with ONNX Runtime's tools, made robust.

* :func:`prepare_onnx` runs ``quant_pre_process`` (symbolic shape inference, ORT basic graph
  optimization, ONNX shape inference). On real models parts of it fail (symbolic shape
  inference needs ``sympy`` and gives up on dimension conflicts; the optimizer fails on some
  graphs and only *logs* it); each failure falls back one step (without symbolic shapes, then
  without optimization, then the model unchanged) and is reported in the returned notes.
* :func:`quantize_onnx` calibrates on a :class:`~converters.types.CalibrationSet` (the device's
  preprocessing) and writes a QDQ model that ONNX Runtime fuses into integer kernels
  (``QLinearConv``, ``QGemm``, ``QLinearAdd`` ...). The op types in
  :attr:`~converters.targets.TargetProfile.float_op_types` (a final ``Softmax``) stay float.
* :func:`convert_fp16` converts weights and compute to float16 (float32 inputs/outputs kept),
  with ``onnxruntime.transformers.float16``; it returns :class:`~converters.types.Skipped`
  with the reason when that is not available or the result does not run.

Every output is written to a temporary file beside the destination and renamed into place only
when it is complete and loads in ONNX Runtime, so a failure never leaves a half-written model.
Third-party errors become :class:`~edge_runtime.errors.ConversionError` (or
:class:`~edge_runtime.errors.CalibrationError`) naming the problem and the fix.

Measured on the reference machine (AMD EPYC, AVX-512 VNNI, 2 threads, ORT 1.31.1, edge
runtime backend; :func:`converters.evaluate.compare_latency`, medians of 8 quiet rounds):
MobileNetV2 224 fp32 2.66 ms vs U8S8 per-channel QDQ 1.29 ms (2.10x paired, 3.63x smaller);
the 64x64 shapes CNN (15 M MACs) 0.19 ms in both precisions (0.99x; 3.59x smaller): it is too
small for int8 to pay off.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from converters import deps
from converters.targets import TargetProfile
from converters.types import Artifact, CalibrationSet, Precision, QuantOptions, Skipped
from edge_runtime.errors import CalibrationError, ConversionError, MissingDependencyError

__all__ = [
    "KNOWN_DOMAINS",
    "check_runnable",
    "convert_fp16",
    "default_op_types",
    "graph_node_names",
    "make_data_reader",
    "prepare_onnx",
    "quantize_onnx",
]

log = logging.getLogger(__name__)

KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"})
"""Operator domains the stock ONNX Runtime CPU build implements."""

_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
_QTYPES = {"uint8": "QUInt8", "int8": "QInt8"}
_DEFAULT_FLOAT_OPS: tuple[str, ...] = ("Softmax",)


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A private temp folder beside ``dest`` (same file system, so rename is atomic); removed after.

    Folders created for ``dest`` are removed again if nothing was committed into them.
    """
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()


@contextlib.contextmanager
def _working_dir(path: Path) -> Iterator[None]:
    """Run with ``path`` as the working directory (ORT's symbolic shape inference drops
    ``sym_shape_infer_temp.onnx`` into the current directory when it fails)."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _commit(src: Path, dest: Path) -> None:
    """fsync ``src`` and rename it to ``dest`` (atomic on POSIX)."""
    with src.open("rb+") as f:
        f.flush()
        os.fsync(f.fileno())
    src.replace(dest)


def _session(path: Path | bytes, threads: int = 1) -> Any:
    ort = deps.onnxruntime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    data = path.read_bytes() if isinstance(path, Path) else path
    return ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])


def _load_onnx(path: Path) -> Any:
    onnx = deps.onnx()
    if not path.is_file():
        raise ConversionError(f"ONNX model {str(path)!r} does not exist; give the path of a .onnx file")
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise ConversionError(
            f"{path.name} is not a readable ONNX model ({str(exc)[:200]}); re-export it "
            "(e.g. with tf2onnx or torch.onnx.export)"
        ) from exc


def graph_node_names(path: Path) -> list[str]:
    """Node names of an ONNX model in graph order."""
    return [n.name for n in _load_onnx(path).graph.node]


def check_runnable(path: Path) -> None:
    """Raise :class:`ConversionError` if ONNX Runtime cannot load ``path``, naming unsupported ops."""
    model = _load_onnx(path)
    try:
        _session(path)
    except Exception as exc:
        custom = [
            f"{n.name or '(unnamed)'} ({n.domain}:{n.op_type})"
            for n in model.graph.node
            if n.domain not in KNOWN_DOMAINS
        ]
        if custom:
            raise ConversionError(
                f"{path.name} uses operators ONNX Runtime does not implement: {', '.join(custom[:5])}; "
                "re-export the model with standard ONNX operators (opset 13-21), or replace the custom "
                "op before converting"
            ) from exc
        raise ConversionError(
            f"ONNX Runtime cannot load {path.name}: {str(exc).strip()[:300]}; the model uses an "
            "operator/opset this runtime lacks or is malformed - re-export it with opset 13-21"
        ) from exc


class _Capture(logging.Handler):
    """Collects records from ORT's quantization loggers (the optimizer only *logs* its failures)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _capture_errors(name: str) -> Iterator[_Capture]:
    logger = logging.getLogger(name)
    handler = _Capture()
    old = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = old


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


# --------------------------------------------------------------------------- prepare


def prepare_onnx(fp32_path: Path, out: Path) -> tuple[Path, list[str]]:
    """Shape inference + ORT basic optimization for quantization, with fallbacks that say so.

    Tries ``quant_pre_process`` in full; if symbolic shape inference fails, without it
    (``skip_symbolic_shape=True``); if the optimizer fails, also without optimization; as a last
    resort the model is used unchanged. Returns ``(out, notes)``; notes describe every fallback.
    Raises :class:`ConversionError` if ONNX Runtime cannot run the model at all.
    """
    fp32_path, out = Path(fp32_path).resolve(), Path(out).resolve()
    check_runnable(fp32_path)
    q = deps.ort_quantization()
    notes: list[str] = []
    attempts: list[tuple[str, dict[str, bool]]] = [
        ("full (symbolic shape inference + optimization)", {}),
        ("without symbolic shape inference (skip_symbolic_shape=True)", {"skip_symbolic_shape": True}),
        (
            "without symbolic shape inference and optimization",
            {"skip_symbolic_shape": True, "skip_optimization": True},
        ),
    ]
    with _staging(out) as tmp:
        for i, (label, kwargs) in enumerate(attempts):
            candidate = tmp / f"attempt{i}.onnx"
            try:
                with (
                    _capture_errors("onnxruntime.quantization.shape_inference") as cap,
                    warnings.catch_warnings(),
                    _working_dir(tmp),
                ):
                    warnings.simplefilter("ignore", DeprecationWarning)
                    q.quant_pre_process(str(fp32_path), str(candidate), **kwargs)
            except Exception as exc:  # noqa: BLE001 - any failure means: fall back one step
                why = _first_line(exc)
                if "sympy" in str(exc):
                    why += " (pip install sympy enables symbolic shape inference)"
                notes.append(f"pre-processing {label} failed: {why}")
                log.warning("prepare %s: %s", fp32_path.name, notes[-1])
                continue
            if cap.messages and not kwargs.get("skip_optimization"):
                notes.append(
                    f"pre-processing {label}: ONNX Runtime graph optimization failed "
                    f"({cap.messages[0][:160]}); continued without it"
                )
                log.warning("prepare %s: %s", fp32_path.name, notes[-1])
            try:
                _session(candidate)
            except Exception as exc:  # noqa: BLE001 - unusable result: fall back one step
                notes.append(f"pre-processing {label} produced a model ORT cannot load ({_first_line(exc)})")
                continue
            if i > 0:
                notes.append(f"pre-processing done {label}")
            _name_nodes(candidate, notes)
            _commit(candidate, out)
            return out, notes
        notes.append("pre-processing skipped: quantizing the model unchanged (shapes as exported)")
        log.warning("prepare %s: %s", fp32_path.name, notes[-1])
        fallback = tmp / "unchanged.onnx"
        shutil.copyfile(fp32_path, fallback)
        _name_nodes(fallback, notes)
        _commit(fallback, out)
    return out, notes


def _name_nodes(path: Path, notes: list[str]) -> None:
    """Give unnamed (or duplicate-named) nodes unique names ``<op_type>_<index>``.

    Nodes are kept float, ranked and reported by name; exporters that leave names empty would
    make that impossible.
    """
    onnx = deps.onnx()
    model = onnx.load(str(path))
    seen: set[str] = set()
    renamed: list[str] = []
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
            while node.name in seen:
                node.name += "_"
            renamed.append(node.name)
        seen.add(node.name)
    if renamed:
        onnx.save(model, str(path))
        notes.append(
            f"named {len(renamed)} unnamed or duplicate-named nodes <op_type>_<index> (e.g. {renamed[0]})"
        )


# --------------------------------------------------------------------------- calibration reader


def _input_info(path: Path) -> tuple[str, list[int | None], str]:
    """The (single) graph input's name, shape and element type name."""
    onnx = deps.onnx()
    model = _load_onnx(path)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ConversionError(
            f"{path.name} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); the "
            "converter calibrates single-input models - export the model with one input"
        )
    t = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
    return inputs[0].name, dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name


def _check_calibration(calib: CalibrationSet, path: Path, what: str = "calibration") -> str:
    name, dims, dtype = _input_info(path)
    if len(calib) == 0:
        raise CalibrationError(f"the {what} set is empty; give at least one sample (100-500 is typical)")
    if dtype != "float32":
        raise ConversionError(
            f"{path.name} input {name!r} is {dtype}; int8 conversion starts from a float32 model"
        )
    got = list(calib.inputs.shape[1:])
    want = dims[1:]
    if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got, strict=False)):
        raise CalibrationError(
            f"{what} samples have shape {got} but {path.name} input {name!r} takes "
            f"{[d if d is not None else '?' for d in want]} per sample; build the {what} set with "
            "the model's input size (the preprocessing resizes images to it)"
        )
    return name


def _stride(n: int, most: int = 16) -> int:
    """The largest divisor of ``n`` that is at most ``most`` (ORT needs ``n % stride == 0``)."""
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


def make_data_reader(calib: CalibrationSet, input_name: str, limit: int | None = None) -> Any:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over the set, one sample per batch.

    Supports ``set_range`` (ORT's strided calibration) and ``rewind``.
    """
    q = deps.ort_quantization()
    samples = calib.inputs if limit is None else calib.inputs[:limit]

    class _Reader(q.CalibrationDataReader):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self._i, self._end = 0, len(samples)

        def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
            if self._i >= self._end:
                return None
            x = samples[self._i : self._i + 1]
            self._i += 1
            return {input_name: np.ascontiguousarray(x, np.float32)}

        def __len__(self) -> int:
            return len(samples)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._i, self._end = start_index, min(end_index, len(samples))

        def rewind(self) -> None:
            self._i, self._end = 0, len(samples)

    return _Reader()


# --------------------------------------------------------------------------- quantize


def default_op_types(float_op_types: Sequence[str] = _DEFAULT_FLOAT_OPS) -> list[str]:
    """Op types ORT's QDQ quantizer handles, minus those kept in float."""
    registry = deps.ort_quantization().registry
    ops = set(registry.QLinearOpsRegistry) | set(registry.QDQRegistry)
    return sorted(ops - set(float_op_types))


def _describe(options: QuantOptions) -> str:
    act = "U8" if options.activation == "uint8" else "S8"
    wt = "S8" if options.weight == "int8" else "U8"
    return (
        f"static QDQ {act}{wt}, {'per-channel' if options.per_channel else 'per-tensor'} weights"
        f"{', reduce_range (7-bit)' if options.reduce_range else ''}, {options.method} calibration"
    )


def quantize_onnx(
    fp32_path: Path,
    out_path: Path,
    calib: CalibrationSet,
    options: QuantOptions,
    *,
    target: TargetProfile | None = None,
    preprocess: bool = True,
    calibration_cache: Path | None = None,
    extra_options: Mapping[str, Any] | None = None,
    compact_names: bool = True,
) -> Artifact:
    """Static int8 QDQ quantization of ``fp32_path`` into ``out_path``.

    ``options`` choose the calibration method, activation/weight types, per-channel weights,
    ``reduce_range`` and the nodes kept float (``exclude``: node names of the pre-processed
    graph, see :func:`prepare_onnx`; precision ``"mixed"`` when any). ``target`` adds its ORT
    extra options and float op types. ``preprocess=False`` when ``fp32_path`` is already the
    output of :func:`prepare_onnx`. ``calibration_cache`` (a JSON path) stores the activation
    ranges on first use and reuses them after, so repeated quantizations of the same model with
    the same method (the accuracy fallback's trials) calibrate only once. ``compact_names``
    gives the quantizer's Q/DQ tensors and nodes short names (the compute nodes keep theirs):
    long exporter names repeated in every QDQ pair are ~15 % of a small model's int8 file.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    q = deps.ort_quantization()
    input_name = _check_calibration(calib, fp32_path)
    notes: list[str] = []
    extra: dict[str, Any] = dict(target.ort_extra_options) if target else {}
    if options.method != "minmax":
        # Histogram calibrators keep every intermediate tensor of every sample they are given
        # in one call (GBs for a 224x224 CNN and a few hundred samples); feeding them in strides
        # merges the histograms and bounds memory. (MinMax only keeps scalars. Do NOT use
        # CalibMaxIntermediateOutputs: ORT 1.31 drops the collected chunk instead of merging
        # it, so only the last N % max samples are used.)
        extra["CalibStridedMinMax"] = _stride(len(calib))
    extra.update(extra_options or {})
    float_ops = target.float_op_types if target else _DEFAULT_FLOAT_OPS
    with _staging(out_path) as tmp:
        if preprocess:
            model_in, prep_notes = prepare_onnx(fp32_path, tmp / "prepared.onnx")
            notes.extend(prep_notes)
        else:
            check_runnable(fp32_path)
            model_in = fp32_path
        names = set(graph_node_names(model_in))
        unknown = [n for n in options.exclude if n not in names]
        if unknown:
            sample = ", ".join(sorted(names)[:8])
            raise ConversionError(
                f"nodes to keep in float not found in the (pre-processed) graph: {unknown}; use node "
                f"names of the pre-processed model (e.g. {sample}) - converters.sensitivity_onnx "
                "lists them"
            )
        tmp_out = tmp / "model.int8.onnx"
        chatter = io.StringIO()  # ORT's histogram calibrators print progress to stdout
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
                warnings.simplefilter("ignore", DeprecationWarning)
                q.quantize_static(
                    str(model_in),
                    str(tmp_out),
                    calibration_data_reader=make_data_reader(calib, input_name),
                    quant_format=q.QuantFormat.QDQ,
                    op_types_to_quantize=default_op_types(float_ops),
                    per_channel=options.per_channel,
                    reduce_range=options.reduce_range,
                    activation_type=getattr(q.QuantType, _QTYPES[options.activation]),
                    weight_type=getattr(q.QuantType, _QTYPES[options.weight]),
                    nodes_to_exclude=list(options.exclude),
                    calibrate_method=getattr(q.CalibrationMethod, _METHODS[options.method]),
                    extra_options=extra,
                    calibration_cache_path=str(calibration_cache) if calibration_cache else None,
                )
        except MissingDependencyError:
            raise
        except Exception as exc:
            raise ConversionError(
                f"ONNX Runtime's quantizer failed on {fp32_path.name}: {_first_line(exc)}; try "
                "--method minmax, keep the failing node in float (--exclude NODE), or check that "
                "the model runs in fp32"
            ) from exc
        finally:
            if chatter.getvalue().strip():
                log.debug("onnxruntime.quantization: %s", chatter.getvalue().strip())
        if compact_names:
            saved = _compact_qdq_names(tmp_out, model_in)
            if saved > 1024:
                notes.append(f"Q/DQ tensor names shortened ({saved / 1024:.0f} kB smaller)")
        _verify(tmp_out, input_name, calib.inputs[:1], "int8")
        _commit(tmp_out, out_path)
    notes.insert(0, _describe(options))
    precision: Precision = "mixed" if options.exclude else "int8"
    log.info("quantized %s -> %s (%s)", fp32_path.name, out_path.name, notes[0])
    return Artifact("onnx", precision, out_path, float_nodes=list(options.exclude), notes=notes)


_QDQ_SUFFIXES = (
    "_QuantizeLinear_Output",
    "_DequantizeLinear_Output",
    "_quantized",
    "_scale",
    "_zero_point",
)


def _compact_qdq_names(path: Path, source: Path) -> int:
    """Rename the tensors and nodes ORT's quantizer added (``q<n>``); returns bytes saved.

    Only names that end in the quantizer's suffixes and do not exist in ``source`` are touched;
    graph inputs/outputs and the original nodes keep their names. The optional ``value_info``
    (shape hints, re-inferred by every runtime) is dropped.
    """
    onnx = deps.onnx()
    model = onnx.load(str(path))
    before = model.ByteSize()
    src = onnx.load(str(source))
    taken = {t for n in src.graph.node for t in (*n.input, *n.output)}
    taken |= {i.name for i in src.graph.initializer} | {i.name for i in src.graph.input}
    taken |= {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    names = {n.name for n in src.graph.node}
    mapping: dict[str, str] = {}

    def short(name: str) -> str:
        if name in taken or not name.endswith(_QDQ_SUFFIXES):
            return name
        if name not in mapping:
            new = f"q{len(mapping)}"
            while new in taken:
                new += "_"
            mapping[name] = new
        return mapping[name]

    for i, node in enumerate(model.graph.node):
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.name not in names:
            node.name = f"{'Q' if node.op_type == 'QuantizeLinear' else 'DQ'}_{i}"
            while node.name in names:
                node.name += "_"
        node.input[:] = [short(t) for t in node.input]
        node.output[:] = [short(t) for t in node.output]
    for init in model.graph.initializer:
        init.name = short(init.name)
    del model.graph.value_info[:]
    onnx.save(model, str(path))
    return int(before - model.ByteSize())


def _verify(path: Path, input_name: str, sample: npt.NDArray[np.float32], what: str) -> None:
    """The produced model must load in ORT and give finite outputs for a real sample."""
    try:
        outs = _session(path).run(None, {input_name: np.ascontiguousarray(sample, np.float32)})
    except Exception as exc:
        raise ConversionError(
            f"the {what} model ONNX Runtime produced does not run ({_first_line(exc)}); keep the "
            "failing node in float (--exclude) or report the model"
        ) from exc
    for out in outs:
        arr = np.asarray(out)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ConversionError(f"the {what} model gives NaN/inf outputs; keep more nodes in float")


# --------------------------------------------------------------------------- fp16


def convert_fp16(fp32_path: Path, out: Path, *, keep_io_types: bool = True) -> Artifact | Skipped:
    """float16 weights and compute, float32 inputs/outputs (``keep_io_types``), or :class:`Skipped`.

    fp16 pays off on GPUs (Jetson/TensorRT, CUDA) and halves the file; on x86 CPUs ORT runs most
    fp16 ops through casts and is usually slower than fp32.
    """
    fp32_path, out = Path(fp32_path), Path(out)
    onnx = deps.onnx()
    try:
        from onnxruntime.transformers import float16
    except ImportError as exc:
        return Skipped("onnx", "fp16", f"onnxruntime.transformers.float16 is not available ({exc})")
    model = _load_onnx(fp32_path)
    input_name = _input_info(fp32_path)[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            converted = float16.convert_float_to_float16(model, keep_io_types=keep_io_types)
    except Exception as exc:  # noqa: BLE001 - reported as Skipped, never silently
        return Skipped("onnx", "fp16", f"float16 conversion failed: {_first_line(exc)}")
    with _staging(out) as tmp:
        tmp_out = tmp / "model.fp16.onnx"
        onnx.save(converted, str(tmp_out))
        shape = [d or 1 for d in _input_info(fp32_path)[1]]
        try:
            _verify(tmp_out, input_name, np.zeros(shape, np.float32), "fp16")
        except ConversionError as exc:
            return Skipped("onnx", "fp16", str(exc))
        _commit(tmp_out, out)
    return Artifact("onnx", "fp16", out, notes=["float16 weights/compute, float32 inputs and outputs"])
