"""Preprocessing settings as stored in a bundle manifest (``manifest.preprocess``).

Declared once, at conversion time, and used unchanged by the device runtime and by the
converter's calibration: the same numbers, the same code (:mod:`edge_runtime.preprocess`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ImagePreprocess", "PreprocessSpec", "TensorPreprocess"]


class ImagePreprocess(BaseModel):
    """Image frames (H x W x C uint8 BGR from the source) to the model's input tensor.

    The float value fed to the model is ``(pixel * scale - mean[c]) / std[c]`` in the channel
    order given by ``color``; quantized inputs then use the model's own scale/zero point.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["image"] = "image"
    resize: Literal["stretch", "letterbox", "crop"] = "stretch"
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    layout: Literal["nhwc", "nchw"] = "nhwc"
    scale: float = Field(default=1.0 / 255.0, gt=0)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    pad_value: int = Field(default=114, ge=0, le=255)
    interpolation: Literal["linear", "nearest", "area"] = "linear"

    @model_validator(mode="after")
    def _check(self) -> ImagePreprocess:
        channels = 1 if self.color == "gray" else 3
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, channels):
                raise ValueError(
                    f"{name} has {len(values)} values; give 1 or {channels} for color={self.color!r}"
                )
        if any(s == 0 for s in self.std):
            raise ValueError("std values must be non-zero")
        return self


class TensorPreprocess(BaseModel):
    """Sensor windows (size x channels float32) to the model's input tensor.

    ``(x - mean[c]) / std[c]`` per channel; ``layout`` ``nwc`` keeps (1, size, channels),
    ``ncw`` transposes to (1, channels, size), ``flat`` reshapes to (1, size * channels).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["tensor"] = "tensor"
    layout: Literal["nwc", "ncw", "flat"] = "nwc"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    window: int = Field(ge=1, description="samples per window")
    hop: int | None = Field(default=None, ge=1, description="samples between windows")
    channels: int = Field(ge=1)

    @model_validator(mode="after")
    def _check(self) -> TensorPreprocess:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                raise ValueError(f"{name} has {len(values)} values; give 1 or {self.channels}")
        if any(s == 0 for s in self.std):
            raise ValueError("std values must be non-zero")
        return self


PreprocessSpec = Annotated[ImagePreprocess | TensorPreprocess, Field(discriminator="kind")]
