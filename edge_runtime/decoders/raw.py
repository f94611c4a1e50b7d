"""Raw / regression decoder with an optional anomaly flag (``manifest.decoder.kind = "raw"``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_runtime.decoders.specs import RawSpec
from edge_runtime.errors import DecoderError
from edge_runtime.types import ImageTransform

__all__ = ["RawDecoder"]


def _sig(x: float) -> float:
    """Round to 6 significant digits (keeps tiny regression values meaningful)."""
    return float(f"{x:.6g}")


class RawDecoder:
    """Reports the first ``max_values`` values of output 0 and a score.

    ``score`` is ``first`` (element 0), ``max`` or ``l2`` (Euclidean norm) of output 0,
    flattened. With ``anomaly_threshold`` set the payload also has ``anomaly: score >
    threshold``. Values and score are rounded to 6 significant digits; NaN stays NaN.
    """

    def __init__(self, spec: RawSpec, labels: Sequence[str]) -> None:
        self.spec = spec
        self.labels: tuple[str, ...] = tuple(labels)
        self._max_values = spec.max_values
        self._threshold = spec.anomaly_threshold

    def decode(self, outputs: Sequence[npt.NDArray[Any]], transform: ImageTransform | None) -> dict[str, Any]:
        """Return ``{"task": "raw", "values": [...], "score": float}`` (+ ``"anomaly"``)."""
        del transform
        if len(outputs) < 1:
            raise DecoderError(
                "raw decoder: the model gave no outputs, expected at least 1; check manifest.decoder.kind"
            )
        flat = np.asarray(outputs[0]).reshape(-1)
        if flat.size == 0:
            raise DecoderError(
                f"raw decoder: output 0 has shape {tuple(np.shape(outputs[0]))} with no values, "
                f"expected at least 1 value to compute score={self.spec.score!r}; check "
                "manifest.decoder.kind"
            )
        mode = self.spec.score
        if mode == "first":
            score = float(flat[0])
        elif mode == "max":
            score = float(np.max(flat))
        else:
            f64 = flat.astype(np.float64)
            score = float(np.sqrt(np.dot(f64, f64)))
        head = flat[: self._max_values].astype(np.float64).tolist()
        out: dict[str, Any] = {
            "task": "raw",
            "values": [_sig(v) for v in head],
            "score": _sig(score),
        }
        if self._threshold is not None:
            out["anomaly"] = bool(score > self._threshold)
        return out
