"""Non-maximum suppression and shared detection post-processing, in pure numpy.

:func:`nms` is greedy NMS: take the highest-scoring box, drop every remaining box whose IoU
with it is above ``iou_threshold``, repeat. The IoU of one box against all remaining boxes is
computed vectorised, so the Python loop runs once per *kept* box (bounded by ``max_keep``),
never once per candidate. :func:`batched_nms` makes it class-aware with the coordinate-offset
trick: each class is shifted to its own disjoint region so boxes of different classes never
overlap, and a single :func:`nms` pass does the work of one pass per class.

The remaining helpers are shared by the YOLO and SSD decoders: squeezing the batch axis,
mapping boxes to the source frame and building the JSON payload.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_runtime.errors import DecoderError
from edge_runtime.types import ImageTransform

__all__ = ["batched_nms", "box_iou", "nms"]

FloatArray = npt.NDArray[np.floating[Any]]
IndexArray = npt.NDArray[np.intp]

_EMPTY_INDEX: IndexArray = np.empty(0, dtype=np.intp)
_EMPTY_INDEX.setflags(write=False)


def box_iou(box: npt.ArrayLike, boxes: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """IoU of one ``x1, y1, x2, y2`` box against each row of ``boxes`` (shape ``(N, 4)``).

    Boxes with ``x2 < x1`` or ``y2 < y1`` have zero area. Two zero-area boxes have IoU 0.
    """
    b = np.asarray(box, dtype=np.float64).reshape(4)
    bs = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    areas = np.maximum(bs[:, 2] - bs[:, 0], 0.0) * np.maximum(bs[:, 3] - bs[:, 1], 0.0)
    area = max(float(b[2] - b[0]), 0.0) * max(float(b[3] - b[1]), 0.0)
    cols = (bs[:, 0], bs[:, 1], bs[:, 2], bs[:, 3])
    return _iou_cols((float(b[0]), float(b[1]), float(b[2]), float(b[3])), area, cols, areas)


_Cols = tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
]


def _iou_cols(
    b: tuple[float, float, float, float],
    area: float,
    cols: _Cols,
    areas: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """IoU of box ``b`` (with ``area``) against boxes given as x1, y1, x2, y2 columns."""
    x1, y1, x2, y2 = cols
    iw = np.minimum(x2, b[2]) - np.maximum(x1, b[0])
    ih = np.minimum(y2, b[3]) - np.maximum(y1, b[1])
    np.maximum(iw, 0.0, out=iw)
    np.maximum(ih, 0.0, out=ih)
    inter = iw * ih
    union = areas + area - inter
    np.maximum(union, 1e-12, out=union)
    out: npt.NDArray[np.float64] = inter / union
    return out


_MATRIX_MAX = 128
"""Up to this many boxes NMS precomputes the full IoU matrix (one numpy pass)."""


def nms(
    boxes_xyxy: npt.ArrayLike,
    scores: npt.ArrayLike,
    iou_threshold: float,
    max_keep: int | None = None,
) -> IndexArray:
    """Greedy NMS; return indices of kept boxes, highest score first.

    ``boxes_xyxy`` is ``(N, 4)`` ``x1, y1, x2, y2``; ``scores`` is ``(N,)``. A box is
    suppressed when its IoU with an already kept box is strictly greater than
    ``iou_threshold``. At most ``max_keep`` indices are returned (all when ``None``).
    Equal scores keep their input order. Callers should drop non-finite rows beforehand.

    Boxes are sorted by score once; each kept box then suppresses, in one vectorised step,
    every lower-scored box it overlaps (views into the sorted columns, no gathers). The
    Python loop runs once per kept box, so ``max_keep`` bounds the work.
    """
    bs = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    sc = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = bs.shape[0]
    if n != sc.shape[0]:
        raise ValueError(f"nms: {n} boxes but {sc.shape[0]} scores")
    limit = n if max_keep is None else min(max_keep, n)
    if limit <= 0:
        return _EMPTY_INDEX.copy()
    order: IndexArray = np.argsort(-sc, kind="stable")
    srt = bs[order]
    x1 = np.ascontiguousarray(srt[:, 0])
    y1 = np.ascontiguousarray(srt[:, 1])
    x2 = np.ascontiguousarray(srt[:, 2])
    y2 = np.ascontiguousarray(srt[:, 3])
    areas = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    alive = np.ones(n, dtype=bool)
    over: npt.NDArray[np.bool_] | None = None
    if n <= _MATRIX_MAX:
        iw = np.minimum(x2[:, None], x2[None, :]) - np.maximum(x1[:, None], x1[None, :])
        ih = np.minimum(y2[:, None], y2[None, :]) - np.maximum(y1[:, None], y1[None, :])
        inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
        union = np.maximum(areas[:, None] + areas[None, :] - inter, 1e-12)
        over = inter / union > iou_threshold  # NaN IoU never suppresses
    keep: list[int] = []
    pos = 0
    while True:
        keep.append(pos)
        start = pos + 1
        if len(keep) >= limit or start >= n:
            break
        rest = alive[start:]
        if over is not None:
            rest &= ~over[pos, start:]
        else:
            b = (float(x1[pos]), float(y1[pos]), float(x2[pos]), float(y2[pos]))
            cols = (x1[start:], y1[start:], x2[start:], y2[start:])
            iou = _iou_cols(b, float(areas[pos]), cols, areas[start:])
            rest &= ~(iou > iou_threshold)
        nxt = int(rest.argmax())
        if not rest[nxt]:
            break
        pos = start + nxt
    kept: IndexArray = order[np.asarray(keep, dtype=np.intp)]
    return kept


def batched_nms(
    boxes: npt.ArrayLike,
    scores: npt.ArrayLike,
    class_ids: npt.ArrayLike,
    iou: float,
    max_keep: int | None = None,
) -> IndexArray:
    """Class-aware NMS: boxes only suppress boxes of the same class.

    Same contract as :func:`nms` (indices into the inputs, highest score first, at most
    ``max_keep``). Each class is moved by ``class_index * (span + 1)`` on both axes, where
    ``span`` covers every coordinate, so boxes of different classes cannot intersect.
    """
    bs = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cls = np.asarray(class_ids).reshape(-1)
    if cls.shape[0] != bs.shape[0]:
        raise ValueError(f"batched_nms: {bs.shape[0]} boxes but {cls.shape[0]} class ids")
    if bs.shape[0] == 0:
        return _EMPTY_INDEX.copy()
    # Dense class index (0..K-1) keeps the offsets small whatever the ids are.
    _, dense = np.unique(cls, return_inverse=True)
    span = float(bs.max() - bs.min()) + 1.0
    shifted = bs + (dense.reshape(-1).astype(np.float64) * span)[:, None]
    return nms(shifted, scores, iou, max_keep)


# --------------------------------------------------------------------------- shared helpers


def squeeze_batch(array: npt.NDArray[Any], ndim: int, what: str, fix: str) -> npt.NDArray[Any]:
    """Return ``array`` with its leading batch axis of 1 removed, as an ``ndim``-d array.

    Accepts ``(1, *dims)`` or ``dims`` already without the batch axis; anything else raises
    :class:`DecoderError` naming ``what`` was expected and the manifest field ``fix``.
    """
    a = np.asarray(array)
    if a.ndim == ndim + 1 and a.shape[0] == 1:
        inner: npt.NDArray[Any] = a[0]
        return inner
    if a.ndim == ndim:
        return a
    raise DecoderError(
        f"{what}: got an output of shape {tuple(a.shape)}, expected {ndim + 1} dims with batch size 1; {fix}"
    )


def label_for(labels: Sequence[str], class_id: int) -> str:
    """``labels[class_id]`` when it exists, else ``str(class_id)`` (never negative indexing)."""
    if 0 <= class_id < len(labels):
        return labels[class_id]
    return str(class_id)


def cxcywh_to_xyxy(b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Convert ``(N, 4)`` centre/size boxes to corner boxes (new float64 array)."""
    out = np.empty_like(b, dtype=np.float64)
    half_w = b[:, 2] * 0.5
    half_h = b[:, 3] * 0.5
    out[:, 0] = b[:, 0] - half_w
    out[:, 1] = b[:, 1] - half_h
    out[:, 2] = b[:, 0] + half_w
    out[:, 3] = b[:, 1] + half_h
    return out


def select_detections(
    boxes: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float64],
    class_ids: npt.NDArray[np.int64],
    *,
    iou_threshold: float,
    max_detections: int,
    use_nms: bool = True,
    class_agnostic: bool = False,
) -> IndexArray:
    """Indices of the detections to report, best first: NMS (optional) and top-``max``."""
    if boxes.shape[0] == 0:
        return _EMPTY_INDEX.copy()
    if not use_nms:
        order: IndexArray = np.argsort(-scores, kind="stable")
        return order[:max_detections]
    if class_agnostic:
        return nms(boxes, scores, iou_threshold, max_detections)
    return batched_nms(boxes, scores, class_ids, iou_threshold, max_detections)


def detection_payload(
    boxes_model: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float64],
    class_ids: npt.NDArray[np.int64],
    labels: Sequence[str],
    transform: ImageTransform | None,
    *,
    normalized: bool,
) -> dict[str, Any]:
    """Build the ``{"task": "detection", ...}`` payload from already selected detections.

    ``boxes_model`` are ``x1, y1, x2, y2`` in model-input pixels, or 0..1 of the model input
    when ``normalized`` (then ``transform`` scales them; without a transform they are
    reported still normalized, rounded to 4 decimals, since the model size is unknown).
    With a transform, boxes are mapped and clipped to source-frame pixels.
    """
    digits = 1
    if boxes_model.shape[0] == 0:
        return {"task": "detection", "detections": []}
    if transform is not None:
        b = boxes_model
        if normalized:
            b = b * np.array(
                [transform.model_w, transform.model_h, transform.model_w, transform.model_h],
                dtype=np.float64,
            )
        out = transform.to_source(b.astype(np.float32)).astype(np.float64)
    else:
        out = boxes_model
        if normalized:
            digits = 4
    box_list: list[list[float]] = np.round(out, digits).tolist()
    score_list: list[float] = np.round(scores.astype(np.float64), 4).tolist()
    id_list: list[int] = class_ids.astype(np.int64).tolist()
    return {
        "task": "detection",
        "detections": [
            {"class_id": c, "label": label_for(labels, c), "score": s, "box": bx}
            for c, s, bx in zip(id_list, score_list, box_list, strict=True)
        ],
    }
