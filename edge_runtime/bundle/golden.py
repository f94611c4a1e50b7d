"""Golden frames for a bundle's self-test, read from what a user has at hand.

Frames are kept as a source delivers them (uint8 BGR images, or float32 ``window x channels``
sensor windows) so the self-test exercises the device's preprocessing too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_runtime.errors import BundleError
from edge_runtime.preprocess_spec import PreprocessSpec, TensorPreprocess

__all__ = ["golden_frames"]

log = logging.getLogger(__name__)

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _images(folder: Path, count: int) -> list[npt.NDArray[Any]]:
    """Up to ``count`` images from ``folder`` and its labelled subfolders, spread over classes."""
    from edge_runtime.sources.images import read_image

    groups = [sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)]
    groups += [
        sorted(p for p in sub.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        for sub in sorted(folder.iterdir())
        if sub.is_dir()
    ]
    groups = [g for g in groups if g]
    frames: list[npt.NDArray[Any]] = []
    for i in range(max((len(g) for g in groups), default=0)):
        for group in groups:
            if i < len(group) and len(frames) < count:
                image = read_image(group[i])
                if image is not None:
                    frames.append(image)
    return frames


def golden_frames(path: Path | None, preprocess: PreprocessSpec, count: int = 8) -> npt.NDArray[Any]:
    """Frames from ``.npz`` (``frames``), ``.npy``, an image folder (labelled subfolders too), a
    video, a CSV/JSONL sensor recording; seeded synthetic frames when ``path`` is None."""
    if path is None:
        rng = np.random.default_rng(0)
        if isinstance(preprocess, TensorPreprocess):
            return rng.standard_normal((count, preprocess.window, preprocess.channels)).astype(np.float32)
        log.warning("no golden frames given: the self-test uses seeded random images")
        return rng.integers(0, 256, (count, 96, 128, 3), dtype=np.uint8)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "frames" not in data.files:
                raise BundleError(f"{path} has no 'frames' array of raw frames")
            return np.asarray(data["frames"][:count])
    if path.suffix == ".npy":
        return np.asarray(np.load(path, allow_pickle=False)[:count])
    if path.is_dir() and not isinstance(preprocess, TensorPreprocess):
        frames = _images(path, count)
    else:
        frames = _from_source(path, preprocess, count)
    if not frames:
        raise BundleError(f"{path} gave no frames for the self-test")
    first = frames[0].shape
    return np.stack([f for f in frames if f.shape == first][:count])


def _from_source(path: Path, preprocess: PreprocessSpec, count: int) -> list[npt.NDArray[Any]]:
    from edge_runtime.sources import Windower, make_source, parse_source_uri
    from edge_runtime.sources.specs import WindowSpec

    source = make_source(parse_source_uri(str(path)))
    windower = (
        Windower(WindowSpec(size=preprocess.window, hop=preprocess.hop))
        if isinstance(preprocess, TensorPreprocess)
        else None
    )
    frames: list[npt.NDArray[Any]] = []
    source.open()
    try:
        while len(frames) < count:
            frame = source.read()
            if frame is None:
                break
            frames.extend(f.data.copy() for f in (windower.push(frame) if windower else [frame]))
    finally:
        source.close()
    return frames[:count]
