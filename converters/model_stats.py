"""Model size and compute statistics: parameters, MACs, file and gzip size, and CPU latency.

ONNX (:func:`onnx_stats`): parameters are the elements of the weight initializers (floating
point and 8-bit tensors; int32/int64 shape and index constants are not weights). MACs
(multiply-accumulates, batch size 1 where the batch is dynamic) are counted for the layers
that dominate compute, from shapes after ``onnx.shape_inference``:

* ``Conv`` / ``ConvTranspose`` / ``QLinearConv`` / ``ConvInteger``: output elements x
  ``C_in / group`` x kernel area (grouped and depthwise convolutions included);
* ``Gemm``, ``MatMul``, ``QLinearMatMul``, ``MatMulInteger``: output elements x the reduced
  dimension ``K``.

Element-wise ops, pooling and normalisation are not counted (they are memory-bound and small
next to convolutions). Keras (:func:`keras_stats`) counts the same way for ``Conv2D``,
``DepthwiseConv2D``, ``SeparableConv2D``, ``Conv1D`` and ``Dense``.

:func:`compare_latency` times several ONNX models the only fair way on a shared, noisy CPU:
interleaved (one run of each model per round, order rotating), reporting medians.

Example::

    >>> stats = onnx_stats("model.onnx")                       # doctest: +SKIP
    >>> print(stats.params, stats.macs, stats.file_bytes)      # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from converters import deps
from edge_runtime.errors import ConversionError

__all__ = [
    "LayerStats",
    "ModelStats",
    "compare_latency",
    "gzip_size",
    "keras_stats",
    "load_onnx",
    "onnx_stats",
    "random_inputs",
]

log = logging.getLogger(__name__)

_WEIGHT_TYPES = {1, 2, 3, 10, 11, 16}
"""ONNX TensorProto data types that count as parameters: float, uint8, int8, float16, double, bf16."""

_CONV_OPS = {"Conv", "ConvTranspose", "QLinearConv", "ConvInteger"}
_MATMUL_OPS = {"Gemm", "MatMul", "QLinearMatMul", "MatMulInteger"}


def _import_onnx() -> Any:
    return deps.onnx("Reading ONNX models and counting their parameters and MACs")


def _import_ort() -> Any:
    return deps.onnxruntime("Timing ONNX models")


@dataclass
class LayerStats:
    """One compute layer: its parameters and MACs (batch 1)."""

    name: str
    op_type: str
    params: int
    macs: int
    out_channels: int | None = None
    in_channels: int | None = None


@dataclass
class ModelStats:
    """Whole-model totals plus the compute layers (``layers``) in graph order."""

    params: int
    macs: int
    file_bytes: int | None = None
    gzip_bytes: int | None = None
    layers: list[LayerStats] = field(default_factory=list)

    def layer(self, name: str) -> LayerStats | None:
        """The layer called ``name`` (``None`` when there is none)."""
        for lay in self.layers:
            if lay.name == name:
                return lay
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def gzip_size(data: bytes | str | Path, level: int = 9) -> int:
    """Size in bytes of ``data`` (bytes, or a file path) after gzip at ``level``."""
    raw = data if isinstance(data, bytes) else Path(data).read_bytes()
    return len(gzip.compress(raw, compresslevel=level, mtime=0))


def load_onnx(model: Any) -> Any:
    """An ``onnx.ModelProto`` from a path or a proto (loaded protos are returned as they are)."""
    onnx = _import_onnx()
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise ConversionError(f"ONNX model {str(path)!r} does not exist; pass the path of a .onnx file")
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise ConversionError(
            f"cannot read ONNX model {str(path)!r}: {exc}; check that it is a complete .onnx file"
        ) from exc


def _static_dims(vi: Any) -> list[int] | None:
    """The dims of a value_info/graph input, dynamic ones as 1; ``None`` without a shape."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in t.shape.dim]


def infer_shapes(model: Any) -> dict[str, list[int]]:
    """Static shapes (dynamic dims as 1) of every tensor onnx shape inference can work out."""
    onnx = _import_onnx()
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise ConversionError(
            f"ONNX shape inference failed: {exc}; run onnx.checker.check_model on the model and fix "
            "the reported problem"
        ) from exc
    shapes: dict[str, list[int]] = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        dims = _static_dims(vi)
        if dims is not None:
            shapes[vi.name] = dims
    for init in g.initializer:
        shapes[init.name] = [int(d) for d in init.dims]
    return shapes


def _attr(node: Any, name: str, default: Any) -> Any:
    onnx = _import_onnx()
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _prod(dims: Sequence[int]) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


def _node_macs(node: Any, shapes: Mapping[str, Sequence[int]]) -> tuple[int, int | None, int | None]:
    """MACs, output channels and input channels of one compute node (0 when unknown)."""
    op = node.op_type
    if op in _CONV_OPS:
        w_idx = 3 if op == "QLinearConv" else 1
        if len(node.input) <= w_idx or node.input[w_idx] not in shapes or node.output[0] not in shapes:
            return 0, None, None
        w = list(shapes[node.input[w_idx]])
        out = list(shapes[node.output[0]])
        group = int(_attr(node, "group", 1))
        if op == "ConvTranspose":
            x = list(shapes.get(node.input[0], []))
            if not x:
                return 0, None, None
            # each input element is multiplied with (C_out / group) x kernel weights
            macs = _prod(x) * _prod(w[1:])
            return macs, int(w[1]) * group, int(w[0])
        return _prod(out) * _prod(w[1:]), int(w[0]), int(w[1]) * group
    if op in _MATMUL_OPS:
        a_idx, b_idx = (0, 3) if op == "QLinearMatMul" else (0, 1)
        names = (node.input[a_idx], node.input[b_idx], node.output[0])
        if not all(n in shapes for n in names):
            return 0, None, None
        a, b, out = (list(shapes[n]) for n in names)
        if op == "Gemm":
            k = a[0] if int(_attr(node, "transA", 0)) else a[-1]
            n_out = b[0] if int(_attr(node, "transB", 0)) else b[-1]
        else:
            k = a[-1]
            n_out = b[-1]
        return _prod(out) * int(k), int(n_out), int(k)
    return 0, None, None


def _weight_params(model: Any) -> dict[str, int]:
    """Element count of every weight initializer / Constant tensor, by tensor name."""
    out: dict[str, int] = {}
    g = model.graph
    for init in g.initializer:
        if init.data_type in _WEIGHT_TYPES:
            out[init.name] = _prod(init.dims)
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in _WEIGHT_TYPES:
                    out[node.output[0]] = _prod(a.t.dims)
    return out


def onnx_stats(model: Any, path: str | Path | None = None) -> ModelStats:
    """Parameters, MACs and (with a file) file and gzip size of an ONNX model.

    ``model`` is a path or an ``onnx.ModelProto``; ``path`` gives the file to measure when a
    proto is passed. Per-layer rows cover the compute nodes (Conv/Gemm/MatMul families);
    a layer's ``params`` are the weight tensors it reads (weight, bias, and for quantized
    layers the quantized weight).
    """
    proto = load_onnx(model)
    file_path: Path | None = None
    if path is not None:
        file_path = Path(path)
    elif not isinstance(model, type(proto)) and isinstance(model, (str, Path)):
        file_path = Path(model)
    shapes = infer_shapes(proto)
    weights = _weight_params(proto)
    layers: list[LayerStats] = []
    for node in proto.graph.node:
        if node.op_type not in _CONV_OPS | _MATMUL_OPS:
            continue
        macs, cout, cin = _node_macs(node, shapes)
        params = sum(weights.get(i, 0) for i in dict.fromkeys(node.input))
        layers.append(LayerStats(node.name or node.output[0], node.op_type, params, macs, cout, cin))
    total_params = sum(weights.values())
    total_macs = sum(lay.macs for lay in layers)
    if file_path is not None and file_path.is_file():
        raw = file_path.read_bytes()
    else:
        raw = proto.SerializeToString()
    return ModelStats(
        params=total_params,
        macs=total_macs,
        file_bytes=len(raw),
        gzip_bytes=gzip_size(raw),
        layers=layers,
    )


def keras_stats(model: Any) -> ModelStats:
    """Parameters (``count_params``) and MACs (batch 1) of a built Keras model.

    MACs are counted for ``Conv1D``/``Conv2D`` (incl. ``groups``), ``DepthwiseConv2D``,
    ``SeparableConv2D`` and ``Dense`` from each layer's output shape; other layers count 0.
    """
    layers: list[LayerStats] = []
    for layer in _all_layers(model):
        cls = type(layer).__name__
        if cls not in {"Conv1D", "Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense"}:
            continue
        try:
            out_shape = [int(d) if d is not None else 1 for d in layer.output.shape]
            in_shape = [int(d) if d is not None else 1 for d in layer.input.shape]
        except (AttributeError, ValueError):
            continue
        spatial = _prod(out_shape[1:-1])
        cin = in_shape[-1]
        cout = out_shape[-1]
        if cls == "Dense":
            macs = _prod(out_shape[:-1]) * cin * cout
        elif cls == "DepthwiseConv2D":
            k = _prod(layer.kernel_size)
            macs = spatial * cout * k
        elif cls == "SeparableConv2D":
            k = _prod(layer.kernel_size)
            mid = cin * int(layer.depth_multiplier)
            macs = spatial * mid * k + spatial * mid * cout
        else:
            k = _prod(layer.kernel_size)
            macs = spatial * cout * k * cin // int(getattr(layer, "groups", 1))
        layers.append(LayerStats(layer.name, cls, int(layer.count_params()), int(macs), cout, cin))
    return ModelStats(params=int(model.count_params()), macs=sum(x.macs for x in layers), layers=layers)


def _all_layers(model: Any) -> list[Any]:
    out: list[Any] = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers and type(layer).__name__ in {"Functional", "Sequential"}:
            out.extend(_all_layers(layer))
        else:
            out.append(layer)
    return out


_NP_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


def random_inputs(session: Any, seed: int = 0) -> dict[str, npt.NDArray[Any]]:
    """One random input per model input of an ORT session (dynamic dims as 1)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, npt.NDArray[Any]] = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        dtype = _NP_TYPES.get(inp.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.uniform(0.0, 1.0, shape).astype(dtype)
        else:
            feeds[inp.name] = rng.integers(0, 100, shape).astype(dtype)
    return feeds


def make_session(model: Any, threads: int = 2) -> Any:
    """A CPU ORT session (``threads`` intra-op threads, full graph optimisation, quiet)."""
    ort = _import_ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ConversionError(
            f"onnxruntime cannot load the model: {exc}; check the file with onnx.checker and that its "
            "opset is supported by the installed onnxruntime"
        ) from exc


def compare_latency(
    models: Mapping[str, str | Path | bytes],
    *,
    threads: int = 2,
    rounds: int = 30,
    warmup: int = 3,
    repeat: int = 1,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Interleaved CPU latency of several ONNX models on the same random input.

    Each round runs every model ``repeat`` times (the order rotates from round to round) so
    machine noise hits all models alike. Returns, per model key, ``median_ms``, ``p10_ms``, ``p90_ms``,
    ``speedup`` (the first model's median divided by this one's) and ``speedup_paired`` (the
    median over rounds of the per-round ratio: the most robust figure on a loaded machine).
    """
    if not models:
        raise ConversionError("compare_latency needs at least one model")
    sessions = {k: make_session(v, threads) for k, v in models.items()}
    feeds = {k: random_inputs(s, seed) for k, s in sessions.items()}
    keys = list(sessions)
    for _ in range(warmup):
        for k in keys:
            sessions[k].run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]
        for k in order:
            t0 = time.perf_counter()
            for _ in range(repeat):
                sessions[k].run(None, feeds[k])
            times[k].append((time.perf_counter() - t0) * 1000.0 / repeat)
    first = statistics.median(times[keys[0]])
    base = np.asarray(times[keys[0]])
    out: dict[str, dict[str, float]] = {}
    for k in keys:
        med = statistics.median(times[k])
        out[k] = {
            "median_ms": med,
            "p10_ms": float(np.percentile(times[k], 10)),
            "p90_ms": float(np.percentile(times[k], 90)),
            "speedup": first / med if med > 0 else float("nan"),
            # paired: the ratio within each round, where both models saw the same machine load
            "speedup_paired": float(np.median(base / np.maximum(np.asarray(times[k]), 1e-9))),
        }
    log.info(
        "latency (threads=%d, %d rounds): %s",
        threads,
        rounds,
        {k: round(v["median_ms"], 3) for k, v in out.items()},
    )
    return out
