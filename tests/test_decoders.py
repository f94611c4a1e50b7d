"""Tests for edge_runtime.decoders.

Detection decoders are checked against a deliberately naive pure-Python reference written
here from first principles (explicit loops, explicit IoU formula, greedy per-class NMS,
letterbox inverse derived from scale = min(mw/sw, mh/sh), pad = (m - s*scale)/2), on seeded
random synthetic outputs with many overlapping boxes, several classes and a non-square
source letterboxed into a square model input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from pydantic import TypeAdapter

from edge_runtime.decoders import (
    DECODERS,
    ClassificationDecoder,
    ClassificationSpec,
    Decoder,
    DecoderSpec,
    RawDecoder,
    RawSpec,
    SSDDecoder,
    SSDSpec,
    YoloDecoder,
    YoloSpec,
    batched_nms,
    make_decoder,
    nms,
)
from edge_runtime.errors import DecoderError, EdgeRuntimeError
from edge_runtime.types import ImageTransform

F32 = npt.NDArray[np.float32]
Box = tuple[float, float, float, float]
Det = tuple[int, float, Box]  # class_id, score, x1 y1 x2 y2

SEEDS = [0, 1, 2, 3, 4, 5]
LABELS4 = ["person", "car", "dog", "cat"]


# ============================================================== independent reference


def ref_iou(a: Box, b: Box) -> float:
    """IoU from the textbook formula."""
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def ref_greedy(dets: list[Det], iou_thr: float) -> list[Det]:
    """Greedy NMS on one group: highest score first, drop boxes overlapping a kept one."""
    remaining = sorted(dets, key=lambda d: -d[1])
    kept: list[Det] = []
    for d in remaining:
        if all(ref_iou(d[2], k[2]) <= iou_thr for k in kept):
            kept.append(d)
    return kept


def ref_nms(dets: list[Det], iou_thr: float, max_det: int, agnostic: bool) -> list[Det]:
    """Per-class greedy NMS (or one group when agnostic), then best ``max_det`` overall."""
    groups: dict[int, list[Det]] = {}
    for d in dets:
        groups.setdefault(0 if agnostic else d[0], []).append(d)
    kept: list[Det] = []
    for group in groups.values():
        kept.extend(ref_greedy(group, iou_thr))
    kept.sort(key=lambda d: -d[1])
    return kept[:max_det]


def ref_letterbox(sw: int, sh: int, mw: int, mh: int) -> tuple[float, float, float]:
    """Letterbox parameters: uniform scale and the centring padding."""
    scale = min(mw / sw, mh / sh)
    pad_x = (mw - sw * scale) / 2
    pad_y = (mh - sh * scale) / 2
    return scale, pad_x, pad_y


def letterbox_transform(sw: int, sh: int, mw: int, mh: int) -> ImageTransform:
    """An ImageTransform as letterbox preprocessing builds it (sx = sy = scale, d = pad)."""
    scale, px, py = ref_letterbox(sw, sh, mw, mh)
    return ImageTransform(sx=scale, sy=scale, dx=px, dy=py, src_w=sw, src_h=sh, model_w=mw, model_h=mh)


def ref_unletterbox(box: Box, sw: int, sh: int, mw: int, mh: int) -> Box:
    """Model-pixel box to source pixels by undoing the letterbox, clipped to the frame."""
    scale, px, py = ref_letterbox(sw, sh, mw, mh)

    def fx(v: float) -> float:
        return min(max((v - px) / scale, 0.0), float(sw))

    def fy(v: float) -> float:
        return min(max((v - py) / scale, 0.0), float(sh))

    return (fx(box[0]), fy(box[1]), fx(box[2]), fy(box[3]))


def ref_yolo(
    rows: list[list[float]],
    *,
    v5: bool,
    conf: float,
    iou: float,
    max_det: int,
    agnostic: bool = False,
    norm_wh: tuple[int, int] | None = None,
) -> list[Det]:
    """Reference YOLO decode; ``rows`` are per-box lists cx, cy, w, h, [obj,] scores...

    Returns detections in model pixels (boxes scaled by ``norm_wh`` when normalized).
    """
    dets: list[Det] = []
    for r in rows:
        cx, cy, w, h = r[0], r[1], r[2], r[3]
        if norm_wh is not None:
            cx, w = cx * norm_wh[0], w * norm_wh[0]
            cy, h = cy * norm_wh[1], h * norm_wh[1]
        if v5:
            obj = r[4]
            class_scores = [obj * s for s in r[5:]]
        else:
            class_scores = list(r[4:])
        best_c, best_s = 0, class_scores[0]
        for c, s in enumerate(class_scores):
            if s > best_s:
                best_c, best_s = c, s
        if best_s > conf:
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            dets.append((best_c, best_s, box))
    return ref_nms(dets, iou, max_det, agnostic)


def ref_ssd(
    boxes: list[list[float]],
    classes: list[float],
    scores: list[float],
    count: int,
    *,
    yxyx: bool,
    norm_wh: tuple[int, int] | None,
    label_offset: int,
    conf: float,
    iou: float,
    max_det: int,
    apply_nms: bool = True,
) -> list[Det]:
    """Reference SSD decode: first ``count`` rows, threshold, reorder, scale, NMS."""
    dets: list[Det] = []
    for i in range(count):
        if not scores[i] > conf:
            continue
        b = boxes[i]
        x1, y1, x2, y2 = (b[1], b[0], b[3], b[2]) if yxyx else (b[0], b[1], b[2], b[3])
        if norm_wh is not None:
            x1, x2 = x1 * norm_wh[0], x2 * norm_wh[0]
            y1, y2 = y1 * norm_wh[1], y2 * norm_wh[1]
        dets.append((round(classes[i]) + label_offset, scores[i], (x1, y1, x2, y2)))
    if apply_nms:
        return ref_nms(dets, iou, max_det, agnostic=False)
    return sorted(dets, key=lambda d: -d[1])[:max_det]


# ============================================================== synthetic data


def clustered_boxes(rng: np.random.Generator, n: int, mw: int, mh: int, clusters: int = 6) -> F32:
    """(n, 4) cx, cy, w, h in model pixels, grouped in clusters so boxes overlap a lot."""
    centres = rng.uniform([20, 20], [mw - 20, mh - 20], size=(clusters, 2))
    which = rng.integers(0, clusters, size=n)
    cxcy = centres[which] + rng.normal(0, 6, size=(n, 2))
    wh = rng.uniform(25, 90, size=(n, 2))
    return np.concatenate([cxcy, wh], axis=1).astype(np.float32)


def class_scores(rng: np.random.Generator, n: int, c: int) -> F32:
    """(n, c) scores in [0, 1): one dominant class per box, the rest small."""
    s = rng.uniform(0, 0.35, size=(n, c))
    dominant = rng.integers(0, c, size=n)
    s[np.arange(n), dominant] = rng.uniform(0.05, 1.0, size=n)
    return s.astype(np.float32)


def rows_of(a: F32) -> list[list[float]]:
    """Array to nested Python floats (exact float32 values)."""
    return [[float(v) for v in row] for row in a]


# ============================================================== comparison helpers


def assert_plain_json(obj: Any) -> None:
    """Only plain Python types, and strict JSON (no NaN) works."""

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            assert all(type(k) is str for k in o)
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
        else:
            assert type(o) in (str, int, float, bool), f"{o!r} is {type(o)}"

    walk(obj)
    json.dumps(obj, allow_nan=False)


def assert_matches(
    payload: dict[str, Any],
    expected: list[Det],
    labels: Sequence[str],
    *,
    box_tol: float = 0.06,
) -> None:
    """Decoder detections equal the reference: same order, classes, scores and boxes."""
    assert payload["task"] == "detection"
    got = payload["detections"]
    assert_plain_json(payload)
    assert len(got) == len(expected), (len(got), len(expected))
    for g, (cid, score, box) in zip(got, expected, strict=True):
        assert g["class_id"] == cid
        assert g["label"] == (labels[cid] if 0 <= cid < len(labels) else str(cid))
        assert abs(g["score"] - score) <= 6e-5
        assert len(g["box"]) == 4
        for gv, ev in zip(g["box"], box, strict=True):
            assert abs(gv - ev) <= box_tol, (g["box"], box)


def to_source_all(dets: list[Det], sw: int, sh: int, mw: int, mh: int) -> list[Det]:
    return [(c, s, ref_unletterbox(b, sw, sh, mw, mh)) for c, s, b in dets]


# ============================================================== reference self-checks


def test_reference_letterbox_by_hand() -> None:
    # 640x480 into 320x320: scale 0.5, image 320x240, pad 40 top and bottom.
    assert ref_letterbox(640, 480, 320, 320) == (0.5, 0.0, 40.0)
    # model box (100, 60)-(200, 140) -> source ((100-0)/0.5, (60-40)/0.5, ...)
    assert ref_unletterbox((100, 60, 200, 140), 640, 480, 320, 320) == (200, 40, 400, 200)
    # clipped: above the image (in the pad) maps to y = 0
    assert ref_unletterbox((0, 10, 10, 20), 640, 480, 320, 320)[1] == 0.0


def test_reference_iou_by_hand() -> None:
    assert ref_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert ref_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


# ============================================================== nms


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [80, 400])  # both the IoU-matrix and the per-step paths
def test_nms_and_batched_nms_match_reference(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    cxcywh = clustered_boxes(rng, n, 320, 320).astype(np.float64)
    boxes = np.column_stack(
        [
            cxcywh[:, 0] - cxcywh[:, 2] / 2,
            cxcywh[:, 1] - cxcywh[:, 3] / 2,
            cxcywh[:, 0] + cxcywh[:, 2] / 2,
            cxcywh[:, 1] + cxcywh[:, 3] / 2,
        ]
    )
    scores = rng.uniform(0, 1, size=n)
    cls = rng.integers(0, 3, size=n)
    dets: list[Det] = [
        (int(cls[i]), float(scores[i]), (*map(float, boxes[i]),))  # type: ignore[misc]
        for i in range(n)
    ]
    for thr in (0.3, 0.5, 0.7):
        for max_keep in (None, 5, 10000):
            mk = n if max_keep is None else max_keep
            keep = nms(boxes, scores, thr, max_keep)
            exp = ref_nms(dets, thr, mk, agnostic=True)
            assert [dets[i] for i in keep.tolist()] == exp
            keep = batched_nms(boxes, scores, cls, thr, max_keep)
            exp = ref_nms(dets, thr, mk, agnostic=False)
            assert [dets[i] for i in keep.tolist()] == exp
            assert len(exp) > 0


def test_nms_edge_cases() -> None:
    empty = np.zeros((0, 4))
    assert nms(empty, np.zeros(0), 0.5).tolist() == []
    assert batched_nms(empty, np.zeros(0), np.zeros(0, dtype=int), 0.5).tolist() == []
    same = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 0, 0]], dtype=np.float32)
    sc = np.array([0.5, 0.9, 0.7])
    assert nms(same, sc, 0.5).tolist() == [1, 2]  # zero-area box overlaps nothing
    assert batched_nms(same, sc, np.array([0, 1, 1]), 0.5).tolist() == [1, 2, 0]
    assert nms(same, sc, 0.5, max_keep=1).tolist() == [1]
    # iou exactly at the threshold is not suppressed (strictly greater suppresses)
    half = np.array([[0, 0, 10, 10], [0, 0, 10, 5]], dtype=np.float64)
    assert nms(half, np.array([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert nms(half, np.array([0.9, 0.8]), 0.49).tolist() == [0]


# ============================================================== yolo v8 / v5


def make_v8(rng: np.random.Generator, n: int, c: int, mw: int, mh: int) -> F32:
    """(n, 4 + c) rows cx, cy, w, h, class scores."""
    return np.concatenate([clustered_boxes(rng, n, mw, mh), class_scores(rng, n, c)], axis=1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("src", "model"),
    [((640, 480), (320, 320)), ((480, 640), (320, 320)), ((1280, 720), (416, 416))],
)
def test_yolo_v8_matches_reference_letterbox(seed: int, src: tuple[int, int], model: tuple[int, int]) -> None:
    rng = np.random.default_rng(seed)
    (sw, sh), (mw, mh) = src, model
    rows = make_v8(rng, 120, 4, mw, mh)
    spec = YoloSpec(conf_threshold=0.3, iou_threshold=0.45)
    tr = letterbox_transform(sw, sh, mw, mh)
    out = rows.T[None].copy()  # (1, 4 + C, N)
    payload = YoloDecoder(spec, LABELS4).decode([out], tr)
    exp = ref_yolo(rows_of(rows), v5=False, conf=0.3, iou=0.45, max_det=100)
    exp_src = to_source_all(exp, sw, sh, mw, mh)
    assert len(exp) >= 8  # the data really exercises NMS and several classes
    assert len({d[0] for d in exp}) >= 2
    n_cand = sum(1 for r in rows_of(rows) if max(r[4:]) > 0.3)
    assert n_cand > len(exp)  # NMS removed something
    assert_matches(payload, exp_src, LABELS4)


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_yolo_v8_transposed_layout(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = make_v8(rng, 300, 4, 320, 320)  # > 128 candidates: per-step NMS path
    tr = letterbox_transform(640, 480, 320, 320)
    spec = YoloSpec(conf_threshold=0.25, iou_threshold=0.5)
    exp = to_source_all(
        ref_yolo(rows_of(rows), v5=False, conf=0.25, iou=0.5, max_det=100), 640, 480, 320, 320
    )
    dec = YoloDecoder(spec, LABELS4)
    assert_matches(dec.decode([rows[None]], tr), exp, LABELS4)  # (1, N, 4 + C)
    assert_matches(dec.decode([rows.T[None]], tr), exp, LABELS4)  # (1, 4 + C, N)
    # without labels the smaller axis is the channel axis
    nolab = YoloDecoder(spec, [])
    assert_matches(nolab.decode([rows[None]], tr), exp, [])
    assert_matches(nolab.decode([rows.T[None]], tr), exp, [])


def test_yolo_v8_labels_decide_orientation_when_n_is_small() -> None:
    rng = np.random.default_rng(7)
    labels = [f"c{i}" for i in range(10)]
    rows = make_v8(rng, 3, 10, 320, 320)  # N = 3 < 4 + C = 14
    spec = YoloSpec(conf_threshold=0.1)
    exp = ref_yolo(rows_of(rows), v5=False, conf=0.1, iou=0.45, max_det=100)
    dec = YoloDecoder(spec, labels)
    assert_matches(dec.decode([rows[None]], None), exp, labels)
    assert_matches(dec.decode([rows.T[None]], None), exp, labels)
    assert len(exp) >= 1


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_yolo_v5_with_objectness(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c = 100, 3
    boxes = clustered_boxes(rng, n, 320, 320)
    obj = rng.uniform(0, 1, size=(n, 1)).astype(np.float32)
    rows = np.concatenate([boxes, obj, class_scores(rng, n, c)], axis=1)
    labels = LABELS4[:c]
    spec = YoloSpec(layout="v5", conf_threshold=0.2, iou_threshold=0.4)
    tr = letterbox_transform(640, 480, 320, 320)
    exp = ref_yolo(rows_of(rows), v5=True, conf=0.2, iou=0.4, max_det=100)
    assert len(exp) >= 5
    assert_matches(
        YoloDecoder(spec, labels).decode([rows[None]], tr),
        to_source_all(exp, 640, 480, 320, 320),
        labels,
    )
    # objectness really matters: the v8 reading of the same numbers differs
    no_obj = ref_yolo([r[:4] + r[5:] for r in rows_of(rows)], v5=False, conf=0.2, iou=0.4, max_det=100)
    assert [d[1] for d in no_obj] != [d[1] for d in exp]


@pytest.mark.parametrize("seed", SEEDS[:3])
@pytest.mark.parametrize(("mw", "mh"), [(320, 320), (320, 256), (256, 320)])
def test_yolo_normalized_coordinates(seed: int, mw: int, mh: int) -> None:
    rng = np.random.default_rng(seed)
    rows = make_v8(rng, 100, 4, mw, mh)
    norm = rows.copy()
    norm[:, [0, 2]] /= mw
    norm[:, [1, 3]] /= mh
    spec = YoloSpec(normalized=True, conf_threshold=0.3)
    tr = letterbox_transform(640, 480, mw, mh)
    exp = ref_yolo(rows_of(norm), v5=False, conf=0.3, iou=0.45, max_det=100, norm_wh=(mw, mh))
    payload = YoloDecoder(spec, LABELS4).decode([norm.T[None]], tr)
    assert_matches(payload, to_source_all(exp, 640, 480, mw, mh), LABELS4)


def test_yolo_normalized_without_transform_stays_normalized() -> None:
    rows = np.array([[0.5, 0.5, 0.2, 0.1, 0.9, 0.1]], dtype=np.float32)
    payload = YoloDecoder(YoloSpec(normalized=True), ["a", "b"]).decode([rows[None]], None)
    (det,) = payload["detections"]
    assert det["box"] == pytest.approx([0.4, 0.45, 0.6, 0.55], abs=1e-4)


def test_yolo_single_box_by_hand() -> None:
    # one box in a 320x320 letterbox of a 640x480 frame (scale 0.5, pad_y 40)
    rows = np.array([[160, 160, 100, 50, 0.1, 0.8]], dtype=np.float32)
    tr = letterbox_transform(640, 480, 320, 320)
    payload = YoloDecoder(YoloSpec(), ["a", "b"]).decode([rows.T[None]], tr)
    assert payload == {
        "task": "detection",
        "detections": [{"class_id": 1, "label": "b", "score": 0.8, "box": [220.0, 190.0, 420.0, 290.0]}],
    }


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_yolo_class_agnostic(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = make_v8(rng, 100, 4, 320, 320)
    spec = YoloSpec(class_agnostic=True, conf_threshold=0.2, iou_threshold=0.4)
    exp = ref_yolo(rows_of(rows), v5=False, conf=0.2, iou=0.4, max_det=100, agnostic=True)
    aware = ref_yolo(rows_of(rows), v5=False, conf=0.2, iou=0.4, max_det=100)
    assert len(exp) < len(aware)
    assert_matches(YoloDecoder(spec, LABELS4).decode([rows.T[None]], None), exp, LABELS4)


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_yolo_max_detections(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = make_v8(rng, 300, 4, 320, 320)
    spec = YoloSpec(max_detections=4, conf_threshold=0.1, iou_threshold=0.6)
    exp = ref_yolo(rows_of(rows), v5=False, conf=0.1, iou=0.6, max_det=4)
    full = ref_yolo(rows_of(rows), v5=False, conf=0.1, iou=0.6, max_det=10**6)
    assert len(full) > 4
    assert len(exp) == 4
    assert_matches(YoloDecoder(spec, LABELS4).decode([rows.T[None]], None), exp, LABELS4)


def test_yolo_nan_rows_are_dropped_and_nothing_above_threshold() -> None:
    rows = np.array(
        [
            [50, 50, 20, 20, 0.9, 0.1],
            [np.nan, 50, 20, 20, 0.95, 0.1],
            [150, 150, 20, 20, np.nan, 0.2],
        ],
        dtype=np.float32,
    )
    dec = YoloDecoder(YoloSpec(), ["a", "b"])
    payload = dec.decode([rows[None]], None)
    assert [d["score"] for d in payload["detections"]] == [0.9]
    assert_plain_json(payload)
    low = np.full((1, 6, 10), 0.01, dtype=np.float32)
    assert dec.decode([low], None) == {"task": "detection", "detections": []}


def test_yolo_labels_missing_use_str_index() -> None:
    rows = np.zeros((10, 7), dtype=np.float32)
    rows[0] = [50, 50, 20, 20, 0.1, 0.1, 0.9]
    payload = YoloDecoder(YoloSpec(), []).decode([rows.T[None]], None)
    assert [d["label"] for d in payload["detections"]] == ["2"]
    ssd = SSDDecoder(SSDSpec(label_offset=-1), ["a"])
    one = np.ones((1, 1), dtype=np.float32)
    boxes = np.array([[[0.1, 0.1, 0.5, 0.5]]], dtype=np.float32)
    got = ssd.decode([boxes, one * 0, one, np.array([1.0])], None)["detections"]
    assert [(d["class_id"], d["label"]) for d in got] == [(-1, "-1")]


# ============================================================== ssd


def make_ssd(
    rng: np.random.Generator, n: int, c: int, *, yxyx: bool, normalized: bool, mw: int, mh: int
) -> tuple[F32, F32, F32]:
    cxcywh = clustered_boxes(rng, n, mw, mh).astype(np.float64)
    x1 = cxcywh[:, 0] - cxcywh[:, 2] / 2
    y1 = cxcywh[:, 1] - cxcywh[:, 3] / 2
    x2 = cxcywh[:, 0] + cxcywh[:, 2] / 2
    y2 = cxcywh[:, 1] + cxcywh[:, 3] / 2
    if normalized:
        x1, x2, y1, y2 = x1 / mw, x2 / mw, y1 / mh, y2 / mh
    cols = [y1, x1, y2, x2] if yxyx else [x1, y1, x2, y2]
    boxes = np.stack(cols, axis=1).astype(np.float32)
    classes = rng.integers(0, c, size=n).astype(np.float32)
    scores = rng.uniform(0, 1, size=n).astype(np.float32)
    return boxes, classes, scores


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("box_order", "normalized", "label_offset"),
    [("yxyx", True, 0), ("xyxy", True, 1), ("xyxy", False, -1), ("yxyx", False, 2)],
)
def test_ssd_matches_reference(seed: int, box_order: str, normalized: bool, label_offset: int) -> None:
    rng = np.random.default_rng(seed)
    # odd seeds use a non-square model input (letterbox pads both ways differently)
    mw, mh, sw, sh = (320, 320, 640, 480) if seed % 2 == 0 else (320, 256, 480, 640)
    n, count = 60, 45
    yxyx = box_order == "yxyx"
    boxes, classes, scores = make_ssd(rng, n, 3, yxyx=yxyx, normalized=normalized, mw=mw, mh=mh)
    scores[count:] = 0.99  # padding rows past `count` must be ignored
    spec = SSDSpec(
        box_order="yxyx" if yxyx else "xyxy",
        normalized=normalized,
        label_offset=label_offset,
        conf_threshold=0.3,
        iou_threshold=0.45,
    )
    labels = ["background", "person", "car", "dog"]
    tr = letterbox_transform(sw, sh, mw, mh)
    outputs = [boxes[None], classes[None], scores[None], np.array([count], dtype=np.float32)]
    payload = SSDDecoder(spec, labels).decode(outputs, tr)
    exp = ref_ssd(
        rows_of(boxes),
        [float(v) for v in classes],
        [float(v) for v in scores],
        count,
        yxyx=yxyx,
        norm_wh=(mw, mh) if normalized else None,
        label_offset=label_offset,
        conf=0.3,
        iou=0.45,
        max_det=100,
    )
    assert len(exp) >= 5
    assert_matches(payload, to_source_all(exp, sw, sh, mw, mh), labels)


def test_ssd_output_indices_no_count_and_no_nms() -> None:
    rng = np.random.default_rng(11)
    boxes, classes, scores = make_ssd(rng, 40, 2, yxyx=True, normalized=True, mw=300, mh=300)
    # TF-style order: scores, boxes, count, classes
    outputs = [scores[None], boxes[None], np.array([40.0], dtype=np.float32), classes[None]]
    spec = SSDSpec(boxes_index=1, classes_index=3, scores_index=0, count_index=None)
    common: dict[str, Any] = {"yxyx": True, "norm_wh": (300, 300), "label_offset": 0}
    exp = ref_ssd(
        rows_of(boxes), classes.tolist(), scores.tolist(), 40,
        conf=0.5, iou=0.5, max_det=100, **common,
    )  # fmt: skip
    tr = ImageTransform(sx=1, sy=1, dx=0, dy=0, src_w=300, src_h=300, model_w=300, model_h=300)
    exp = to_source_all(exp, 300, 300, 300, 300)
    assert_matches(SSDDecoder(spec, []).decode(outputs, tr), exp, [])
    for max_det in (100, 7):
        spec2 = SSDSpec(
            boxes_index=1, classes_index=3, scores_index=0, count_index=2, apply_nms=False,
            max_detections=max_det,
        )  # fmt: skip
        exp2 = ref_ssd(
            rows_of(boxes), classes.tolist(), scores.tolist(), 40,
            conf=0.5, iou=0.5, max_det=max_det, apply_nms=False, **common,
        )  # fmt: skip
        assert len(exp2) == 7 if max_det == 7 else len(exp2) > len(exp)
        exp2 = to_source_all(exp2, 300, 300, 300, 300)
        assert_matches(SSDDecoder(spec2, []).decode(outputs, tr), exp2, [])


def test_ssd_count_zero_and_nan_count() -> None:
    boxes = np.array([[[0.1, 0.1, 0.5, 0.5]]], dtype=np.float32)
    ones = np.ones((1, 1), dtype=np.float32)
    dec = SSDDecoder(SSDSpec(), ["a", "b"])
    assert dec.decode([boxes, ones, ones, np.array([0.0])], None)["detections"] == []
    assert dec.decode([boxes, ones, ones, np.array([np.nan])], None)["detections"] == []
    got = dec.decode([boxes, ones, ones, np.array([5.0])], None)["detections"]
    assert [d["label"] for d in got] == ["b"]


# ============================================================== classification


def ref_softmax(x: list[float]) -> list[float]:
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]


def ref_top(probs: list[float], k: int, min_score: float) -> list[tuple[int, float]]:
    pairs = sorted(enumerate(probs), key=lambda p: -p[1])[:k]
    return [(i, p) for i, p in pairs if p >= min_score]


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_classification_logits_get_softmax(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=50).astype(np.float32)
    labels = [f"class{i}" for i in range(40)]  # fewer labels than classes
    dec = ClassificationDecoder(ClassificationSpec(top_k=5), labels)
    payload = dec.decode([logits[None]], None)
    assert_plain_json(payload)
    exp = ref_top(ref_softmax([float(v) for v in logits]), 5, 0.0)
    assert payload["task"] == "classification"
    assert [t["index"] for t in payload["top"]] == [i for i, _ in exp]
    for t, (i, p) in zip(payload["top"], exp, strict=True):
        assert t["score"] == pytest.approx(p, abs=6e-5)
        assert t["label"] == (labels[i] if i < 40 else str(i))


def test_classification_probabilities_kept_and_min_score() -> None:
    probs = np.array([[0.05, 0.6, 0.1, 0.25]], dtype=np.float32)
    auto = ClassificationDecoder(ClassificationSpec(top_k=3), ["a", "b", "c", "d"])
    got = auto.decode([probs], None)["top"]
    assert [(t["index"], t["label"], t["score"]) for t in got] == [
        (1, "b", 0.6),
        (3, "d", 0.25),
        (2, "c", 0.1),
    ]
    filt = ClassificationDecoder(ClassificationSpec(top_k=4, min_score=0.2), ["a"])
    got = filt.decode([probs.reshape(1, 1, 1, 4)], None)["top"]
    assert [(t["index"], t["label"]) for t in got] == [(1, "1"), (3, "3")]
    always = ClassificationDecoder(ClassificationSpec(top_k=1, softmax="always"), [])
    exp = ref_softmax([0.05, 0.6, 0.1, 0.25])
    assert always.decode([probs], None)["top"][0]["score"] == pytest.approx(exp[1], abs=6e-5)
    # sums to 1 only within 2e-3: not probabilities for "auto"
    almost = np.array([[0.5, 0.502]], dtype=np.float32)
    top = auto.decode([almost], None)["top"]
    assert top[0]["score"] == pytest.approx(ref_softmax([0.5, 0.502])[1], abs=6e-5)


def test_classification_never_keeps_raw_scores() -> None:
    logits = np.array([[2.5, -1.0, 7.25]], dtype=np.float32)
    dec = ClassificationDecoder(ClassificationSpec(top_k=10, softmax="never"), [])
    got = dec.decode([logits], None)["top"]
    assert [(t["index"], t["score"]) for t in got] == [(2, 7.25), (0, 2.5), (1, -1.0)]
    dec_min = ClassificationDecoder(ClassificationSpec(softmax="never", min_score=0.5), [])
    assert [t["index"] for t in dec_min.decode([logits], None)["top"]] == [2, 0]


# ============================================================== raw


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("first", 3.0), ("max", 12.0), ("l2", 13.0)],  # sqrt(9 + 16 + 144) = 13
)
def test_raw_score_modes_and_threshold(mode: str, expected: float) -> None:
    x = np.array([[3.0, -4.0, 12.0, 0.0]], dtype=np.float32)
    plain = RawDecoder(RawSpec(score=mode), []).decode([x], None)  # type: ignore[arg-type]
    assert plain == {"task": "raw", "values": [3.0, -4.0, 12.0, 0.0], "score": expected}
    assert_plain_json(plain)
    below = RawDecoder(RawSpec(score=mode, anomaly_threshold=expected - 0.5), [])  # type: ignore[arg-type]
    above = RawDecoder(RawSpec(score=mode, anomaly_threshold=expected + 0.5), [])  # type: ignore[arg-type]
    assert below.decode([x], None)["anomaly"] is True
    assert above.decode([x], None)["anomaly"] is False


def test_raw_max_values_and_rounding() -> None:
    x = np.linspace(0, 1, 200, dtype=np.float32).reshape(1, 200)
    x[0, 1] = 1.2345e-7
    out = RawDecoder(RawSpec(max_values=3), []).decode([x, x], None)
    assert out["values"] == [0.0, 1.2345e-7, pytest.approx(2 / 199, rel=1e-5)]
    assert_plain_json(out)
    assert RawDecoder(RawSpec(max_values=0), []).decode([x], None)["values"] == []


# ============================================================== errors


def test_errors_yolo_shapes() -> None:
    dec = YoloDecoder(YoloSpec(), LABELS4)
    with pytest.raises(DecoderError, match=r"\(1, 85, 100\).*labels"):
        dec.decode([np.zeros((1, 85, 100), np.float32)], None)
    with pytest.raises(DecoderError, match="no outputs"):
        dec.decode([], None)
    with pytest.raises(DecoderError, match="batch size 1"):
        dec.decode([np.zeros((2, 8, 100), np.float32)], None)
    with pytest.raises(DecoderError, match="batch size 1"):
        dec.decode([np.zeros((1, 1, 8, 100), np.float32)], None)
    v5 = YoloDecoder(YoloSpec(layout="v5"), LABELS4)
    with pytest.raises(DecoderError, match=r"layout='v5'.*\(1, N, 9\)"):
        v5.decode([np.zeros((1, 9, 100), np.float32)], None)
    with pytest.raises(DecoderError, match="5 \\+ C"):
        YoloDecoder(YoloSpec(layout="v5"), []).decode([np.zeros((1, 10, 5), np.float32)], None)
    with pytest.raises(DecoderError, match="4 \\+ C"):
        YoloDecoder(YoloSpec(), []).decode([np.zeros((1, 4, 100), np.float32)], None)


def test_errors_ssd_shapes_and_counts() -> None:
    dec = SSDDecoder(SSDSpec(), [])
    b = np.zeros((1, 10, 4), np.float32)
    c = np.zeros((1, 10), np.float32)
    with pytest.raises(DecoderError, match="count_index=3"):
        dec.decode([b, c, c], None)
    with pytest.raises(DecoderError, match="boxes_index"):
        dec.decode([np.zeros((1, 10, 5), np.float32), c, c, np.ones(1)], None)
    with pytest.raises(DecoderError, match="classes_index"):
        dec.decode([b, np.zeros((1, 9), np.float32), c, np.ones(1)], None)
    with pytest.raises(DecoderError, match="boxes_index"):
        dec.decode([np.zeros((1, 10), np.float32), c, c, np.ones(1)], None)
    with pytest.raises(DecoderError, match="count_index"):
        dec.decode([b, c, c, np.ones(2)], None)


def test_errors_classification_and_raw() -> None:
    cls = ClassificationDecoder(ClassificationSpec(), [])
    with pytest.raises(DecoderError, match=r"\(2, 10\)"):
        cls.decode([np.zeros((2, 10), np.float32)], None)
    with pytest.raises(DecoderError, match="no outputs"):
        cls.decode([], None)
    with pytest.raises(DecoderError):
        cls.decode([np.zeros((1, 0), np.float32)], None)
    raw = RawDecoder(RawSpec(), [])
    with pytest.raises(DecoderError, match="no outputs"):
        raw.decode([], None)
    with pytest.raises(DecoderError, match="no values"):
        raw.decode([np.zeros((1, 0), np.float32)], None)
    assert issubclass(DecoderError, EdgeRuntimeError)


# ============================================================== registry


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("classification", ClassificationDecoder),
        ("yolo", YoloDecoder),
        ("ssd", SSDDecoder),
        ("raw", RawDecoder),
    ],
)
def test_make_decoder(kind: str, cls: type) -> None:
    spec = TypeAdapter(DecoderSpec).validate_python({"kind": kind})
    dec = make_decoder(spec, ["a"])
    assert type(dec) is cls
    assert DECODERS[kind] is cls
    assert isinstance(dec, Decoder)
