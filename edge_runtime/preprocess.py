"""The one preprocessing implementation, used by the daemon and by the converter's calibration.

A :class:`Preprocessor` turns a source frame (an image or a sensor window) into the model's
input tensor, written into a caller-owned buffer so the hot path allocates nothing per frame:

* resize: ``stretch`` (ignore aspect), ``letterbox`` (fit, pad with ``pad_value``) or ``crop``
  (fill, centre crop); the :class:`~edge_runtime.types.ImageTransform` it returns maps model
  pixels back to source pixels for detection boxes;
* colour: source frames are BGR (OpenCV's order); ``rgb``, ``bgr`` or ``gray`` for the model;
* normalisation ``(pixel * scale - mean) / std`` fused with the model's own input quantization
  (``q = value / q_scale + zero_point``) into one per-channel affine step;
* layout ``nhwc`` / ``nchw`` (images) and ``nwc`` / ``ncw`` / ``flat`` (sensor windows).

Example::

    >>> import numpy as np
    >>> from edge_runtime.preprocess import make_preprocessor
    >>> from edge_runtime.preprocess_spec import ImagePreprocess
    >>> from edge_runtime.types import TensorSpec
    >>> pre = make_preprocessor(ImagePreprocess(resize="letterbox"),
    ...                         TensorSpec("x", (1, 32, 32, 3), "float32"))
    >>> out = pre.new_buffer()
    >>> transform = pre(np.zeros((48, 64, 3), np.uint8), out)
    >>> out.shape, transform.dy
    ((1, 32, 32, 3), 4.0)
"""

from __future__ import annotations

from typing import Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from edge_runtime.errors import PreprocessError
from edge_runtime.preprocess_spec import ImagePreprocess, PreprocessSpec, TensorPreprocess
from edge_runtime.types import ImageTransform, TensorSpec

__all__ = [
    "ImagePreprocessor",
    "Preprocessor",
    "TensorPreprocessor",
    "make_preprocessor",
    "quantize",
]

_INTERP = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA}
_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}
_DTYPES = {"float32", "float16", "int8", "uint8", "int16"}


class Preprocessor(Protocol):
    """Turns one frame into the model input, in place."""

    def new_buffer(self) -> npt.NDArray[Any]:
        """A fresh output buffer of the model's input shape and dtype."""
        ...

    def __call__(self, data: npt.NDArray[Any], out: npt.NDArray[Any]) -> ImageTransform | None:
        """Fill ``out`` from ``data``; return the image transform (None for sensor windows)."""
        ...


def quantize(values: npt.NDArray[np.float32], spec: TensorSpec) -> npt.NDArray[Any]:
    """Quantize float values to ``spec``'s integer dtype with its scale and zero point."""
    if not spec.quantized or spec.scale is None:
        return np.asarray(values, dtype=spec.dtype)
    lo, hi = _INT_RANGES[spec.dtype]
    q = np.rint(values / spec.scale) + (spec.zero_point or 0)
    return np.asarray(np.clip(q, lo, hi), dtype=spec.dtype)


def _affine(
    scale: float, mean: tuple[float, ...], std: tuple[float, ...], channels: int, spec: TensorSpec
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Per-channel alpha, beta with ``model_value = x * alpha + beta`` (quantization fused)."""
    mean_a = np.broadcast_to(np.asarray(mean, np.float64), (channels,))
    std_a = np.broadcast_to(np.asarray(std, np.float64), (channels,))
    alpha = scale / std_a
    beta = -mean_a / std_a
    if spec.quantized and spec.scale:
        alpha = alpha / spec.scale
        beta = beta / spec.scale + (spec.zero_point or 0)
    return alpha.astype(np.float32), beta.astype(np.float32)


def _check_dtype(spec: TensorSpec) -> None:
    if spec.dtype not in _DTYPES:
        raise PreprocessError(
            f"model input {spec.name!r} has dtype {spec.dtype}; edge-runtime feeds "
            f"{sorted(_DTYPES)} inputs - re-export the model with one of those"
        )


class ImagePreprocessor:
    """Image frame -> model input tensor (see module docstring)."""

    def __init__(self, spec: ImagePreprocess, tensor: TensorSpec) -> None:
        _check_dtype(tensor)
        shape = tensor.shape
        if len(shape) != 4 or any(d is None for d in shape[1:]):
            raise PreprocessError(
                f"model input {tensor.name!r} has shape {list(shape)}; an image model needs a "
                "fixed 4-D input (1, H, W, C) or (1, C, H, W) - export it with a fixed size"
            )
        dims = [int(d) for d in shape[1:] if d is not None]
        if spec.layout == "nhwc":
            self.height, self.width, self.channels = dims
        else:
            self.channels, self.height, self.width = dims
        expected = 1 if spec.color == "gray" else 3
        if self.channels != expected:
            raise PreprocessError(
                f"model input {tensor.name!r} has {self.channels} channels but preprocess.color is "
                f"{spec.color!r} ({expected} channels) with layout {spec.layout!r}; fix "
                "preprocess.color or preprocess.layout in the manifest"
            )
        self.spec = spec
        self.tensor = tensor
        self._shape = (1, *dims)
        self._dtype = np.dtype(tensor.dtype)
        self._interp = _INTERP[spec.interpolation]
        alpha, beta = _affine(spec.scale, spec.mean, spec.std, self.channels, tensor)
        self._identity = bool(self._dtype == np.uint8 and np.allclose(alpha, 1.0) and np.allclose(beta, 0.0))
        self._alpha = alpha
        self._beta = beta
        self._int_range = _INT_RANGES.get(tensor.dtype)
        hwc = (self.height, self.width, self.channels)
        self._resized = np.empty((self.height, self.width, 3), np.uint8)
        self._colored = np.empty(hwc, np.uint8)
        self._gray = np.empty((self.height, self.width), np.uint8)
        self._work = np.empty(hwc, np.float32)
        self._lut = self._make_lut(alpha, beta)
        # NCHW: the table writes an HWC buffer that is then copied transposed.
        self._lut_hwc = np.empty(hwc, self._dtype) if spec.layout == "nchw" else None
        self._geometry: dict[tuple[int, int], tuple[ImageTransform, Any]] = {}

    def new_buffer(self) -> npt.NDArray[Any]:
        return np.empty(self._shape, self._dtype)

    def _make_lut(self, alpha: npt.NDArray[np.float32], beta: npt.NDArray[np.float32]) -> Any:
        """256-entry per-channel table of the model value of every pixel value (bit-exact with
        the float32 arithmetic below); None when cv2.LUT cannot produce the model dtype."""
        if self._identity or self._dtype not in (np.float32, np.int8, np.uint8, np.int16):
            return None
        levels = np.arange(256, dtype=np.uint8)[:, None].repeat(self.channels, axis=1)
        work = np.empty(levels.shape, np.float32)
        np.multiply(levels, alpha, out=work)
        np.add(work, beta, out=work)
        if self._int_range is not None:
            np.rint(work, out=work)
            np.clip(work, self._int_range[0], self._int_range[1], out=work)
        lut = work.astype(self._dtype).reshape(1, 256, self.channels)
        return np.ascontiguousarray(lut if self.channels > 1 else lut[:, :, 0])

    def _plan(self, src_w: int, src_h: int) -> tuple[ImageTransform, Any]:
        """Resize geometry for one source size, cached (sizes rarely change)."""
        key = (src_w, src_h)
        cached = self._geometry.get(key)
        if cached is not None:
            return cached
        mw, mh = self.width, self.height
        mode = self.spec.resize
        plan: Any
        if mode == "stretch" or (src_w, src_h) == (mw, mh):
            t = ImageTransform(mw / src_w, mh / src_h, 0.0, 0.0, src_w, src_h, mw, mh)
            plan = ("stretch",)
        elif mode == "letterbox":
            s = min(mw / src_w, mh / src_h)
            nw, nh = max(1, round(src_w * s)), max(1, round(src_h * s))
            px, py = (mw - nw) // 2, (mh - nh) // 2
            t = ImageTransform(nw / src_w, nh / src_h, float(px), float(py), src_w, src_h, mw, mh)
            plan = ("letterbox", nw, nh, px, py, np.empty((nh, nw, 3), np.uint8))
        else:  # crop: take the centred region with the model's aspect, then resize it
            s = max(mw / src_w, mh / src_h)
            cw, ch = min(src_w, round(mw / s)), min(src_h, round(mh / s))
            cx, cy = (src_w - cw) // 2, (src_h - ch) // 2
            t = ImageTransform(mw / cw, mh / ch, -cx * mw / cw, -cy * mh / ch, src_w, src_h, mw, mh)
            plan = ("crop", cx, cy, cw, ch)
        if len(self._geometry) > 8:
            self._geometry.clear()
        self._geometry[key] = (t, plan)
        return t, plan

    def _bgr(self, image: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            got = getattr(image, "dtype", type(image).__name__)
            raise PreprocessError(f"image frames must be uint8 arrays, got {got}")
        if image.size == 0:
            raise PreprocessError("image frame is empty (0 pixels)")
        if image.ndim == 2:
            return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        if image.ndim == 3 and image.shape[2] == 3:
            return image
        if image.ndim == 3 and image.shape[2] == 4:
            return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        if image.ndim == 3 and image.shape[2] == 1:
            return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        raise PreprocessError(
            f"image frame has shape {list(image.shape)}; expected H x W (gray) or H x W x 1/3/4 "
            "(BGR/BGRA) - check the source"
        )

    def __call__(self, data: npt.NDArray[Any], out: npt.NDArray[Any]) -> ImageTransform:
        image = self._bgr(data)
        src_h, src_w = image.shape[:2]
        if src_w < 1 or src_h < 1:
            raise PreprocessError("image frame is empty (0 pixels)")
        transform, plan = self._plan(src_w, src_h)
        resized = self._resized
        if plan[0] == "stretch":
            if (src_w, src_h) == (self.width, self.height):
                resized = image
            else:
                cv2.resize(image, (self.width, self.height), dst=resized, interpolation=self._interp)
        elif plan[0] == "letterbox":
            _, nw, nh, px, py, tmp = plan
            cv2.resize(image, (nw, nh), dst=tmp, interpolation=self._interp)
            resized.fill(self.spec.pad_value)
            resized[py : py + nh, px : px + nw] = tmp
        else:
            _, cx, cy, cw, ch = plan
            region = image[cy : cy + ch, cx : cx + cw]
            cv2.resize(region, (self.width, self.height), dst=resized, interpolation=self._interp)
        color = self.spec.color
        if color == "rgb":
            colored = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB, dst=self._colored)
        elif color == "gray":
            cv2.cvtColor(resized, cv2.COLOR_BGR2GRAY, dst=self._gray)
            colored = self._gray[:, :, None]
        else:
            colored = resized
        target = out[0] if self.spec.layout == "nhwc" else out[0].transpose(1, 2, 0)
        if self._identity:
            np.copyto(target, colored)
            return transform
        if self._lut is not None:
            hwc = target if self._lut_hwc is None else self._lut_hwc
            src = colored if self.channels > 1 else colored[:, :, 0]
            dst = hwc if self.channels > 1 else hwc[:, :, 0]
            if cv2.LUT(src, self._lut, dst=dst) is dst:
                if self._lut_hwc is not None:
                    np.copyto(target, self._lut_hwc)
                return transform
            # cv2 allocated a fresh array (unexpected layout): fall through to numpy
        work = self._work
        np.multiply(colored, self._alpha, out=work)
        np.add(work, self._beta, out=work)
        if self._int_range is not None:
            np.rint(work, out=work)
            np.clip(work, self._int_range[0], self._int_range[1], out=work)
        np.copyto(target, work, casting="unsafe")
        return transform


class TensorPreprocessor:
    """Sensor window (size x channels float32) -> model input tensor."""

    def __init__(self, spec: TensorPreprocess, tensor: TensorSpec) -> None:
        _check_dtype(tensor)
        if any(d is None for d in tensor.shape[1:]):
            raise PreprocessError(
                f"model input {tensor.name!r} has dynamic shape {list(tensor.shape)}; export a "
                "fixed window size"
            )
        self.spec = spec
        self.tensor = tensor
        n = spec.window * spec.channels
        dims = [int(d) for d in tensor.shape[1:] if d is not None]
        if int(np.prod(dims)) != n:
            raise PreprocessError(
                f"model input {tensor.name!r} has shape {list(tensor.shape)} ({int(np.prod(dims))} "
                f"values) but preprocess gives window={spec.window} x channels={spec.channels} "
                f"= {n}; fix preprocess.window/channels in the manifest"
            )
        self._shape = (1, *dims)
        self._dtype = np.dtype(tensor.dtype)
        alpha, beta = _affine(1.0, spec.mean, spec.std, spec.channels, tensor)
        self._alpha, self._beta = alpha, beta
        self._int_range = _INT_RANGES.get(tensor.dtype)
        self._work = np.empty((spec.window, spec.channels), np.float32)

    def new_buffer(self) -> npt.NDArray[Any]:
        return np.empty(self._shape, self._dtype)

    def __call__(self, data: npt.NDArray[Any], out: npt.NDArray[Any]) -> None:
        spec = self.spec
        if not isinstance(data, np.ndarray) or data.shape != (spec.window, spec.channels):
            got = list(getattr(data, "shape", ()))
            raise PreprocessError(
                f"sensor window has shape {got}; the model expects "
                f"[{spec.window}, {spec.channels}] (window x channels) - check the source columns"
            )
        work = self._work
        np.multiply(data, self._alpha, out=work, casting="unsafe")
        np.add(work, self._beta, out=work)
        if self._int_range is not None:
            np.rint(work, out=work)
            np.clip(work, self._int_range[0], self._int_range[1], out=work)
        if spec.layout == "ncw":
            np.copyto(out.reshape(spec.channels, spec.window), work.T, casting="unsafe")
        else:
            np.copyto(out.reshape(spec.window, spec.channels), work, casting="unsafe")


def make_preprocessor(spec: PreprocessSpec, tensor: TensorSpec) -> ImagePreprocessor | TensorPreprocessor:
    """Build the preprocessor for ``spec`` feeding the model input ``tensor``."""
    if isinstance(spec, ImagePreprocess):
        return ImagePreprocessor(spec, tensor)
    return TensorPreprocessor(spec, tensor)
