"""Detection accuracy: VOC-style mean average precision at an IoU threshold (mAP@0.5).

For each class, every prediction of that class over all images is ranked by score (ties keep
their input order). Walking down the ranking, a prediction is a true positive when its best
IoU with a ground-truth box of the same class in the same image is ``>= iou_threshold`` and
that box has not been matched yet; otherwise (no overlap, or the best box already taken) it
is a false positive. AP is the area under the precision/recall curve with all-point
interpolation (VOC 2010+): precision is made monotonically non-increasing from the right and
summed over every recall step. mAP is the mean over the classes that have at least one
ground-truth box (a class with ground truth but no predictions scores 0).

Boxes are ``x1, y1, x2, y2`` in continuous coordinates (area ``(x2 - x1) * (y2 - y1)``, no
VOC "+1" pixel convention) - the convention of :mod:`edge_runtime.decoders`.

Inputs, one entry per image:

* predictions: ``(class, score, x1, y1, x2, y2)`` rows (a list of tuples or an ``(M, 6)``
  array), or a decoder payload ``{"detections": [{"class_id", "score", "box"}, ...]}``
  as returned by :class:`edge_runtime.decoders.YoloDecoder`;
* ground truth: ``(class, x1, y1, x2, y2)`` rows (a list or a ``(K, 5)`` array).

Example::

    >>> gt = [[(0, 0, 0, 10, 10)]]
    >>> map50([[(0, 0.9, 1, 1, 10, 10)]], gt, num_classes=1)
    1.0
    >>> map50([[(0, 0.9, 20, 20, 30, 30), (0, 0.8, 0, 0, 10, 10)]], gt, num_classes=1)
    0.5
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_runtime.errors import CalibrationError

__all__ = ["average_precision", "map50", "mean_average_precision", "per_class_ap", "predictions_from_payload"]

F64Array = npt.NDArray[np.float64]


def predictions_from_payload(payload: Mapping[str, Any]) -> F64Array:
    """``(M, 6)`` rows ``class, score, x1, y1, x2, y2`` from a detection decoder payload."""
    dets = payload.get("detections")
    if dets is None:
        raise CalibrationError(
            "a prediction dict must be a detection decoder payload with a 'detections' list; "
            f"got keys {sorted(payload)}"
        )
    rows = [(float(d["class_id"]), float(d["score"]), *(float(v) for v in d["box"])) for d in dets]
    return np.asarray(rows, np.float64).reshape(-1, 6)


def _as_rows(item: Any, width: int, what: str, index: int) -> F64Array:
    if isinstance(item, Mapping):
        if width != 6:
            raise CalibrationError(f"{what} {index}: a decoder payload is only valid as predictions")
        return predictions_from_payload(item)
    arr = np.asarray(item, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, width), np.float64)
    if arr.ndim != 2 or arr.shape[1] != width:
        cols = "class, score, x1, y1, x2, y2" if width == 6 else "class, x1, y1, x2, y2"
        raise CalibrationError(f"{what} {index} has shape {arr.shape}; expected rows of ({cols})")
    if not np.isfinite(arr).all():
        raise CalibrationError(f"{what} {index} holds non-finite values")
    return arr


def _iou(box: F64Array, boxes: F64Array) -> F64Array:
    iw = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    ih = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    inter = iw * ih
    area = max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    union = area + areas - inter
    out: F64Array = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return out


def average_precision(recall: Sequence[float] | F64Array, precision: Sequence[float] | F64Array) -> float:
    """All-point interpolated AP of a precision/recall curve (recall non-decreasing)."""
    r = np.concatenate([[0.0], np.asarray(recall, np.float64), [1.0]])
    p = np.concatenate([[0.0], np.asarray(precision, np.float64), [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # monotone envelope from the right
    steps = np.flatnonzero(r[1:] != r[:-1]) + 1
    return float(np.sum((r[steps] - r[steps - 1]) * p[steps]))


def per_class_ap(
    predictions: Sequence[Any],
    ground_truth: Sequence[Any],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> dict[int, float]:
    """AP of every class ``0 .. num_classes - 1`` that has ground truth; see the module doc."""
    if len(predictions) != len(ground_truth):
        raise CalibrationError(
            f"{len(predictions)} prediction lists for {len(ground_truth)} ground-truth lists; "
            "pass one of each per image, in the same order"
        )
    preds = [_as_rows(p, 6, "predictions of image", i) for i, p in enumerate(predictions)]
    gts = [_as_rows(g, 5, "ground truth of image", i) for i, g in enumerate(ground_truth)]
    out: dict[int, float] = {}
    for c in range(num_classes):
        gt_c = [g[g[:, 0] == c, 1:5] for g in gts]
        n_gt = sum(len(g) for g in gt_c)
        if n_gt == 0:
            continue
        rows = [(i, row) for i, p in enumerate(preds) for row in p[p[:, 0] == c]]
        if not rows:
            out[c] = 0.0
            continue
        scores = np.asarray([row[1] for _, row in rows])
        order = np.argsort(-scores, kind="stable")
        matched = [np.zeros(len(g), bool) for g in gt_c]
        tp = np.zeros(len(rows))
        for rank, k in enumerate(order):
            img, row = rows[k]
            g = gt_c[img]
            if len(g) == 0:
                continue
            ious = _iou(row[2:6], g)
            j = int(np.argmax(ious))
            if ious[j] >= iou_threshold and not matched[img][j]:
                matched[img][j] = True
                tp[rank] = 1.0
        ctp = np.cumsum(tp)
        recall = ctp / n_gt
        precision = ctp / np.arange(1, len(rows) + 1)
        out[c] = average_precision(recall, precision)
    return out


def mean_average_precision(
    predictions: Sequence[Any],
    ground_truth: Sequence[Any],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> float:
    """Mean of :func:`per_class_ap` over the classes with ground truth."""
    aps = per_class_ap(predictions, ground_truth, num_classes, iou_threshold)
    if not aps:
        raise CalibrationError("the evaluation ground truth holds no boxes of classes 0..num_classes-1")
    return float(np.mean(list(aps.values())))


def map50(predictions: Sequence[Any], ground_truth: Sequence[Any], num_classes: int) -> float:
    """VOC-style mAP at IoU 0.5 (all-point interpolated AP per class, mean over classes with GT)."""
    return mean_average_precision(predictions, ground_truth, num_classes, 0.5)
