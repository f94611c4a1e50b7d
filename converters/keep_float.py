"""Which ops stay float by the user's choice or because int8 does not pay for them.

* ``--keep-float`` entries name ops of one format (``onnx:NODE``, ``tflite:OP``) or either
  (a bare name is looked up in both, and must exist in at least one);
* the *input ops* are the ops between the model input and its first convolution or matrix
  product: per-input standardization (mean, variance, rsqrt, divide) that costs little in float
  but runs on slow reference kernels in int8 on XNNPACK (measured: shapes96 LiteRT int8 1.97x
  faster than fp32 with them int8, 3.31x with them float; docs/performance.md). ``edgert convert
  --float-input-ops auto`` builds both variants and keeps the faster one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from edge_runtime.errors import ConversionError

__all__ = ["keep_float_names", "onnx_input_ops", "onnx_node_names", "tflite_input_ops"]

_ONNX_HEAVY = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
_TFLITE_HEAVY = frozenset(
    {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV"}
)


def _onnx_graph(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


def onnx_node_names(path: Path) -> list[str]:
    """Names of the nodes of an ONNX model, in graph order."""
    return [n.name for n in _onnx_graph(path).node if n.name]


def onnx_input_ops(path: Path) -> list[str]:
    """Named ONNX nodes that come before the first Conv/MatMul/Gemm in graph (topological) order."""
    names: list[str] = []
    for node in _onnx_graph(path).node:
        if node.op_type in _ONNX_HEAVY:
            return names
        if node.name:
            names.append(node.name)
    return []  # no convolution or product at all: nothing is an "input op"


def tflite_input_ops(source: Any) -> list[str]:
    """Output names of the float TFLite model's ops before its first convolution/fully connected op."""
    from converters.tflite_quant import tflite_ops

    names: list[str] = []
    for op in tflite_ops(source.float_tflite_bytes()):
        if op.type in _TFLITE_HEAVY:
            return names
        names.append(op.name)
    return []


def keep_float_names(
    entries: Sequence[str], fmt: Literal["onnx", "tflite"], names: Sequence[str], formats: Sequence[str]
) -> list[str]:
    """The ``--keep-float`` entries that apply to ``fmt``, checked against its op ``names``.

    Raises :class:`ConversionError` for an entry that names no op in any requested format.
    """
    known = set(names)
    out: list[str] = []
    for entry in entries:
        prefix, sep, rest = entry.partition(":")
        if sep and prefix in ("onnx", "tflite"):
            if prefix != fmt:
                continue
            if rest not in known:
                raise ConversionError(
                    f"--keep-float {entry!r}: the {fmt} model has no op named {rest!r}; see report.json "
                    "'per_layer' for the names"
                )
            out.append(rest)
        elif entry in known:
            out.append(entry)
        elif len(formats) == 1:
            raise ConversionError(
                f"--keep-float {entry!r}: the {fmt} model has no op of that name; see report.json "
                f"'per_layer' for the names (prefix onnx: or tflite: to aim at one format)"
            )
    return out
