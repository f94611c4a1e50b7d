"""Top-k classification decoder (``manifest.decoder.kind = "classification"``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_runtime.decoders.nms import label_for
from edge_runtime.decoders.specs import ClassificationSpec
from edge_runtime.errors import DecoderError
from edge_runtime.types import ImageTransform

__all__ = ["ClassificationDecoder", "looks_like_probabilities", "softmax"]

_PROB_SUM_TOLERANCE = 1e-3


def softmax(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Numerically stable softmax of a 1-d vector (NaNs propagate)."""
    finite = x[np.isfinite(x)]
    shift = float(finite.max()) if finite.size else 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(x - shift)
        total = float(e.sum())
        out: npt.NDArray[np.float64] = e / total if total > 0.0 else e
    return out


def looks_like_probabilities(x: npt.NDArray[np.float64]) -> bool:
    """True when every value is in [0, 1] and they sum to 1 within 1e-3."""
    if x.size == 0 or not bool(np.all((x >= 0.0) & (x <= 1.0))):
        return False
    return abs(float(x.sum()) - 1.0) <= _PROB_SUM_TOLERANCE


class ClassificationDecoder:
    """Turns a class-score vector into the ``top_k`` best classes.

    Output 0 must hold one score per class: shape ``(1, C)`` or any shape with a single
    axis larger than 1, e.g. ``(1, 1, 1, C)``. Further outputs are ignored. Entries below
    ``min_score`` are dropped when ``min_score > 0``; NaN scores always are.
    """

    def __init__(self, spec: ClassificationSpec, labels: Sequence[str]) -> None:
        self.spec = spec
        self.labels: tuple[str, ...] = tuple(labels)
        self._top_k = spec.top_k
        self._min_score = spec.min_score
        self._softmax = spec.softmax

    def decode(self, outputs: Sequence[npt.NDArray[Any]], transform: ImageTransform | None) -> dict[str, Any]:
        """Return ``{"task": "classification", "top": [{"index", "label", "score"}, ...]}``."""
        del transform  # classification has no geometry
        if len(outputs) < 1:
            raise DecoderError(
                "classification decoder: the model gave no outputs, expected 1 output of "
                "shape (1, C); check that the bundle's model matches manifest.decoder.kind"
            )
        raw = np.asarray(outputs[0])
        if raw.size == 0 or sum(1 for d in raw.shape if d != 1) > 1:
            raise DecoderError(
                f"classification decoder: output 0 has shape {tuple(raw.shape)}, expected one "
                "score vector of shape (1, C) with C > 0 (batch size 1); set "
                "manifest.decoder.kind to the right decoder for this model"
            )
        x = raw.reshape(-1).astype(np.float64)
        if self._softmax == "always" or (self._softmax == "auto" and not looks_like_probabilities(x)):
            x = softmax(x)

        k = min(self._top_k, x.size)
        neg = -x
        if k < x.size:
            cand = np.argpartition(neg, k - 1)[:k]
            idx = cand[np.argsort(neg[cand], kind="stable")]
        else:
            idx = np.argsort(neg, kind="stable")
        scores = x[idx]
        # NaN scores are always dropped; min_score 0 (the default) filters nothing else,
        # so raw negative scores survive with softmax="never".
        keep = scores >= self._min_score if self._min_score > 0.0 else ~np.isnan(scores)
        idx = idx[keep]
        score_list: list[float] = np.round(scores[keep], 4).tolist()
        index_list: list[int] = idx.tolist()
        return {
            "task": "classification",
            "top": [
                {"index": i, "label": label_for(self.labels, i), "score": s}
                for i, s in zip(index_list, score_list, strict=True)
            ],
        }
