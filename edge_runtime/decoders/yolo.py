"""YOLO detection decoder (``manifest.decoder.kind = "yolo"``).

Supported heads (output 0, batch size 1):

* ``layout="v8"`` (YOLOv8/v11 style, no objectness): ``(1, 4 + C, N)`` or the transposed
  ``(1, N, 4 + C)``; rows ``cx, cy, w, h, score_0 .. score_{C-1}``. With labels, the axis of
  size ``4 + len(labels)`` is the channel axis; without labels the smaller axis is.
* ``layout="v5"`` (YOLOv5/v7 style): ``(1, N, 5 + C)``; columns ``cx, cy, w, h, objectness,
  class scores``; the detection score is ``objectness * class score``.

Each box takes its best class (one detection per box). Boxes are filtered by
``conf_threshold`` (strictly greater), go through class-aware NMS (or class-agnostic) and at
most ``max_detections`` are reported, best first, mapped to source-frame pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_runtime.decoders.nms import (
    cxcywh_to_xyxy,
    detection_payload,
    select_detections,
    squeeze_batch,
)
from edge_runtime.decoders.specs import YoloSpec
from edge_runtime.errors import DecoderError
from edge_runtime.types import ImageTransform

__all__ = ["MAX_NMS_CANDIDATES", "YoloDecoder"]

MAX_NMS_CANDIDATES = 30000
"""At most this many above-threshold boxes (the best ones) go into NMS."""


class YoloDecoder:
    """Decodes raw YOLO head outputs into detections; see the module docstring."""

    def __init__(self, spec: YoloSpec, labels: Sequence[str]) -> None:
        self.spec = spec
        self.labels: tuple[str, ...] = tuple(labels)
        self._v5 = spec.layout == "v5"
        self._box_cols = 5 if self._v5 else 4
        self._want = self._box_cols + len(self.labels) if self.labels else None
        self._conf = spec.conf_threshold

    def _layout_error(self, shape: tuple[int, ...]) -> DecoderError:
        n = len(self.labels)
        if self._v5:
            expected = (
                f"(1, N, {self._want}) = (1, N, 5 + C) with C = len(labels) = {n}"
                if self._want
                else "(1, N, 5 + C) with C >= 1"
            )
        else:
            expected = (
                f"(1, {self._want}, N) or (1, N, {self._want}), i.e. 4 + C with C = len(labels) = {n}"
                if self._want
                else "(1, 4 + C, N) or (1, N, 4 + C) with C >= 1"
            )
        other = "v8" if self._v5 else "v5"
        return DecoderError(
            f"yolo decoder (layout={self.spec.layout!r}): output 0 has shape {shape}, expected "
            f"{expected}; fix manifest.labels (one per class) or set manifest.decoder.layout to "
            f"{other!r} if the model {'has no' if self._v5 else 'has an'} objectness column"
        )

    def _channels_first(self, pred: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Return the prediction as ``(box_cols + C, N)`` (a view, no copy)."""
        rows, cols = int(pred.shape[0]), int(pred.shape[1])
        if self._v5:
            ok = cols == self._want if self._want else cols > self._box_cols
            if not ok:
                raise self._layout_error((1, rows, cols))
            return pred.T
        if self._want:
            if rows == self._want:
                return pred
            if cols == self._want:
                return pred.T
            raise self._layout_error((1, rows, cols))
        if min(rows, cols) <= self._box_cols:
            raise self._layout_error((1, rows, cols))
        return pred if rows <= cols else pred.T

    def decode(self, outputs: Sequence[npt.NDArray[Any]], transform: ImageTransform | None) -> dict[str, Any]:
        """Return ``{"task": "detection", "detections": [...]}`` for one frame."""
        if len(outputs) < 1:
            raise DecoderError(
                "yolo decoder: the model gave no outputs, expected 1 output such as "
                "(1, 84, 8400); check manifest.decoder.kind"
            )
        pred = squeeze_batch(
            np.asarray(outputs[0]),
            2,
            f"yolo decoder (layout={self.spec.layout!r})",
            "expected (1, 4 + C, N) / (1, N, 4 + C) for layout 'v8' or (1, N, 5 + C) for "
            "'v5'; check manifest.decoder.kind and manifest.decoder.layout",
        )
        pc = self._channels_first(pred)
        bc = self._box_cols
        cls = pc[bc:]
        # float64 scores: exact products of float32 values, exact threshold comparison.
        best = cls.max(axis=0).astype(np.float64)
        if self._v5:
            with np.errstate(invalid="ignore"):  # inf * 0 -> NaN, filtered below
                best *= pc[4]
        idx = np.flatnonzero(best > self._conf)  # NaN scores never pass
        if idx.size > MAX_NMS_CANDIDATES:
            part = np.argpartition(-best[idx], MAX_NMS_CANDIDATES - 1)
            idx = np.sort(idx[part[:MAX_NMS_CANDIDATES]])
        boxes = pc[:4, idx].T.astype(np.float64)
        finite = np.isfinite(boxes).all(axis=1)
        if not finite.all():
            idx = idx[finite]
            boxes = boxes[finite]
        scores = best[idx]
        class_ids = cls[:, idx].argmax(axis=0).astype(np.int64)
        xyxy = cxcywh_to_xyxy(boxes)
        keep = select_detections(
            xyxy,
            scores,
            class_ids,
            iou_threshold=self.spec.iou_threshold,
            max_detections=self.spec.max_detections,
            class_agnostic=self.spec.class_agnostic,
        )
        return detection_payload(
            xyxy[keep],
            scores[keep],
            class_ids[keep],
            self.labels,
            transform,
            normalized=self.spec.normalized,
        )
