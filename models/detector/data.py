"""Synthetic detection data: several OpenCV-drawn shapes per image, with exact boxes.

TensorFlow-free on purpose (the recipe, the converter's evaluation and the tests share it).

Each image is ``INPUT_SIZE x INPUT_SIZE`` BGR uint8 (already the model size, so the runtime's
preprocessing is only ``color="rgb", scale=1/255``). A background (solid, gradient, blotches,
clutter lines) gets 1 to ``MAX_OBJECTS`` shapes of the classes in :data:`CLASSES`, each
with its own size, rotation, fill and a colour that contrasts with the background; then
blur, sensor noise and JPEG artefacts. Shapes overlap at most a little (IoU <= 0.1).

Every box is measured, not guessed: the shape is drawn a second time into a mask and the
box is the tight bounding box of the mask (so clipping at the border is handled). Boxes are
``x1, y1, x2, y2`` in input pixels, ``x2``/``y2`` exclusive (a 1-pixel object at column 5
has ``x1=5, x2=6``).

Example::

    >>> images, boxes = make_dataset(2, seed=0)
    >>> images.shape, images.dtype
    ((2, 128, 128, 3), dtype('uint8'))
    >>> boxes[0].shape[1]   # class, x1, y1, x2, y2
    5
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import numpy.typing as npt

from models.shapes.data import draw_shape

__all__ = [
    "CLASSES",
    "INPUT_SIZE",
    "MAX_OBJECTS",
    "make_dataset",
    "make_eval_set",
    "render_image",
    "to_input",
]

CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
"""Class names, index order of the model's score rows."""

INPUT_SIZE = 128
"""Model input: ``INPUT_SIZE x INPUT_SIZE x 3`` RGB float 0..1 (NHWC)."""

MAX_OBJECTS = 4

MIN_RADIUS, MAX_RADIUS = 8.0, 28.0
"""Shape radius range in pixels (boxes of about 13 to 56 pixels)."""

EVAL_SEED = 20_000
"""Default seed of the evaluation set (training uses other seeds)."""

U8Image = npt.NDArray[np.uint8]
BoxArray = npt.NDArray[np.float32]


def _luma(bgr: tuple[int, ...]) -> float:
    return 0.114 * bgr[0] + 0.587 * bgr[1] + 0.299 * bgr[2]


def _background(rng: np.random.Generator) -> tuple[U8Image, tuple[int, ...]]:
    s = INPUT_SIZE
    color = tuple(int(c) for c in rng.uniform(0, 255, 3))
    base = np.empty((s, s, 3), np.float32)
    base[:] = color
    if rng.random() < 0.6:
        a = rng.uniform(0, 2 * math.pi)
        xs, ys = np.meshgrid(np.linspace(-0.5, 0.5, s), np.linspace(-0.5, 0.5, s))
        ramp = (math.cos(a) * xs + math.sin(a) * ys)[..., None]
        base += ramp * rng.uniform(-60, 60, 3).astype(np.float32)
    if rng.random() < 0.4:
        small = rng.normal(0, rng.uniform(5, 20), (s // 16, s // 16, 3)).astype(np.float32)
        base += cv2.resize(small, (s, s), interpolation=cv2.INTER_CUBIC)
    img = np.clip(base, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 4))):  # clutter: thin lines, thinner than any shape
        col = tuple(int(c) for c in np.clip(np.asarray(color) + rng.uniform(-80, 80, 3), 0, 255))
        p1 = (int(rng.integers(0, s)), int(rng.integers(0, s)))
        p2 = (int(p1[0] + rng.integers(-20, 21)), int(p1[1] + rng.integers(-20, 21)))
        cv2.line(img, p1, p2, col, 1, cv2.LINE_AA)
    return img, color


def _foreground(bg: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
    while True:
        fg = tuple(int(c) for c in rng.uniform(0, 255, 3))
        diff = float(np.linalg.norm(np.asarray(fg, np.float64) - np.asarray(bg, np.float64)))
        if abs(_luma(fg) - _luma(bg)) >= 50 or diff >= 150:
            return fg


def _iou(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def render_image(rng: np.random.Generator) -> tuple[U8Image, BoxArray]:
    """One image and its boxes ``(K, 5)``: class id, x1, y1, x2, y2 (float32 pixels)."""
    s = INPUT_SIZE
    img, bg = _background(rng)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    placed: list[npt.NDArray[np.float64]] = []
    rows: list[list[float]] = []
    for _ in range(n * 10):  # rejection sampling of non-overlapping placements
        if len(rows) == n:
            break
        cls = int(rng.integers(len(CLASSES)))
        radius = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
        cx = float(rng.uniform(radius * 0.7, s - radius * 0.7))
        cy = float(rng.uniform(radius * 0.7, s - radius * 0.7))
        rough = np.array([cx - radius, cy - radius, cx + radius, cy + radius])
        if any(_iou(rough, p) > 0.1 for p in placed):
            continue
        angle = float(rng.uniform(0, 2 * math.pi))
        filled = rng.random() < 0.6
        thickness = -1 if filled else int(rng.integers(2, 5))
        fg = _foreground(bg, rng)
        shape_seed = int(rng.integers(0, 2**31))
        mask = np.zeros((s, s), np.uint8)
        draw_shape(
            mask, CLASSES[cls], (cx, cy), radius, angle, (255,), thickness, np.random.default_rng(shape_seed)
        )
        ys, xs = np.nonzero(mask > 127)
        if xs.size < 12:  # clipped away almost entirely
            continue
        draw_shape(
            img, CLASSES[cls], (cx, cy), radius, angle, fg, thickness, np.random.default_rng(shape_seed)
        )
        box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        placed.append(np.asarray(box, np.float64))
        rows.append([float(cls), *box])
    if rng.random() < 0.4:
        img = np.asarray(cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.3, 1.0))), np.uint8)
    if rng.random() < 0.7:
        noise = rng.normal(0, rng.uniform(2, 10), img.shape)
        img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 95))])
        if ok:
            img = np.asarray(cv2.imdecode(enc, cv2.IMREAD_COLOR), np.uint8)
    return img, np.asarray(rows, np.float32).reshape(-1, 5)


def make_dataset(n: int, seed: int) -> tuple[U8Image, list[BoxArray]]:
    """``n`` images (``(n, S, S, 3)`` BGR uint8) and, per image, its ``(K, 5)`` boxes."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    boxes: list[BoxArray] = []
    for i in range(n):
        images[i], b = render_image(rng)
        boxes.append(b)
    return images, boxes


def make_eval_set(n: int = 500, seed: int = EVAL_SEED) -> tuple[U8Image, list[BoxArray]]:
    """The held-out evaluation set (same generator, a seed training never uses)."""
    return make_dataset(n, seed)


def to_input(bgr: U8Image) -> npt.NDArray[np.float32]:
    """BGR uint8 images (``... x S x S x 3``) to model inputs (RGB float32 0..1), as the runtime does."""
    return np.ascontiguousarray(bgr[..., ::-1], dtype=np.float32) * np.float32(1.0 / 255.0)
