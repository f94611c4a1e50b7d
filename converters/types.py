"""Value types shared by the converter's steps (calibration, quantization, pruning, report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = ["Artifact", "CalibrationSet", "QuantOptions", "Skipped"]

Format = Literal["onnx", "tflite"]
Precision = Literal["fp32", "fp16", "int8", "mixed"]


@dataclass
class CalibrationSet:
    """Model inputs after the device's preprocessing, as float32 model-logical values.

    ``inputs`` has shape ``(N, *input_shape_without_batch)`` and is what the fp32 model takes;
    ``labels`` (class ids, shape ``(N,)``) is set for labelled evaluation data; ``boxes``
    (detectors) holds per sample a ``(K, 5)`` array of ground-truth rows ``class, x1, y1, x2,
    y2`` in model-input pixels.
    """

    inputs: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64] | None = None
    description: str = ""
    boxes: list[npt.NDArray[np.float64]] | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def batches(self, size: int = 1) -> Any:
        """Yield ``(size, ...)`` float32 batches (the last may be smaller)."""
        for i in range(0, len(self), size):
            yield self.inputs[i : i + size]


@dataclass(frozen=True)
class QuantOptions:
    """How to quantize (chosen per target by :mod:`converters.targets`, overridable)."""

    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    activation: Literal["uint8", "int8"] = "uint8"
    weight: Literal["int8", "uint8"] = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    exclude: tuple[str, ...] = ()  # node (ONNX) / tensor-op (TFLite) names kept in float


@dataclass
class Artifact:
    """One produced model file."""

    format: Format
    precision: Precision
    path: Path
    float_nodes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Skipped:
    """An output that could not be produced, and why (never silently skipped)."""

    format: Format
    precision: Precision
    reason: str
