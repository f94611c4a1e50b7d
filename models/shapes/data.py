"""Synthetic "shapes" camera data: OpenCV-drawn shapes on cluttered, noisy backgrounds.

TensorFlow-free on purpose: the recipe (training) and the tests (which run in the device venv
without TensorFlow) share this generator.

Every sample is drawn on a canvas of random size and aspect ratio (like a camera frame), made
imperfect (gradient/noise backgrounds, small clutter, blur, sensor noise, JPEG artefacts) and
then brought to the model input exactly as the runtime's ``ImagePreprocess`` with
``resize="stretch", interpolation="area", color="rgb", scale=1/255`` does it (see
:func:`preprocess`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

__all__ = [
    "CLASSES",
    "INPUT_SIZE",
    "VIDEO_FPS",
    "VIDEO_SIZE",
    "make_dataset",
    "preprocess",
    "render_sample",
    "render_video_frames",
    "write_video",
]

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
"""Class names, index order of the model output."""

INPUT_SIZE = 64
"""Model input is ``INPUT_SIZE x INPUT_SIZE x 3`` RGB float in [0, 1] (NHWC)."""

VIDEO_SIZE = (320, 240)
"""Demo video frame size (width, height)."""

VIDEO_FPS = 15.0

_CANVAS_SIZES: tuple[tuple[int, int], ...] = (
    (64, 64),
    (96, 96),
    (128, 96),
    (160, 120),
    (160, 90),
    (192, 144),
    (320, 240),
)
"""Canvas (width, height) choices for training samples: square and 4:3 / 16:9 camera-like."""

U8Image = npt.NDArray[np.uint8]
F32Array = npt.NDArray[np.float32]


def preprocess(bgr: U8Image, size: int = INPUT_SIZE) -> F32Array:
    """Source frame (H x W x 3 uint8 BGR) to one model input (size x size x 3 float32 RGB 0..1).

    Mirrors the bundle's ``ImagePreprocess(resize="stretch", interpolation="area",
    color="rgb", layout="nhwc", scale=1/255)``.
    """
    if bgr.shape[:2] != (size, size):
        bgr = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return rgb.astype(np.float32) * np.float32(1.0 / 255.0)


def _luma(color: npt.NDArray[np.float64]) -> float:
    b, g, r = (float(c) for c in color)
    return 0.114 * b + 0.587 * g + 0.299 * r


def _contrasting_colors(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Background and foreground BGR colors that differ enough in brightness or hue."""
    while True:
        bg = rng.uniform(0, 255, 3)
        fg = rng.uniform(0, 255, 3)
        if abs(_luma(bg) - _luma(fg)) >= 45 or np.linalg.norm(bg - fg) >= 140:
            return tuple(int(c) for c in bg), tuple(int(c) for c in fg)


def _shape_points(
    cls: str, cx: float, cy: float, radius: float, angle: float, rng: np.random.Generator
) -> npt.NDArray[np.int32] | None:
    """Polygon vertices (N x 1 x 2, int32) of a shape, or ``None`` for a circle."""
    if cls == "circle":
        return None
    if cls == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif cls == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif cls == "star":
        inner = rng.uniform(0.38, 0.5)
        pts = []
        for k in range(10):
            a = k * math.pi / 5 - math.pi / 2
            rad = 1.0 if k % 2 == 0 else inner
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif cls == "cross":
        w = rng.uniform(0.28, 0.4)
        pts = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
    else:
        raise ValueError(f"unknown class {cls!r}")
    p = np.asarray(pts, dtype=np.float64)
    c, s = math.cos(angle), math.sin(angle)
    rot = p @ np.array([[c, s], [-s, c]])
    xy = rot * radius + np.array([cx, cy])
    return np.round(xy * 16).astype(np.int32).reshape(-1, 1, 2)  # 4 fractional bits


def draw_shape(
    img: U8Image,
    cls: str,
    center: tuple[float, float],
    radius: float,
    angle: float,
    color: tuple[int, ...],
    thickness: int,
    rng: np.random.Generator,
) -> None:
    """Draw one shape in place; ``thickness < 0`` fills it (OpenCV convention)."""
    cx, cy = center
    pts = _shape_points(cls, cx, cy, radius, angle, rng)
    shift = 4
    if pts is None:
        c = (round(cx * 16), round(cy * 16))
        cv2.circle(img, c, round(radius * 16), color, thickness, cv2.LINE_AA, shift)
    elif thickness < 0:
        cv2.fillPoly(img, [pts], color, cv2.LINE_AA, shift)
    else:
        cv2.polylines(img, [pts], True, color, thickness, cv2.LINE_AA, shift)


def _background(w: int, h: int, color: tuple[int, ...], rng: np.random.Generator) -> U8Image:
    """Solid color, optionally with a linear gradient and static texture noise."""
    base = np.empty((h, w, 3), dtype=np.float32)
    base[:] = color
    if rng.random() < 0.6:  # linear gradient across the frame
        a = rng.uniform(0, 2 * math.pi)
        xs, ys = np.meshgrid(np.linspace(-0.5, 0.5, w), np.linspace(-0.5, 0.5, h))
        ramp = (math.cos(a) * xs + math.sin(a) * ys)[..., None]
        base += ramp * rng.uniform(-70, 70, 3).astype(np.float32)
    if rng.random() < 0.4:  # low-frequency blotches
        small = rng.normal(0, rng.uniform(5, 25), (max(2, h // 16), max(2, w // 16), 3))
        base += cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(base, 0, 255).astype(np.uint8)


def _clutter(img: U8Image, bg: tuple[int, ...], rng: np.random.Generator) -> None:
    """A few small lines and dots, smaller than any shape, so the model must ignore them."""
    h, w = img.shape[:2]
    m = min(h, w)
    for _ in range(int(rng.integers(0, 4))):
        col = tuple(int(c) for c in np.clip(np.asarray(bg) + rng.uniform(-80, 80, 3), 0, 255))
        x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        if rng.random() < 0.5:
            ln = rng.uniform(0.03, 0.1) * m
            a = rng.uniform(0, 2 * math.pi)
            p2 = (round(x + ln * math.cos(a)), round(y + ln * math.sin(a)))
            cv2.line(img, (round(x), round(y)), p2, col, 1, cv2.LINE_AA)
        else:
            cv2.circle(img, (round(x), round(y)), max(1, round(rng.uniform(0.01, 0.03) * m)), col, -1)


def _degrade(img: U8Image, rng: np.random.Generator, scale: float) -> U8Image:
    """Blur, additive sensor noise and JPEG artefacts (``scale`` ~ canvas size / 64)."""
    if rng.random() < 0.5:
        sigma = rng.uniform(0.3, 1.2) * scale
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    if rng.random() < 0.7:
        noise = rng.normal(0, rng.uniform(2, 14), img.shape)
        img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    if rng.random() < 0.4:
        q = int(rng.integers(35, 95))
        ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
        if ok:
            img = cv2.imdecode(enc, cv2.IMREAD_COLOR)
    return img


def render_sample(label: int, rng: np.random.Generator, canvas: tuple[int, int] | None = None) -> U8Image:
    """One BGR uint8 frame (canvas height x width x 3) showing one shape of class ``label``."""
    if canvas is None:
        canvas = _CANVAS_SIZES[int(rng.integers(len(_CANVAS_SIZES)))]
    w, h = canvas
    m = min(w, h)
    scale = m / INPUT_SIZE
    bg, fg = _contrasting_colors(rng)
    img = _background(w, h, bg, rng)
    _clutter(img, bg, rng)
    radius = rng.uniform(0.17, 0.42) * m
    margin = radius * 0.85  # allow a little clipping at the border
    cx = rng.uniform(margin, w - margin)
    cy = rng.uniform(margin, h - margin)
    angle = rng.uniform(0, 2 * math.pi)
    filled = rng.random() < 0.5
    thickness = -1 if filled else max(1, round(rng.uniform(1.2, 4.0) * scale))
    draw_shape(img, CLASSES[label], (cx, cy), radius, angle, fg, thickness, rng)
    return _degrade(img, rng, scale)


def make_dataset(n: int, seed: int) -> tuple[U8Image, npt.NDArray[np.int64]]:
    """``n`` class-balanced samples already resized to the model size (BGR uint8) and labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(CLASSES)
    rng.shuffle(labels)
    images = np.empty((n, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
    for i, lab in enumerate(labels):
        frame = render_sample(int(lab), rng)
        images[i] = cv2.resize(frame, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA)
    return images, labels


def render_video_frames(
    seed: int = 7, seconds_per_segment: float = 2.0, segments: int = 6
) -> Iterator[tuple[U8Image, int]]:
    """Demo video frames (``VIDEO_SIZE`` BGR uint8) and the class shown in each.

    One shape per segment, drifting across a smooth background while rotating and breathing;
    classes cycle through :data:`CLASSES`.
    """
    rng = np.random.default_rng(seed)
    w, h = VIDEO_SIZE
    n = round(seconds_per_segment * VIDEO_FPS)
    for seg in range(segments):
        label = seg % len(CLASSES)
        bg, fg = _contrasting_colors(rng)
        base = _background(w, h, bg, rng)
        radius0 = rng.uniform(0.25, 0.35) * h
        start = np.array([rng.uniform(0.3, 0.45) * w, rng.uniform(0.35, 0.65) * h])
        end = np.array([rng.uniform(0.55, 0.7) * w, rng.uniform(0.35, 0.65) * h])
        if rng.random() < 0.5:
            start, end = end, start
        angle0 = rng.uniform(0, 2 * math.pi)
        spin = rng.uniform(-1.5, 1.5)  # rad per second
        filled = seg % 2 == 0
        thickness = -1 if filled else int(rng.integers(6, 11))
        for k in range(n):
            t = k / max(1, n - 1)
            frame = base.copy()
            center = start + (end - start) * t
            radius = radius0 * (1.0 + 0.12 * math.sin(2 * math.pi * t))
            angle = angle0 + spin * k / VIDEO_FPS
            draw_shape(
                frame,
                CLASSES[label],
                (center[0], center[1]),
                radius,
                angle,
                fg,
                thickness,
                np.random.default_rng(seed * 1000 + seg),
            )  # fixed star/cross form
            noise = rng.normal(0, 3.0, frame.shape)
            frame = np.clip(frame.astype(np.float32) + noise, 0, 255).astype(np.uint8)
            yield frame, label


def write_video(path: Path, seed: int = 7) -> list[int]:
    """Render the demo video as MJPG ``.avi``; returns the class index of each frame."""
    w, h = VIDEO_SIZE
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), VIDEO_FPS, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"cannot open video writer for {path}")
    writer.set(cv2.VIDEOWRITER_PROP_QUALITY, 80)
    labels = []
    try:
        for frame, label in render_video_frames(seed):
            writer.write(frame)
            labels.append(label)
    finally:
        writer.release()
    return labels
