"""Calibration and evaluation data, made by the device's own preprocessing.

Every sample goes through :func:`edge_runtime.preprocess.make_preprocessor` exactly as the
daemon will feed it, with a float32 input spec so the values are the model's logical floats
(what the fp32 model takes; quantization of the input, if any, happens later in the backend).
Calibrating on anything else (a different resize, channel order or scale) gives ranges that do
not match what the device sees.

Sources:

* an image folder: flat (``calib/*.jpg``), or labelled subfolders (``calib/<class>/*.jpg``)
  whose names map to class ids through the model's ``labels`` list;
* ``.npy`` (model inputs) or ``.npz`` with ``inputs``/``x`` (model inputs, float32) and
  optional ``labels``/``y``, or ``frames`` (raw source frames, preprocessed here);
* ``.csv``/``.jsonl`` sensor recordings, windowed with the device's
  :class:`~edge_runtime.sources.Windower` (``TensorPreprocess.window``/``hop``);
* frames already in memory (:func:`calibration_from_frames`).

Every problem raises :class:`~edge_runtime.errors.CalibrationError` naming what is wrong and
how to fix it. Sampling (``count``) is a seeded shuffle, stratified over classes for labelled
folders, so the same call always picks the same samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from converters.types import CalibrationSet
from edge_runtime.errors import CalibrationError, EdgeRuntimeError, PreprocessError, SourceError
from edge_runtime.preprocess_spec import ImagePreprocess, PreprocessSpec, TensorPreprocess
from edge_runtime.sources.images import read_image
from edge_runtime.types import TensorSpec

__all__ = [
    "IMAGE_SUFFIXES",
    "SENSOR_SUFFIXES",
    "calibration_from_arrays",
    "calibration_from_frames",
    "calibration_from_images",
    "calibration_from_sensor_file",
    "float_input_spec",
    "load_calibration",
    "model_input_spec",
    "split_calibration",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm"}
)
"""Image file suffixes read from calibration folders (the device's image-folder source's set)."""

SENSOR_SUFFIXES: dict[str, Literal["csv", "json"]] = {".csv": "csv", ".jsonl": "json", ".ndjson": "json"}
"""Sensor recording suffixes and their line format."""

_ARRAY_SUFFIXES = (".npy", ".npz")
_INPUT_KEYS = ("inputs", "x")
_LABEL_KEYS = ("labels", "y")


# --------------------------------------------------------------------------- input spec


def model_input_spec(model: Path) -> TensorSpec:
    """The model's (single) input as its runtime reports it (``.onnx`` or ``.tflite``)."""
    from edge_runtime.backends import FORMAT_BACKEND, BackendOptions, load_backend

    fmt = {".onnx": "onnx", ".tflite": "tflite"}.get(model.suffix.lower())
    if fmt is None:
        raise CalibrationError(f"{model.name}: model files must end in .onnx or .tflite")
    try:
        backend = load_backend(FORMAT_BACKEND[fmt], model, BackendOptions(threads=1, warmup_runs=0))
    except EdgeRuntimeError as exc:
        raise CalibrationError(f"cannot read the input of {model.name}: {exc}") from exc
    try:
        if len(backend.inputs) != 1:
            raise CalibrationError(
                f"{model.name} has {len(backend.inputs)} inputs; calibration supports single-input "
                "models - export the model with one input tensor"
            )
        return backend.inputs[0]
    finally:
        backend.close()


def float_input_spec(tensor: TensorSpec | Sequence[int | None], name: str = "input") -> TensorSpec:
    """``tensor`` as a float32 spec with batch 1 (what calibration preprocesses into).

    ``tensor`` is the model input as the runtime reports it, or just its shape.
    """
    if isinstance(tensor, TensorSpec):
        shape, name = tensor.shape, tensor.name
    else:
        shape = tuple(tensor)
    if len(shape) < 2:
        raise CalibrationError(
            f"model input {name!r} has shape {list(shape)}; calibration needs a batch dimension "
            "and at least one data dimension - export the model with a (1, ...) input"
        )
    if any(d is None for d in shape[1:]):
        raise CalibrationError(
            f"model input {name!r} has dynamic shape {list(shape)}; calibration needs fixed "
            "sizes - export the model with a fixed input size"
        )
    return TensorSpec(name, (1, *shape[1:]), "float32")


def _sample_shape(spec: TensorSpec) -> tuple[int, ...]:
    return tuple(int(d) for d in spec.shape[1:] if d is not None)


# --------------------------------------------------------------------------- frames


def _preprocessor(spec: PreprocessSpec, tensor: TensorSpec) -> Any:
    from edge_runtime.preprocess import make_preprocessor

    try:
        return make_preprocessor(spec, tensor)
    except PreprocessError as exc:
        raise CalibrationError(f"the preprocessing does not fit the model: {exc}") from exc


def calibration_from_frames(
    frames: Sequence[npt.NDArray[Any]] | npt.NDArray[Any],
    spec: PreprocessSpec,
    tensor: TensorSpec | Sequence[int | None],
    *,
    labels: npt.ArrayLike | None = None,
    description: str = "",
) -> CalibrationSet:
    """Preprocess source frames (uint8 BGR images, or float32 ``window x channels`` windows).

    ``tensor`` is the model input (or its shape); ``labels`` optional class ids per frame.
    """
    if len(frames) == 0:
        raise CalibrationError(
            "no calibration frames were given; give at least one frame (100-500 representative "
            "samples are typical)"
        )
    spec_f32 = float_input_spec(tensor)
    pre = _preprocessor(spec, spec_f32)
    out = np.empty((len(frames), *_sample_shape(spec_f32)), np.float32)
    buf = pre.new_buffer()
    for i, raw in enumerate(frames):
        frame = np.asarray(raw, np.float32) if isinstance(spec, TensorPreprocess) else raw
        try:
            pre(frame, buf)
        except PreprocessError as exc:
            raise CalibrationError(f"calibration frame {i} cannot be preprocessed: {exc}") from exc
        out[i] = buf[0]
    lab = None
    if labels is not None:
        lab = np.asarray(labels, np.int64).reshape(-1)
        if lab.shape[0] != len(frames):
            raise CalibrationError(
                f"{lab.shape[0]} labels for {len(frames)} frames; give one class id per frame"
            )
    _check_finite(out, description or "calibration frames")
    return CalibrationSet(out, lab, description or f"{len(frames)} frames")


def _check_finite(values: npt.NDArray[np.float32], what: str) -> None:
    if not np.all(np.isfinite(values)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise CalibrationError(
            f"{what}: {bad} values are NaN or infinite after preprocessing; remove the broken "
            "samples (or fix preprocess mean/std)"
        )


def _check_count(count: int | None) -> None:
    if count is not None and count < 1:
        raise CalibrationError(
            f"calibration count is {count}; give a positive number of samples (100-500 is typical) "
            "or leave it unset to use every sample"
        )


# --------------------------------------------------------------------------- image folders


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _select_order(groups: list[list[Path]], rng: np.random.Generator) -> list[Path]:
    """Shuffle each group, then interleave them (stratified: any prefix covers every group)."""
    shuffled = []
    for files in groups:
        order = list(files)
        rng.shuffle(order)
        shuffled.append(order)
    out: list[Path] = []
    depth = max((len(g) for g in shuffled), default=0)
    for i in range(depth):
        layer = [g[i] for g in shuffled if i < len(g)]
        rng.shuffle(layer)
        out.extend(layer)
    return out


def calibration_from_images(
    folder: Path,
    spec: ImagePreprocess,
    tensor: TensorSpec | Sequence[int | None],
    *,
    count: int | None = None,
    labels: Sequence[str] | None = None,
    seed: int = 0,
) -> CalibrationSet:
    """Read images from ``folder`` (flat, or ``<class>/`` subfolders) through the device preprocessing.

    With class subfolders and ``labels`` (the model's label list), each folder name must be one
    of the labels and becomes that label's index; without ``labels`` the images are used
    unlabelled. ``count`` images are picked by a seeded shuffle (stratified over classes);
    ``None`` uses all of them.
    """
    _check_count(count)
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise CalibrationError(
            f"calibration folder {str(folder)!r} {what}; give a folder of images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}) or of class subfolders holding them"
        )
    flat = _images_in(folder)
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_dirs = [(d, _images_in(d)) for d in subdirs]
    class_dirs = [(d, files) for d, files in class_dirs if files]
    if flat and class_dirs:
        raise CalibrationError(
            f"calibration folder {str(folder)!r} mixes {len(flat)} images with class subfolders "
            f"({', '.join(d.name for d, _ in class_dirs[:5])}); put every image in a class folder, "
            "or use a flat folder of images"
        )
    if not flat and not class_dirs:
        raise CalibrationError(
            f"calibration folder {str(folder)!r} holds no images; put {', '.join(sorted(IMAGE_SUFFIXES))} "
            "files in it (or in one subfolder per class, named like the labels)"
        )
    rng = np.random.default_rng(seed)
    label_of: dict[Path, int] = {}
    if class_dirs and labels is not None:
        index = {name: i for i, name in enumerate(labels)}
        unknown = [d.name for d, _ in class_dirs if d.name not in index]
        if unknown:
            raise CalibrationError(
                f"class folder(s) {unknown} in {str(folder)!r} are not among the model's labels "
                f"{list(labels)[:20]}; rename the folders to label names (or remove them)"
            )
        for d, files in class_dirs:
            label_of.update(dict.fromkeys(files, index[d.name]))
    groups = [files for _, files in class_dirs] if class_dirs else [flat]
    order = _select_order(groups, rng)
    want = len(order) if count is None else min(count, len(order))
    if count is not None and count > len(order):
        log.warning(
            "calibration: %d images asked for, %s holds only %d; using all", count, folder, len(order)
        )
    frames: list[npt.NDArray[np.uint8]] = []
    picked: list[Path] = []
    unreadable: list[str] = []
    for path in order:
        if len(frames) == want:
            break
        image = read_image(path)
        if image is None:
            unreadable.append(path.name)
            continue
        frames.append(image)
        picked.append(path)
    if unreadable:
        log.warning(
            "calibration: skipped %d unreadable images (%s)", len(unreadable), ", ".join(unreadable[:5])
        )
    if not frames:
        raise CalibrationError(
            f"none of the {len(order)} image files in {str(folder)!r} could be decoded "
            f"(e.g. {', '.join(unreadable[:3])}); check that they are valid images"
        )
    lab = np.asarray([label_of[p] for p in picked], np.int64) if label_of else None
    kind = f"{len(class_dirs)} class folders" if class_dirs else "flat folder"
    desc = (
        f"{len(frames)} images from {folder} ({kind}{', labelled' if lab is not None else ''}, seed {seed})"
    )
    return calibration_from_frames(frames, spec, tensor, labels=lab, description=desc)


# --------------------------------------------------------------------------- arrays


def _pick(n: int, count: int | None, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    idx = rng.permutation(n).astype(np.int64)
    return idx if count is None else idx[: min(count, n)]


def _key(data: Any, keys: Sequence[str]) -> str | None:
    return next((k for k in keys if k in data.files), None)


def calibration_from_arrays(
    path: Path,
    spec: PreprocessSpec,
    tensor: TensorSpec | Sequence[int | None],
    *,
    count: int | None = None,
    seed: int = 0,
) -> CalibrationSet:
    """Load ``.npy`` model inputs, or ``.npz`` with ``inputs``/``x`` (+ ``labels``/``y``) or ``frames``.

    ``inputs`` are model-logical float values of shape ``(N, *input_shape[1:])`` (or
    ``(N, 1, ...)``); ``frames`` are raw source frames that go through ``spec``.
    """
    _check_count(count)
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {str(path)!r} does not exist; give a .npy or .npz file")
    spec_f32 = float_input_spec(tensor)
    want = _sample_shape(spec_f32)
    rng = np.random.default_rng(seed)
    labels: npt.NDArray[Any] | None = None
    box_rows: npt.NDArray[Any] | None = None
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CalibrationError(
            f"cannot read {path.name}: {exc}; save plain numeric arrays with numpy.save/savez "
            "(object arrays are not accepted)"
        ) from exc
    if isinstance(data, np.ndarray):
        inputs: npt.NDArray[Any] | None = data
        frames = None
    else:
        with data:
            in_key = _key(data, _INPUT_KEYS)
            lab_key = _key(data, _LABEL_KEYS)
            inputs = data[in_key] if in_key else None
            frames = data["frames"] if "frames" in data.files else None
            labels = data[lab_key] if lab_key else None
            box_rows = data["boxes"] if "boxes" in data.files else None
            keys = list(data.files)
        if inputs is None and frames is None:
            raise CalibrationError(
                f"{path.name} holds {keys}; store model inputs under 'inputs' (or 'x') and optional "
                "class ids under 'labels' (or 'y'), or raw source frames under 'frames'"
            )
    n = len(inputs) if inputs is not None else len(frames)  # type: ignore[arg-type]
    if n == 0:
        raise CalibrationError(f"{path.name} holds 0 samples; give at least one (100-500 is typical)")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != n or not np.issubdtype(labels.dtype, np.integer):
            raise CalibrationError(
                f"{path.name}: 'labels' has shape {list(labels.shape)} and dtype {labels.dtype}; give one "
                f"integer class id per sample ({n})"
            )
    idx = _pick(n, count, rng)
    lab = None if labels is None else labels[idx].astype(np.int64)
    desc = f"{len(idx)} samples from {path.name} (seed {seed})"
    boxes = None if box_rows is None else _boxes_per_sample(box_rows, n, idx, path.name)
    if inputs is None:
        assert frames is not None
        made = calibration_from_frames(frames[idx], spec, spec_f32, labels=lab, description=desc)
        made.boxes = boxes
        return made
    arr = np.asarray(inputs)
    if arr.ndim == len(want) + 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if tuple(arr.shape[1:]) != want:
        raise CalibrationError(
            f"{path.name}: inputs have shape {list(arr.shape)} but the model input {spec_f32.name!r} "
            f"takes {list(want)} per sample; give (N, {', '.join(map(str, want))}) model inputs, or store "
            "raw source frames under 'frames' so they are resized/converted by the preprocessing"
        )
    if not np.issubdtype(arr.dtype, np.number):
        raise CalibrationError(f"{path.name}: inputs have dtype {arr.dtype}; give float32 model inputs")
    if arr.dtype == np.uint8 and isinstance(spec, ImagePreprocess) and spec.scale != 1.0:
        raise CalibrationError(
            f"{path.name}: 'inputs' are uint8 (raw pixels?) but the preprocessing scales pixels by "
            f"{spec.scale:g}; store them under 'frames' to have them preprocessed, or store float32 "
            "model inputs"
        )
    out = np.ascontiguousarray(arr[idx], dtype=np.float32)
    _check_finite(out, path.name)
    return CalibrationSet(out, lab, desc, boxes)


def _boxes_per_sample(
    rows: npt.NDArray[Any], n: int, idx: npt.NDArray[Any], name: str
) -> list[npt.NDArray[np.float64]]:
    """Detector ground truth: ``boxes`` rows ``sample, class, x1, y1, x2, y2`` -> per picked sample."""
    arr = np.asarray(rows)
    if arr.ndim != 2 or arr.shape[1] != 6 or not np.issubdtype(arr.dtype, np.number):
        raise CalibrationError(
            f"{name}: 'boxes' has shape {list(arr.shape)} and dtype {arr.dtype}; give numeric rows "
            "'sample, class, x1, y1, x2, y2' (model-input pixels), shape (M, 6)"
        )
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise CalibrationError(f"{name}: 'boxes' holds NaN or infinite values")
    sample = arr[:, 0]
    if len(arr) and (sample.min() < 0 or sample.max() >= n or not np.all(sample == np.round(sample))):
        raise CalibrationError(
            f"{name}: 'boxes' column 0 must be a sample index in 0..{n - 1}; "
            f"found {sample.min():g}..{sample.max():g}"
        )
    return [arr[sample == i][:, 1:] for i in np.asarray(idx)]


# --------------------------------------------------------------------------- sensor files


def calibration_from_sensor_file(
    path: Path,
    spec: TensorPreprocess,
    tensor: TensorSpec | Sequence[int | None],
    *,
    count: int | None = None,
    seed: int = 0,
    columns: Sequence[str] | None = None,
) -> CalibrationSet:
    """Windows from a ``.csv``/``.jsonl`` recording, read and windowed like the device does.

    The file is replayed by :class:`~edge_runtime.sources.ReplaySource` (bad lines are skipped
    and counted) and cut by :class:`~edge_runtime.sources.Windower` into ``spec.window``
    samples every ``spec.hop``. ``count`` windows are kept by seeded reservoir sampling.
    """
    from edge_runtime.sources import ReplaySource, SourceSpec, Windower, WindowSpec

    _check_count(count)
    path = Path(path)
    fmt: Literal["csv", "json"] | None = SENSOR_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise CalibrationError(
            f"{path.name}: sensor recordings must end in {', '.join(sorted(SENSOR_SUFFIXES))}"
        )
    source = ReplaySource(
        SourceSpec(kind="replay", uri=str(path), format=fmt, columns=list(columns) if columns else None)
    )
    windower = Windower(WindowSpec(size=spec.window, hop=spec.hop))
    rng = np.random.default_rng(seed)
    kept: list[npt.NDArray[np.float32]] = []
    seen = 0
    rows = 0
    try:
        source.open()
        while (frame := source.read()) is not None:
            rows += int(np.asarray(frame.data).reshape(-1, np.asarray(frame.data).shape[-1]).shape[0])
            for window in windower.push(frame):
                seen += 1
                if count is None or len(kept) < count:
                    kept.append(window.data)
                else:  # reservoir sampling keeps a uniform sample in bounded memory
                    j = int(rng.integers(seen))
                    if j < count:
                        kept[j] = window.data
    except SourceError as exc:
        raise CalibrationError(f"cannot read sensor recording {path.name}: {exc}") from exc
    finally:
        source.close()
    if not kept:
        raise CalibrationError(
            f"{path.name} gave no complete window of {spec.window} samples ({rows} good sample "
            "lines read); record a longer file or lower preprocess.window"
        )
    if windower.channels is not None and windower.channels != spec.channels:
        raise CalibrationError(
            f"{path.name} has {windower.channels} channels per sample but the preprocessing expects "
            f"{spec.channels}; select the model's columns (columns=[...]) or fix preprocess.channels"
        )
    order = rng.permutation(len(kept))
    desc = f"{len(kept)} of {seen} windows from {path.name} (window {spec.window}, hop {windower.hop})"
    return calibration_from_frames([kept[i] for i in order], spec, tensor, description=desc)


# --------------------------------------------------------------------------- dispatch and split


def load_calibration(
    source: Path,
    spec: PreprocessSpec,
    tensor: TensorSpec | Sequence[int | None],
    *,
    count: int | None = None,
    labels: Sequence[str] | None = None,
    seed: int = 0,
    columns: Sequence[str] | None = None,
) -> CalibrationSet:
    """Build a :class:`CalibrationSet` from a folder, ``.npy``/``.npz`` or ``.csv``/``.jsonl``."""
    source = Path(source)
    suffix = source.suffix.lower()
    if source.is_dir():
        if not isinstance(spec, ImagePreprocess):
            raise CalibrationError(
                f"{source} is an image folder but the model's preprocessing is for sensor windows; "
                "give a .csv/.jsonl recording or .npz of windows"
            )
        return calibration_from_images(source, spec, tensor, count=count, labels=labels, seed=seed)
    if suffix in _ARRAY_SUFFIXES:
        return calibration_from_arrays(source, spec, tensor, count=count, seed=seed)
    if suffix in SENSOR_SUFFIXES:
        if not isinstance(spec, TensorPreprocess):
            raise CalibrationError(
                f"{source.name} is a sensor recording but the model's preprocessing is for images; "
                "give an image folder or .npz"
            )
        return calibration_from_sensor_file(source, spec, tensor, count=count, seed=seed, columns=columns)
    if not source.exists():
        raise CalibrationError(
            f"calibration data {str(source)!r} does not exist; give an image folder, a .npy/.npz "
            "file or a .csv/.jsonl sensor recording"
        )
    raise CalibrationError(
        f"cannot use {source.name} as calibration data; give an image folder, a .npy/.npz file or "
        "a .csv/.jsonl sensor recording"
    )


def split_calibration(
    data: CalibrationSet, eval_fraction: float = 0.5, seed: int = 0
) -> tuple[CalibrationSet, CalibrationSet]:
    """Split into disjoint (calibration, evaluation) sets, shuffled with ``seed``."""
    if not 0.0 < eval_fraction < 1.0:
        raise CalibrationError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    n = len(data)
    n_eval = round(n * eval_fraction)
    if n < 2 or n_eval in (0, n):
        raise CalibrationError(
            f"cannot split {n} samples into calibration and evaluation sets; give more samples "
            "(or a separate evaluation set)"
        )
    idx = np.random.default_rng(seed).permutation(n)
    parts = []
    for name, sel in (("calibration", idx[n_eval:]), ("evaluation", idx[:n_eval])):
        lab = None if data.labels is None else data.labels[sel]
        boxes = None if data.boxes is None else [data.boxes[i] for i in sel]
        parts.append(
            CalibrationSet(data.inputs[sel], lab, f"{name} split ({len(sel)}) of {data.description}", boxes)
        )
    return parts[0], parts[1]
