"""mAP@0.5: hand-computed cases, an independent reference implementation, decoder payloads."""

from __future__ import annotations

import numpy as np
import pytest

from converters.detection_metrics import (
    average_precision,
    map50,
    mean_average_precision,
    per_class_ap,
    predictions_from_payload,
)
from edge_runtime.decoders import YoloDecoder, YoloSpec
from edge_runtime.errors import CalibrationError
from models.detector import data as det_data


def test_hand_computed_ranking_with_duplicate_and_false_positive() -> None:
    gt = [
        [(0, 0, 0, 10, 10), (0, 20, 20, 30, 30)],
        [(0, 0, 0, 10, 10)],
    ]
    preds = [
        [(0, 0.9, 0, 0, 10, 10), (0, 0.6, 1, 1, 10, 10)],  # TP, then a duplicate of the same box: FP
        [(0, 0.8, 50, 50, 60, 60), (0, 0.7, 0, 0, 10, 9)],  # FP, TP (IoU 0.9)
    ]
    # ranking TP FP TP FP over 3 GT: recall 1/3 1/3 2/3 2/3, precision 1 1/2 2/3 1/2
    # envelope: 1 up to recall 1/3, 2/3 up to 2/3 -> AP = 1/3 + 2/9
    assert map50(preds, gt, num_classes=1) == pytest.approx(1 / 3 + 2 / 9, abs=1e-12)


def test_iou_threshold_is_inclusive_at_half() -> None:
    gt = [[(0, 0, 0, 10, 10)]]
    assert map50([[(0, 0.5, 0, 0, 10, 5)]], gt, 1) == 1.0  # IoU exactly 0.5
    assert map50([[(0, 0.5, 0, 0, 10, 4.9)]], gt, 1) == 0.0  # IoU 0.49
    assert mean_average_precision([[(0, 0.5, 0, 0, 10, 6)]], gt, 1, iou_threshold=0.7) == 0.0


def test_mean_over_classes_with_ground_truth_only() -> None:
    gt = [[(0, 0, 0, 10, 10), (1, 20, 20, 40, 40)]]
    preds = [
        [
            (0, 0.9, 0, 0, 10, 10),  # class 0: perfect
            (1, 0.9, 0, 0, 10, 10),  # class 1: wrong place (its box is elsewhere)
            (2, 0.9, 20, 20, 40, 40),  # class 2 has no GT: ignored, not a penalty
        ]
    ]
    aps = per_class_ap(preds, gt, num_classes=3)
    assert aps == {0: 1.0, 1: 0.0}
    assert map50(preds, gt, 3) == 0.5
    # a box at the right place with the wrong class does not count for the right class
    assert per_class_ap([[(0, 0.9, 20, 20, 40, 40)]], [[(1, 20, 20, 40, 40)]], 2) == {1: 0.0}


def test_average_precision_all_point_interpolation() -> None:
    assert average_precision([0.5, 1.0], [1.0, 1.0]) == 1.0
    assert average_precision([0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision([], []) == 0.0


def _reference_ap(preds: list[np.ndarray], gts: list[np.ndarray], cls: int) -> float | None:
    """Independent formulation: AP = mean over GT of the best precision at or after each TP."""
    n_gt = sum(int(np.sum(g[:, 0] == cls)) for g in gts)
    if n_gt == 0:
        return None
    cand = [(float(r[1]), i, k) for i, p in enumerate(preds) for k, r in enumerate(p) if r[0] == cls]
    cand.sort(key=lambda t: -t[0])  # stable: ties keep input order
    used: set[tuple[int, int]] = set()
    hits: list[bool] = []
    for _, i, k in cand:
        box = preds[i][k, 2:]
        best, best_j = 0.0, -1
        for j, g in enumerate(gts[i]):
            if g[0] != cls:
                continue
            iw = max(0.0, min(box[2], g[3]) - max(box[0], g[1]))
            ih = max(0.0, min(box[3], g[4]) - max(box[1], g[2]))
            inter = iw * ih
            union = (box[2] - box[0]) * (box[3] - box[1]) + (g[3] - g[1]) * (g[4] - g[2]) - inter
            iou = inter / union
            if iou > best:
                best, best_j = iou, j
        ok = best >= 0.5 and (i, best_j) not in used
        if ok:
            used.add((i, best_j))
        hits.append(ok)
    precisions = [sum(hits[: r + 1]) / (r + 1) for r in range(len(hits))]
    total = 0.0
    for r, hit in enumerate(hits):
        if hit:
            total += max(precisions[r:])
    return total / n_gt


def test_matches_independent_reference_on_random_detections() -> None:
    rng = np.random.default_rng(0)
    for trial in range(5):
        gts, preds = [], []
        for _ in range(12):
            k = int(rng.integers(0, 5))
            xy = rng.uniform(0, 100, (k, 2))
            wh = rng.uniform(5, 30, (k, 2))
            g = np.c_[rng.integers(0, 3, k), xy, xy + wh]
            rows = []
            for row in g:  # a jittered detection (sometimes off by a lot), plus distractors
                jitter = rng.normal(0, rng.choice([1.0, 6.0]), 4)
                rows.append([row[0], rng.uniform(), *(row[1:] + jitter)])
            for _ in range(int(rng.integers(0, 4))):
                p = rng.uniform(0, 100, 2)
                rows.append([rng.integers(0, 3), rng.uniform(), *p, *(p + rng.uniform(5, 30, 2))])
            gts.append(g.reshape(-1, 5))
            preds.append(np.asarray(rows, np.float64).reshape(-1, 6))
        aps = per_class_ap(preds, gts, 3)
        for c in range(3):
            ref = _reference_ap(preds, gts, c)
            if ref is None:
                assert c not in aps
            else:
                assert aps[c] == pytest.approx(ref, abs=1e-12), (trial, c)


def _encode_v8(boxes: np.ndarray, n_classes: int, n_cells: int, rng: np.random.Generator) -> np.ndarray:
    """A YOLOv8 head output (1, 4 + C, N) holding ``boxes`` in random cells, the rest background."""
    out = np.zeros((4 + n_classes, n_cells), np.float32)
    out[:4] = rng.uniform(5, 20, (4, n_cells))
    out[4:] = rng.uniform(0, 0.05, (n_classes, n_cells))
    cells = rng.choice(n_cells, len(boxes), replace=False)
    for cell, (c, x1, y1, x2, y2) in zip(cells, boxes, strict=True):
        out[:4, cell] = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
        out[4 + int(c), cell] = 0.9
    return out[None]


def test_decoder_payloads_of_generated_ground_truth_score_one() -> None:
    images, boxes = det_data.make_eval_set(6, seed=3)
    assert images.shape == (6, det_data.INPUT_SIZE, det_data.INPUT_SIZE, 3)
    rng = np.random.default_rng(1)
    n_cls = len(det_data.CLASSES)
    dec = YoloDecoder(YoloSpec(layout="v8", normalized=False, conf_threshold=0.1), det_data.CLASSES)
    payloads = [dec.decode([_encode_v8(b, n_cls, 320, rng)], None) for b in boxes]
    assert map50(payloads, boxes, n_cls) == pytest.approx(1.0)
    rows = [predictions_from_payload(p) for p in payloads]
    assert map50(rows, boxes, n_cls) == pytest.approx(1.0)
    # every box moved right by half its width: IoU 1/3 < 0.5, so nothing matches any more
    shifted = []
    for r in rows:
        half = (r[:, 4] - r[:, 2]) / 2
        moved = r.copy()
        moved[:, 2] += half
        moved[:, 4] += half
        shifted.append(moved)
    assert map50(shifted, boxes, n_cls) == 0.0


def test_generated_boxes_are_tight_inside_the_image_and_reproducible() -> None:
    images, boxes = det_data.make_dataset(20, seed=5)
    again, boxes2 = det_data.make_dataset(20, seed=5)
    assert np.array_equal(images, again)
    s = det_data.INPUT_SIZE
    for img, b, b2 in zip(images, boxes, boxes2, strict=True):
        assert np.array_equal(b, b2)
        assert 1 <= len(b) <= det_data.MAX_OBJECTS
        assert set(b[:, 0].astype(int)) <= set(range(len(det_data.CLASSES)))
        assert (b[:, 1] >= 0).all() and (b[:, 3] <= s).all() and (b[:, 1] < b[:, 3]).all()
        assert (b[:, 2] >= 0).all() and (b[:, 4] <= s).all() and (b[:, 2] < b[:, 4]).all()
        assert img.dtype == np.uint8


def test_malformed_inputs_raise_calibration_errors() -> None:
    with pytest.raises(CalibrationError, match="same order"):
        map50([[]], [[], []], 1)
    with pytest.raises(CalibrationError, match="expected rows"):
        map50([[(0, 0.5, 1, 2)]], [[(0, 0, 0, 1, 1)]], 1)
    with pytest.raises(CalibrationError, match="no boxes"):
        map50([[(0, 0.5, 0, 0, 1, 1)]], [[]], 1)
    with pytest.raises(CalibrationError, match="detections"):
        map50([{"boxes": []}], [[(0, 0, 0, 1, 1)]], 1)
