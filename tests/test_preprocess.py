"""Tests for edge_runtime.preprocess against references written here with plain numpy/cv2.

The references spell out each step separately (geometry, colour order, float64
normalisation, quantization ``q = round(x / scale) + zero_point`` clipped, layout) instead of
reusing the implementation's fused per-channel affine step; geometry is also checked by
where known source pixels land and by mapping them back with the returned transform.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from pydantic import ValidationError

from edge_runtime.errors import PreprocessError
from edge_runtime.preprocess import (
    ImagePreprocessor,
    TensorPreprocessor,
    make_preprocessor,
    quantize,
)
from edge_runtime.preprocess_spec import ImagePreprocess, TensorPreprocess
from edge_runtime.types import ImageTransform, TensorSpec

U8 = npt.NDArray[np.uint8]
F64 = npt.NDArray[np.float64]
INTERP = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA}
RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


def rng_image(h: int, w: int, c: int = 3, seed: int = 0) -> U8:
    shape = (h, w) if c == 0 else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ================================================================== reference


def ref_geometry(frame: U8, mode: str, mw: int, mh: int, pad: int, interp: int) -> U8:
    """Model-sized BGR image: stretch, letterbox (fit + centred padding) or centre crop."""
    h, w = frame.shape[:2]
    if mode == "stretch":
        return cv2.resize(frame, (mw, mh), interpolation=interp)
    if mode == "letterbox":
        scale = min(mw / w, mh / h)
        nw, nh = round(w * scale), round(h * scale)
        canvas = np.full((mh, mw, 3), pad, np.uint8)
        top, left = (mh - nh) // 2, (mw - nw) // 2
        canvas[top : top + nh, left : left + nw] = cv2.resize(frame, (nw, nh), interpolation=interp)
        return canvas
    # crop: the largest centred region with the model's aspect ratio
    if w * mh > h * mw:  # source is wider than the model
        ch, cw = h, round(h * mw / mh)
    else:
        cw, ch = w, round(w * mh / mw)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return cv2.resize(frame[y0 : y0 + ch, x0 : x0 + cw], (mw, mh), interpolation=interp)


def ref_color(bgr: U8, color: str) -> F64:
    if color == "rgb":
        return bgr[:, :, ::-1].astype(np.float64)
    if color == "bgr":
        return bgr.astype(np.float64)
    b, g, r = (bgr[:, :, i].astype(np.float64) for i in range(3))
    return np.floor(0.299 * r + 0.587 * g + 0.114 * b + 0.5)[:, :, None]


def ref_preprocess(frame: U8, spec: ImagePreprocess, tensor: TensorSpec) -> F64:
    """The expected model input (float64, before the final dtype cast) in the model's layout."""
    if spec.layout == "nhwc":
        mh, mw = int(tensor.shape[1] or 0), int(tensor.shape[2] or 0)
    else:
        mh, mw = int(tensor.shape[2] or 0), int(tensor.shape[3] or 0)
    geo = ref_geometry(frame, spec.resize, mw, mh, spec.pad_value, INTERP[spec.interpolation])
    pixels = ref_color(geo, spec.color)
    values = (pixels * spec.scale - np.asarray(spec.mean)) / np.asarray(spec.std)
    if tensor.scale is not None:
        lo, hi = RANGES[tensor.dtype]
        values = np.clip(np.round(values / tensor.scale) + (tensor.zero_point or 0), lo, hi)
    if spec.layout == "nchw":
        values = values.transpose(2, 0, 1)
    return values[None]


def run(spec: ImagePreprocess, tensor: TensorSpec, frame: U8) -> tuple[npt.NDArray[Any], ImageTransform]:
    pre = make_preprocessor(spec, tensor)
    assert isinstance(pre, ImagePreprocessor)
    out = pre.new_buffer()
    assert out.shape == tuple(tensor.shape) and out.dtype == np.dtype(tensor.dtype)
    transform = pre(frame, out)
    return out, transform


def nhwc(h: int, w: int, c: int = 3, dtype: str = "float32", **q: Any) -> TensorSpec:
    return TensorSpec("input", (1, h, w, c), dtype, q.get("scale"), q.get("zero_point"))


def nchw(h: int, w: int, c: int = 3, dtype: str = "float32", **q: Any) -> TensorSpec:
    return TensorSpec("input", (1, c, h, w), dtype, q.get("scale"), q.get("zero_point"))


# ================================================================== geometry / colour / layout


@pytest.mark.parametrize("resize", ["stretch", "letterbox", "crop"])
@pytest.mark.parametrize("color", ["rgb", "bgr", "gray"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("src", [(48, 80), (90, 40), (24, 24)])
def test_float_input_matches_reference(resize: str, color: str, layout: str, src: tuple[int, int]) -> None:
    channels = 1 if color == "gray" else 3
    spec = ImagePreprocess(resize=resize, color=color, layout=layout, pad_value=17)  # type: ignore[arg-type]
    tensor = (nhwc if layout == "nhwc" else nchw)(24, 32, channels)
    frame = rng_image(*src, seed=hash((resize, color, layout, src)) % 1000)
    out, _ = run(spec, tensor, frame)
    expected = ref_preprocess(frame, spec, tensor)
    # gray: the reference uses the BT.601 formula, OpenCV's fixed point may differ by 1 level
    atol = 1.01 / 255 if color == "gray" else 1e-6
    np.testing.assert_allclose(out, expected, rtol=0, atol=atol)


def test_letterbox_padding_placement_and_transform() -> None:
    """A 64x32 source into a 32x32 model: scale 1/2, 8 pad rows top and bottom."""
    frame = np.zeros((32, 64, 3), np.uint8)
    frame[6:8, 10:12] = (0, 0, 255)  # a red 2x2 block at x 10-11, y 6-7 (BGR)
    frame[30:32, 62:64] = (0, 255, 0)  # green in the bottom right corner
    spec = ImagePreprocess(resize="letterbox", color="bgr", scale=1.0, pad_value=99, interpolation="nearest")
    out, t = run(spec, nhwc(32, 32), frame)
    img = out[0]
    assert (t.sx, t.sy, t.dx, t.dy) == (0.5, 0.5, 0.0, 8.0)
    assert (t.src_w, t.src_h, t.model_w, t.model_h) == (64, 32, 32, 32)
    np.testing.assert_array_equal(img[:8], 99)
    np.testing.assert_array_equal(img[24:], 99)
    assert not np.any(img[8:24] == 99)
    np.testing.assert_array_equal(img[11, 5], (0, 0, 255))  # y 6/2 + 8 = 11, x 10/2 = 5
    np.testing.assert_array_equal(img[23, 31], (0, 255, 0))
    red = np.argwhere(np.all(img == (0, 0, 255), axis=2))
    np.testing.assert_array_equal(red, [[11, 5]])
    # model pixel box of the red block maps back to the source pixels it came from
    back = t.to_source(np.array([[5, 11, 6, 12], [31, 23, 32, 24]], np.float32))
    np.testing.assert_allclose(back, [[10, 6, 12, 8], [62, 30, 64, 32]])


def test_letterbox_tall_source_pads_columns() -> None:
    frame = np.full((64, 16, 3), 200, np.uint8)
    spec = ImagePreprocess(resize="letterbox", color="bgr", scale=1.0, pad_value=0)
    out, t = run(spec, nhwc(32, 32), frame)
    img = out[0, :, :, 0]
    assert (t.sx, t.dx, t.dy) == (0.5, 12.0, 0.0)
    np.testing.assert_array_equal(img[:, :12], 0)
    np.testing.assert_array_equal(img[:, 20:], 0)
    np.testing.assert_array_equal(img[:, 12:20], 200)


def test_centre_crop_placement_and_transform() -> None:
    """A 64x32 source into a 16x16 model: the centred 32x32 region x 16-47, scaled by 1/2."""
    frame = np.zeros((32, 64, 3), np.uint8)
    frame[6:8, 20:22] = (255, 0, 0)  # blue, inside the crop
    frame[6:8, 4:6] = (0, 0, 255)  # red, outside the crop
    spec = ImagePreprocess(resize="crop", color="bgr", scale=1.0, interpolation="nearest")
    out, t = run(spec, nhwc(16, 16), frame)
    img = out[0]
    assert (t.sx, t.sy, t.dx, t.dy) == (0.5, 0.5, -8.0, 0.0)
    blue = np.argwhere(np.all(img == (255, 0, 0), axis=2))
    np.testing.assert_array_equal(blue, [[3, 2]])  # y 6/2, x (20-16)/2
    assert not np.any(img[:, :, 2])  # the red block was cropped away
    back = t.to_source(np.array([[2, 3, 3, 4], [0, 0, 16, 16]], np.float32))
    np.testing.assert_allclose(back, [[20, 6, 22, 8], [16, 0, 48, 32]])


def test_stretch_transform_maps_corners() -> None:
    frame = rng_image(30, 50)
    _, t = run(ImagePreprocess(), nhwc(20, 40), frame)
    back = t.to_source(np.array([[0, 0, 40, 20], [10, 5, 20, 10]], np.float32))
    np.testing.assert_allclose(back, [[0, 0, 50, 30], [12.5, 7.5, 25, 15]], rtol=1e-6)


@pytest.mark.parametrize("resize", ["stretch", "letterbox", "crop"])
def test_same_size_frame_is_not_resampled(resize: str) -> None:
    frame = rng_image(32, 32, seed=4)
    out, t = run(ImagePreprocess(resize=resize, color="bgr", scale=1.0), nhwc(32, 32), frame)  # type: ignore[arg-type]
    np.testing.assert_array_equal(out[0], frame)
    assert (t.sx, t.sy, t.dx, t.dy) == (1.0, 1.0, 0.0, 0.0)


@pytest.mark.parametrize("interpolation", ["nearest", "area", "linear"])
def test_interpolation_modes(interpolation: str) -> None:
    spec = ImagePreprocess(interpolation=interpolation, color="bgr")  # type: ignore[arg-type]
    frame = rng_image(100, 60, seed=9)
    out, _ = run(spec, nhwc(25, 15), frame)
    np.testing.assert_allclose(out, ref_preprocess(frame, spec, nhwc(25, 15)), atol=1e-6)


# ================================================================== normalisation / dtypes


def test_per_channel_mean_std_scale_in_model_channel_order() -> None:
    """mean/std apply to the model's channel order (RGB here), not the source's BGR."""
    spec = ImagePreprocess(scale=1 / 127.5, mean=(1.0, 0.5, 0.0), std=(0.5, 0.25, 2.0), layout="nchw")
    frame = np.zeros((8, 8, 3), np.uint8)
    frame[..., 0], frame[..., 1], frame[..., 2] = 10, 20, 30  # B, G, R
    out, _ = run(spec, nchw(8, 8), frame)
    r, g, b = (30 / 127.5 - 1.0) / 0.5, (20 / 127.5 - 0.5) / 0.25, (10 / 127.5 - 0.0) / 2.0
    for c, value in enumerate((r, g, b)):
        np.testing.assert_allclose(out[0, c], value, rtol=1e-6)
    frame2 = rng_image(37, 53, seed=2)
    out2, _ = run(spec, nchw(16, 16), frame2)
    np.testing.assert_allclose(out2, ref_preprocess(frame2, spec, nchw(16, 16)), rtol=1e-5, atol=1e-5)


def test_imagenet_style_normalisation_gray() -> None:
    spec = ImagePreprocess(color="gray", mean=(0.45,), std=(0.226,))
    frame = rng_image(40, 40, seed=6)
    out, _ = run(spec, nhwc(20, 20, 1), frame)
    np.testing.assert_allclose(out, ref_preprocess(frame, spec, nhwc(20, 20, 1)), atol=1.01 / 255 / 0.226)


def test_float16_input() -> None:
    spec = ImagePreprocess(mean=(0.5,), std=(0.5,))
    frame = rng_image(30, 30, seed=8)
    out, _ = run(spec, nhwc(16, 16, dtype="float16"), frame)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float64), ref_preprocess(frame, spec, nhwc(16, 16)), atol=1e-3)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_uint8_identity_fast_path(layout: str) -> None:
    """A uint8 input quantized with scale 1/255 is fed the raw (resized, RGB) pixels."""
    make = nhwc if layout == "nhwc" else nchw
    tensor = make(24, 24, dtype="uint8", scale=1 / 255, zero_point=0)
    frame = rng_image(50, 70, seed=11)
    out, _ = run(ImagePreprocess(layout=layout, resize="letterbox"), tensor, frame)  # type: ignore[arg-type]
    geo = ref_geometry(frame, "letterbox", 24, 24, 114, cv2.INTER_LINEAR)[:, :, ::-1]
    expected = geo if layout == "nhwc" else geo.transpose(2, 0, 1)
    np.testing.assert_array_equal(out[0], expected)
    # unquantized uint8 model with scale=1: also the raw pixels
    out2, _ = run(ImagePreprocess(scale=1.0, layout=layout), make(24, 24, dtype="uint8"), frame)  # type: ignore[arg-type]
    geo2 = cv2.resize(frame, (24, 24), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
    np.testing.assert_array_equal(out2[0], geo2 if layout == "nhwc" else geo2.transpose(2, 0, 1))


@pytest.mark.parametrize(
    ("dtype", "scale", "zero_point", "mean", "std"),
    [
        ("int8", 0.0078125, -1, (0.5,), (0.5,)),  # [-1, 1] inputs, int8
        ("int8", 1 / 255, -128, (0.0,), (1.0,)),  # [0, 1] inputs, the usual TFLite int8
        ("int8", 0.0173, 5, (0.2, 0.4, 0.6), (0.3, 0.2, 0.1)),  # saturates both ends
        ("uint8", 0.0123, 100, (0.5, 0.4, 0.3), (0.25, 0.5, 0.2)),
    ],
)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_quantized_inputs(
    dtype: str, scale: float, zero_point: int, mean: tuple[float, ...], std: tuple[float, ...], layout: str
) -> None:
    """q = round(x / scale) + zero_point, clipped to the dtype (float32 rounding: at most 1 off)."""
    make = nhwc if layout == "nhwc" else nchw
    tensor = make(20, 28, dtype=dtype, scale=scale, zero_point=zero_point)
    spec = ImagePreprocess(mean=mean, std=std, layout=layout, resize="crop")  # type: ignore[arg-type]
    frame = rng_image(41, 67, seed=zero_point + 200)
    out, _ = run(spec, tensor, frame)
    assert out.dtype == np.dtype(dtype)
    expected = ref_preprocess(frame, spec, tensor)
    diff = np.abs(out.astype(np.int64) - expected.astype(np.int64))
    assert diff.max() <= 1
    assert (diff == 0).mean() > 0.99
    lo, hi = RANGES[dtype]
    if std == (0.3, 0.2, 0.1):  # this setting saturates: both ends must be reached
        assert (out == lo).any() and (out == hi).any()
        assert ((expected == lo) == (out == lo)).mean() > 0.99


def test_quantize_function_formula() -> None:
    values = np.array([-2.0, -0.5, 0.0, 0.26, 0.74, 3.0], np.float32)
    spec = TensorSpec("x", (6,), "int8", 0.01, 10)
    expected = np.clip(np.round(values.astype(np.float64) / 0.01) + 10, -128, 127)
    np.testing.assert_array_equal(quantize(values, spec), expected.astype(np.int8))
    plain = quantize(values, TensorSpec("x", (6,), "float32"))
    assert plain.dtype == np.float32
    np.testing.assert_array_equal(plain, values)


# ================================================================== input frame formats


def test_gray_frame_into_rgb_model() -> None:
    gray = rng_image(30, 40, c=0, seed=3)
    spec = ImagePreprocess(color="rgb", scale=1.0)
    for frame in (gray, gray[:, :, None]):
        out, _ = run(spec, nhwc(15, 20), frame)
        bgr = np.repeat(gray[:, :, None], 3, axis=2)
        expected = cv2.resize(bgr, (20, 15), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(out[0], expected, atol=1e-6)
        np.testing.assert_array_equal(out[0, :, :, 0], out[0, :, :, 2])


def test_gray_frame_into_gray_model() -> None:
    gray = rng_image(30, 40, c=0, seed=13)
    out, _ = run(ImagePreprocess(color="gray", scale=1.0), nhwc(30, 40, 1), gray)
    np.testing.assert_array_equal(out[0, :, :, 0], gray)


def test_bgra_frame_drops_alpha() -> None:
    bgra = rng_image(30, 40, c=4, seed=5)
    spec = ImagePreprocess(color="rgb", resize="letterbox")
    out, _ = run(spec, nhwc(16, 16), bgra)
    np.testing.assert_allclose(
        out, ref_preprocess(np.ascontiguousarray(bgra[:, :, :3]), spec, nhwc(16, 16)), atol=1e-6
    )


def test_non_contiguous_frame_view() -> None:
    """A region of interest (a strided view) is handled like the same pixels copied."""
    big = rng_image(100, 120, seed=21)
    view = big[10:70, 15:95]
    spec = ImagePreprocess(resize="letterbox")
    out, _ = run(spec, nhwc(32, 32), view)
    np.testing.assert_allclose(out, ref_preprocess(np.ascontiguousarray(view), spec, nhwc(32, 32)), atol=1e-6)


# ================================================================== sensor windows


def ref_tensor(window: F64, spec: TensorPreprocess, tensor: TensorSpec) -> F64:
    values = (window.astype(np.float64) - np.asarray(spec.mean)) / np.asarray(spec.std)
    if tensor.scale is not None:
        lo, hi = RANGES[tensor.dtype]
        values = np.clip(np.round(values / tensor.scale) + (tensor.zero_point or 0), lo, hi)
    if spec.layout == "ncw":
        values = values.T
    return values.reshape(tensor.shape)


@pytest.mark.parametrize(("layout", "shape"), [("nwc", (1, 50, 3)), ("ncw", (1, 3, 50)), ("flat", (1, 150))])
@pytest.mark.parametrize("dtype", ["float32", "int8", "uint8"])
def test_tensor_preprocessor_layouts(layout: str, shape: tuple[int, ...], dtype: str) -> None:
    spec = TensorPreprocess(layout=layout, window=50, channels=3, mean=(1.0, -2.0, 0.5), std=(2.0, 0.5, 1.5))  # type: ignore[arg-type]
    q = {"int8": (0.02, -3), "uint8": (0.03, 128)}.get(dtype)
    tensor = TensorSpec("w", shape, dtype, q[0] if q else None, q[1] if q else None)
    pre = make_preprocessor(spec, tensor)
    assert isinstance(pre, TensorPreprocessor)
    window = np.random.default_rng(7).normal(0.0, 3.0, (50, 3)).astype(np.float32)
    out = pre.new_buffer()
    assert out.shape == shape and out.dtype == np.dtype(dtype)
    assert pre(window, out) is None
    expected = ref_tensor(window, spec, tensor)
    if q is None:
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    else:
        diff = np.abs(out.astype(np.int64) - expected.astype(np.int64))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.98
        lo, hi = RANGES[dtype]
        assert (out == lo).any() or (out == hi).any()  # scale chosen so that some values clip


def test_tensor_preprocessor_ncw_is_channel_major() -> None:
    """Channel c's samples are contiguous in ncw: out[0, c, t] == window[t, c]."""
    spec = TensorPreprocess(layout="ncw", window=4, channels=2)
    pre = make_preprocessor(spec, TensorSpec("w", (1, 2, 4), "float32"))
    window = np.array([[0, 10], [1, 11], [2, 12], [3, 13]], np.float32)
    out = pre.new_buffer()
    pre(window, out)
    np.testing.assert_array_equal(out[0], [[0, 1, 2, 3], [10, 11, 12, 13]])


def test_tensor_preprocessor_accepts_float64_windows() -> None:
    spec = TensorPreprocess(window=6, channels=2, mean=(1.0,), std=(4.0,))
    tensor = TensorSpec("w", (1, 6, 2), "float32")
    pre = make_preprocessor(spec, tensor)
    window = np.arange(12, dtype=np.float64).reshape(6, 2)
    out = pre.new_buffer()
    pre(window, out)
    np.testing.assert_allclose(out, ref_tensor(window, spec, tensor), rtol=1e-6)


# ================================================================== errors


def image_pre(tensor: TensorSpec | None = None, **kw: Any) -> ImagePreprocessor:
    pre = make_preprocessor(ImagePreprocess(**kw), tensor or nhwc(16, 16))
    assert isinstance(pre, ImagePreprocessor)
    return pre


@pytest.mark.parametrize(
    "frame",
    [
        np.zeros((16, 16, 3), np.float32),
        np.zeros((16, 16, 3), np.uint16),
        np.zeros((16, 16, 3), np.int8),
        [[0, 1], [2, 3]],
    ],
)
def test_wrong_frame_dtype(frame: Any) -> None:
    pre = image_pre()
    with pytest.raises(PreprocessError, match="uint8"):
        pre(frame, pre.new_buffer())


@pytest.mark.parametrize("shape", [(16,), (2, 16, 16, 3), (16, 16, 2), (16, 16, 5)])
def test_wrong_frame_ndim_or_channels(shape: tuple[int, ...]) -> None:
    pre = image_pre()
    with pytest.raises(PreprocessError, match=r"expected H x W .*check the source") as err:
        pre(np.zeros(shape, np.uint8), pre.new_buffer())
    assert str(list(shape)) in str(err.value)


@pytest.mark.parametrize("shape", [(0, 16, 3), (16, 0, 3), (0, 0), (0, 0, 4), (0, 8, 1)])
def test_empty_frame(shape: tuple[int, ...]) -> None:
    pre = image_pre()
    with pytest.raises(PreprocessError, match="empty"):
        pre(np.zeros(shape, np.uint8), pre.new_buffer())


@pytest.mark.parametrize("shape", [(49, 3), (50, 2), (150,), (1, 50, 3), (3, 50)])
def test_wrong_window_shape(shape: tuple[int, ...]) -> None:
    pre = make_preprocessor(TensorPreprocess(window=50, channels=3), TensorSpec("w", (1, 50, 3), "float32"))
    with pytest.raises(PreprocessError, match=r"\[50, 3\] \(window x channels\)") as err:
        pre(np.zeros(shape, np.float32), pre.new_buffer())
    assert str(list(shape)) in str(err.value)
    with pytest.raises(PreprocessError):
        pre([[0.0] * 3] * 50, pre.new_buffer())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "tensor", "match"),
    [
        (ImagePreprocess(color="gray"), nhwc(16, 16, 3), "3 channels but preprocess.color is 'gray'"),
        (ImagePreprocess(color="rgb"), nhwc(16, 16, 1), "1 channels but preprocess.color is 'rgb'"),
        (ImagePreprocess(layout="nchw"), nhwc(16, 16, 3), "layout 'nchw'"),
        (ImagePreprocess(layout="nhwc"), nchw(16, 16, 3), "layout 'nhwc'"),
        (ImagePreprocess(), TensorSpec("x", (1, None, None, 3), "float32"), "fixed 4-D input"),
        (ImagePreprocess(), TensorSpec("x", (1, 3, 16), "float32"), "fixed 4-D input"),
        (ImagePreprocess(), nhwc(16, 16, dtype="float64"), "dtype float64"),
        (ImagePreprocess(), nhwc(16, 16, dtype="int32"), "dtype int32"),
    ],
)
def test_model_mismatch_at_construction(spec: ImagePreprocess, tensor: TensorSpec, match: str) -> None:
    with pytest.raises(PreprocessError, match=match) as err:
        make_preprocessor(spec, tensor)
    assert "'input'" in str(err.value) or "'x'" in str(err.value)  # names the model input


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        (TensorSpec("w", (1, 40, 3), "float32"), r"120 values.*window=50 x channels=3 = 150"),
        (TensorSpec("w", (1, None, 3), "float32"), "dynamic shape"),
        (TensorSpec("w", (1, 50, 3), "float64"), "dtype float64"),
    ],
)
def test_tensor_model_mismatch_at_construction(tensor: TensorSpec, match: str) -> None:
    with pytest.raises(PreprocessError, match=match):
        make_preprocessor(TensorPreprocess(window=50, channels=3), tensor)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mean": (0.1, 0.2)},
        {"std": (1.0, 0.0, 1.0)},
        {"color": "gray", "mean": (0.1, 0.2, 0.3)},
        {"pad_value": 256},
        {"scale": 0},
        {"resize": "fit"},
        {"colour": "rgb"},
    ],
)
def test_invalid_image_spec(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ImagePreprocess(**kwargs)


# ================================================================== hot path


@pytest.mark.parametrize("resize", ["stretch", "letterbox", "crop"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_hot_path_reuses_buffers(resize: str, layout: str) -> None:
    """Repeated calls write into the same ``out`` and allocate nothing frame-sized."""
    make = nhwc if layout == "nhwc" else nchw
    tensor = make(256, 256)
    spec = ImagePreprocess(resize=resize, layout=layout, mean=(0.4,), std=(0.3,))  # type: ignore[arg-type]
    pre = make_preprocessor(spec, tensor)
    frames = [rng_image(240, 320, seed=s) for s in (1, 2)]
    out = pre.new_buffer()
    pre(frames[0], out)
    first = out.copy()
    address = out.__array_interface__["data"][0]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        pre(frames[1], out)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert out.__array_interface__["data"][0] == address
    assert peak < out.nbytes // 4, f"{peak} bytes allocated for a {out.nbytes}-byte input"
    np.testing.assert_allclose(out, ref_preprocess(frames[1], spec, tensor), atol=1e-5)
    pre(frames[0], out)
    np.testing.assert_array_equal(out, first)


def test_hot_path_tensor_preprocessor() -> None:
    spec = TensorPreprocess(layout="ncw", window=4096, channels=8, mean=(0.5,), std=(2.0,))
    tensor = TensorSpec("w", (1, 8, 4096), "int8", 0.01, 0)
    pre = make_preprocessor(spec, tensor)
    windows = [np.random.default_rng(s).normal(0, 1, (4096, 8)).astype(np.float32) for s in (0, 1)]
    out = pre.new_buffer()
    pre(windows[0], out)
    first = out.copy()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        pre(windows[1], out)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < windows[1].nbytes // 2, f"{peak} bytes allocated for a {windows[1].nbytes}-byte window"
    pre(windows[0], out)
    np.testing.assert_array_equal(out, first)


def test_transform_is_cached_per_source_size() -> None:
    pre = image_pre(nhwc(32, 32), resize="letterbox")
    out = pre.new_buffer()
    t1 = pre(rng_image(48, 64), out)
    t2 = pre(rng_image(48, 64, seed=1), out)
    t3 = pre(rng_image(64, 48), out)
    assert t1 == t2 and t1 != t3
    assert (t3.dx, t3.dy) == (4.0, 0.0)
