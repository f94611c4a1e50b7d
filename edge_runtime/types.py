"""Small value types shared by sources, preprocessing, backends, decoders and sinks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = ["Frame", "ImageTransform", "Result", "TensorSpec"]

FrameKind = Literal["image", "samples"]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output as the runtime sees it.

    ``shape`` uses ``None`` for dynamic dimensions. ``scale``/``zero_point`` are set for
    quantized (int8/uint8) tensors: ``real = scale * (q - zero_point)``.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None and self.dtype in ("int8", "uint8", "int16")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.quantized:
            out["scale"] = self.scale
            out["zero_point"] = self.zero_point
        return out


@dataclass(slots=True)
class Frame:
    """One unit of input from a source.

    ``data`` is an image (H x W x C uint8 BGR, or H x W gray) for ``kind == "image"``, or a
    float32 array of samples (N x channels) for ``kind == "samples"``. ``t_capture`` is
    :func:`time.monotonic` when the source produced it; ``source_ts`` is the source's own
    timestamp (video position in ms, sensor time) when it has one.
    """

    data: npt.NDArray[Any]
    index: int
    t_capture: float
    kind: FrameKind = "image"
    source_ts: float | None = None


@dataclass(frozen=True, slots=True)
class ImageTransform:
    """Maps model-input pixel coordinates back to source-frame pixels.

    Preprocessing resized the source (``src_w`` x ``src_h``) with ``x_model = x_src * sx + dx``
    (same for y); letterbox padding and centre-crop offsets live in ``dx``/``dy``.
    """

    sx: float
    sy: float
    dx: float
    dy: float
    src_w: int
    src_h: int
    model_w: int
    model_h: int

    def to_source(self, boxes: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Map ``(N, 4)`` x1, y1, x2, y2 boxes in model pixels to clipped source pixels."""
        out = np.empty_like(boxes, dtype=np.float32)
        out[:, 0] = (boxes[:, 0] - self.dx) / self.sx
        out[:, 2] = (boxes[:, 2] - self.dx) / self.sx
        out[:, 1] = (boxes[:, 1] - self.dy) / self.sy
        out[:, 3] = (boxes[:, 3] - self.dy) / self.sy
        np.clip(out[:, 0::2], 0.0, float(self.src_w), out=out[:, 0::2])
        np.clip(out[:, 1::2], 0.0, float(self.src_h), out=out[:, 1::2])
        return out


@dataclass(slots=True)
class Result:
    """A decoded inference result for one frame or window, ready for the sinks."""

    frame_index: int
    payload: dict[str, Any]
    t_capture: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    frame: Frame | None = None
