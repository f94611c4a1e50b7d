"""SSD-style post-processed detection decoder (``manifest.decoder.kind = "ssd"``).

For models that already decode their anchors (e.g. TFLite ``TFLite_Detection_PostProcess``):
four outputs, picked by the spec's ``*_index`` fields:

* boxes ``(1, N, 4)`` in ``box_order`` (``yxyx`` or ``xyxy``), 0..1 of the model input
  when ``normalized`` else model pixels;
* classes ``(1, N)`` (float or int class ids; ``label_offset`` is added);
* scores ``(1, N)``;
* count ``(1,)`` (optional): only the first ``count`` rows are valid.

Rows with ``score > conf_threshold`` are kept, class-aware NMS is applied again unless
``apply_nms=False``, and at most ``max_detections`` are reported, best first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_runtime.decoders.nms import detection_payload, select_detections, squeeze_batch
from edge_runtime.decoders.specs import SSDSpec
from edge_runtime.errors import DecoderError
from edge_runtime.types import ImageTransform

__all__ = ["SSDDecoder"]

_YXYX_TO_XYXY = np.array([1, 0, 3, 2], dtype=np.intp)
_ID_LIMIT = float(2**31)


class SSDDecoder:
    """Decodes SSD post-processed outputs into detections; see the module docstring."""

    def __init__(self, spec: SSDSpec, labels: Sequence[str]) -> None:
        self.spec = spec
        self.labels: tuple[str, ...] = tuple(labels)
        fields = {
            "boxes_index": spec.boxes_index,
            "classes_index": spec.classes_index,
            "scores_index": spec.scores_index,
        }
        if spec.count_index is not None:
            fields["count_index"] = spec.count_index
        self._fields = fields
        self._needed = max(fields.values()) + 1
        self._order = _YXYX_TO_XYXY if spec.box_order == "yxyx" else None

    def _output(
        self, outputs: Sequence[npt.NDArray[Any]], field: str, ndim: int, what: str
    ) -> npt.NDArray[Any]:
        index = self._fields[field]
        return squeeze_batch(
            np.asarray(outputs[index]),
            ndim,
            f"ssd decoder: {what} (output {index}, manifest.decoder.{field})",
            f"expected {what}; fix manifest.decoder.{field} to point at the right output",
        )

    def decode(self, outputs: Sequence[npt.NDArray[Any]], transform: ImageTransform | None) -> dict[str, Any]:
        """Return ``{"task": "detection", "detections": [...]}`` for one frame."""
        if len(outputs) < self._needed:
            shapes = [tuple(np.shape(o)) for o in outputs]
            fields = ", ".join(f"{k}={v}" for k, v in self._fields.items())
            raise DecoderError(
                f"ssd decoder: the model gave {len(outputs)} outputs {shapes}, but the manifest "
                f"needs at least {self._needed} ({fields}); fix those manifest.decoder fields "
                "(count_index=null when the model has no count output)"
            )
        boxes = self._output(outputs, "boxes_index", 2, "boxes of shape (1, N, 4)")
        classes = self._output(outputs, "classes_index", 1, "classes of shape (1, N)")
        scores = self._output(outputs, "scores_index", 1, "scores of shape (1, N)")
        n = int(boxes.shape[0])
        if boxes.shape[1] != 4 or classes.shape[0] != n or scores.shape[0] != n:
            raise DecoderError(
                f"ssd decoder: boxes (output {self.spec.boxes_index}) {(1, *boxes.shape)}, "
                f"classes (output {self.spec.classes_index}) {(1, *classes.shape)}, scores "
                f"(output {self.spec.scores_index}) {(1, *scores.shape)}; expected (1, N, 4), "
                "(1, N), (1, N) with the same N; fix manifest.decoder.boxes_index / "
                "classes_index / scores_index"
            )
        if self.spec.count_index is not None:
            count = np.asarray(outputs[self.spec.count_index])
            if count.size != 1:
                raise DecoderError(
                    f"ssd decoder: count (output {self.spec.count_index}) has shape "
                    f"{tuple(count.shape)}, expected (1,); fix manifest.decoder.count_index "
                    "or set it to null when the model has no count output"
                )
            c = float(count.reshape(-1)[0])
            # A non-finite count means nothing valid; never trust garbage rows.
            n = min(n, max(round(c), 0)) if math.isfinite(c) else 0

        sc = scores[:n].astype(np.float64)
        cl = classes[:n].astype(np.float64)
        bx = boxes[:n].astype(np.float64)
        keep_mask = (sc > self.spec.conf_threshold) & np.isfinite(cl) & np.isfinite(bx).all(1)
        sel = np.flatnonzero(keep_mask)
        sc = sc[sel]
        bx = bx[sel]
        if self._order is not None:
            bx = bx[:, self._order]
        class_ids = np.rint(np.clip(cl[sel], -_ID_LIMIT, _ID_LIMIT)).astype(np.int64) + self.spec.label_offset
        keep = select_detections(
            bx,
            sc,
            class_ids,
            iou_threshold=self.spec.iou_threshold,
            max_detections=self.spec.max_detections,
            use_nms=self.spec.apply_nms,
        )
        return detection_payload(
            bx[keep],
            sc[keep],
            class_ids[keep],
            self.labels,
            transform,
            normalized=self.spec.normalized,
        )
