"""Tests for converters.calibration: real images, arrays and sensor recordings through the
device's own preprocessing (no TensorFlow)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from converters.calibration import (
    calibration_from_arrays,
    calibration_from_frames,
    calibration_from_images,
    calibration_from_sensor_file,
    float_input_spec,
    load_calibration,
    model_input_spec,
    split_calibration,
)
from edge_runtime.errors import CalibrationError
from edge_runtime.preprocess_spec import ImagePreprocess, TensorPreprocess
from edge_runtime.types import TensorSpec
from models.shapes import data as shapes_data

DEMO_ONNX = Path(__file__).resolve().parent.parent / "models" / "demo" / "shapes" / "model.onnx"
SHAPES_SPEC = ImagePreprocess(
    resize="stretch", interpolation="area", color="rgb", layout="nhwc", scale=1 / 255
)
SHAPE = (1, 64, 64, 3)


def _write_images(folder: Path, n: int, seed: int, label: int | None = None) -> list[np.ndarray]:
    """PNG files of shapes drawn on canvases of random sizes; returns the decoded BGR frames."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        lab = int(rng.integers(len(shapes_data.CLASSES))) if label is None else label
        frame = shapes_data.render_sample(lab, rng)
        cv2.imwrite(str(folder / f"img{i}.png"), frame)
        frames.append(frame)
    return frames


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    for k, name in enumerate(shapes_data.CLASSES):
        _write_images(root / name, 4, seed=100 + k, label=k)
    return root


def test_images_use_the_device_preprocessing(tmp_path: Path) -> None:
    frames = _write_images(tmp_path, 6, seed=1)
    data = calibration_from_images(tmp_path, SHAPES_SPEC, SHAPE)
    assert data.inputs.shape == (6, 64, 64, 3)
    assert data.inputs.dtype == np.float32
    assert data.labels is None
    # The shapes recipe's own preprocessing mirrors the bundle spec: same values.
    expected = {shapes_data.preprocess(f).tobytes() for f in frames}
    for sample in data.inputs:
        ref = min(expected, key=lambda e: np.abs(np.frombuffer(e, np.float32) - sample.ravel()).max())
        assert np.abs(np.frombuffer(ref, np.float32) - sample.ravel()).max() < 1e-6
    assert data.inputs.min() >= 0.0 and data.inputs.max() <= 1.0


def test_count_and_seed_pick_a_reproducible_subset(tmp_path: Path) -> None:
    _write_images(tmp_path, 10, seed=2)
    a = calibration_from_images(tmp_path, SHAPES_SPEC, SHAPE, count=4, seed=7)
    b = calibration_from_images(tmp_path, SHAPES_SPEC, SHAPE, count=4, seed=7)
    c = calibration_from_images(tmp_path, SHAPES_SPEC, SHAPE, count=4, seed=8)
    assert len(a) == 4
    np.testing.assert_array_equal(a.inputs, b.inputs)
    assert not np.array_equal(a.inputs, c.inputs)
    assert len(calibration_from_images(tmp_path, SHAPES_SPEC, SHAPE, count=50)) == 10


def test_labelled_folders_map_names_to_label_ids_stratified(class_folder: Path) -> None:
    data = calibration_from_images(
        class_folder, SHAPES_SPEC, SHAPE, count=5, labels=list(shapes_data.CLASSES), seed=3
    )
    assert data.labels is not None
    assert sorted(data.labels.tolist()) == [0, 1, 2, 3, 4]  # one of each class in any 5
    full = calibration_from_images(class_folder, SHAPES_SPEC, SHAPE, labels=list(shapes_data.CLASSES))
    assert len(full) == 20
    assert np.bincount(full.labels).tolist() == [4] * 5  # type: ignore[arg-type]
    unlabelled = calibration_from_images(class_folder, SHAPES_SPEC, SHAPE, count=3)
    assert unlabelled.labels is None and len(unlabelled) == 3


def test_label_folder_not_in_labels(class_folder: Path) -> None:
    with pytest.raises(CalibrationError, match=r"\['star'\].*not among the model's labels.*rename"):
        calibration_from_images(
            class_folder, SHAPES_SPEC, SHAPE, labels=["circle", "square", "triangle", "cross"]
        )


def test_empty_missing_and_mixed_folders(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(CalibrationError, match=r"holds no images; put .*\.jpg"):
        calibration_from_images(empty, SHAPES_SPEC, SHAPE)
    with pytest.raises(CalibrationError, match="does not exist"):
        calibration_from_images(tmp_path / "nope", SHAPES_SPEC, SHAPE)
    mixed = tmp_path / "mixed"
    _write_images(mixed, 1, seed=4)
    _write_images(mixed / "circle", 1, seed=5)
    with pytest.raises(CalibrationError, match="mixes 1 images with class subfolders"):
        calibration_from_images(mixed, SHAPES_SPEC, SHAPE)


def test_no_readable_image(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(CalibrationError, match=r"none of the 2 image files .* could be decoded"):
        calibration_from_images(tmp_path, SHAPES_SPEC, SHAPE)


def test_unreadable_images_are_skipped(tmp_path: Path) -> None:
    _write_images(tmp_path, 3, seed=6)
    (tmp_path / "broken.jpg").write_bytes(b"garbage")
    assert len(calibration_from_images(tmp_path, SHAPES_SPEC, SHAPE)) == 3


@pytest.mark.parametrize("count", [0, -3])
def test_count_must_be_positive(tmp_path: Path, count: int) -> None:
    _write_images(tmp_path, 2, seed=7)
    with pytest.raises(CalibrationError, match=f"count is {count}; give a positive number"):
        calibration_from_images(tmp_path, SHAPES_SPEC, SHAPE, count=count)


def test_preprocessing_that_does_not_fit_the_model(tmp_path: Path) -> None:
    _write_images(tmp_path, 2, seed=8)
    with pytest.raises(CalibrationError, match=r"does not fit the model.*3 channels.*'gray'"):
        calibration_from_images(tmp_path, ImagePreprocess(color="gray"), SHAPE)
    with pytest.raises(CalibrationError, match="dynamic shape"):
        calibration_from_images(tmp_path, SHAPES_SPEC, (1, None, None, 3))


def test_npz_inputs_labels_and_wrong_channels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (12, 64, 64, 3)).astype(np.float32)
    y = np.arange(12) % 5
    np.savez(tmp_path / "eval.npz", inputs=x, labels=y)
    data = calibration_from_arrays(tmp_path / "eval.npz", SHAPES_SPEC, SHAPE, count=5, seed=1)
    assert data.inputs.shape == (5, 64, 64, 3) and data.labels is not None
    for sample, label in zip(data.inputs, data.labels, strict=True):
        i = int(np.flatnonzero((x == sample).all(axis=(1, 2, 3)))[0])
        assert y[i] == label
    np.save(tmp_path / "batched.npy", x[:, None])  # (N, 1, H, W, C) is accepted too
    assert len(calibration_from_arrays(tmp_path / "batched.npy", SHAPES_SPEC, SHAPE)) == 12
    np.save(tmp_path / "gray.npy", x[..., :1])
    with pytest.raises(CalibrationError, match=r"shape \[12, 64, 64, 1\].*takes \[64, 64, 3\].*'frames'"):
        calibration_from_arrays(tmp_path / "gray.npy", SHAPES_SPEC, SHAPE)
    np.savez(tmp_path / "keys.npz", images=x)
    with pytest.raises(CalibrationError, match=r"holds \['images'\]; store model inputs under 'inputs'"):
        calibration_from_arrays(tmp_path / "keys.npz", SHAPES_SPEC, SHAPE)
    np.save(tmp_path / "pixels.npy", (x * 255).astype(np.uint8))
    with pytest.raises(CalibrationError, match=r"uint8 .*raw pixels.*'frames'"):
        calibration_from_arrays(tmp_path / "pixels.npy", SHAPES_SPEC, SHAPE)
    np.savez(tmp_path / "badlabels.npz", x=x, y=np.zeros(3))
    with pytest.raises(CalibrationError, match="one integer class id per sample"):
        calibration_from_arrays(tmp_path / "badlabels.npz", SHAPES_SPEC, SHAPE)


def test_npz_frames_are_preprocessed(tmp_path: Path) -> None:
    images, labels = shapes_data.make_dataset(6, seed=11)
    big = np.stack([cv2.resize(i, (96, 96), interpolation=cv2.INTER_AREA) for i in images])
    np.savez(tmp_path / "frames.npz", frames=big, y=labels)
    data = load_calibration(tmp_path / "frames.npz", SHAPES_SPEC, SHAPE)
    assert data.inputs.shape == (6, 64, 64, 3) and data.labels is not None
    direct = calibration_from_frames(big, SHAPES_SPEC, SHAPE, labels=labels)
    order = [int(np.flatnonzero((direct.inputs == s).all(axis=(1, 2, 3)))[0]) for s in data.inputs]
    assert sorted(order) == list(range(6))
    np.testing.assert_array_equal(direct.labels[order], data.labels)  # type: ignore[index]


def _write_csv(path: Path, rows: np.ndarray, header: str = "ax,ay,az") -> None:
    lines = [header] + [",".join(f"{v:.6f}" for v in r) for r in rows]
    lines.insert(10, "garbage,line,here,x")  # skipped like on the device
    path.write_text("\n".join(lines) + "\n")


def test_sensor_csv_windows_like_the_device(tmp_path: Path) -> None:
    rows = np.random.default_rng(3).standard_normal((100, 3)).astype(np.float32) * 2 + 1
    _write_csv(tmp_path / "rec.csv", rows)
    spec = TensorPreprocess(window=32, hop=16, channels=3, mean=(1.0,), std=(2.0,))
    data = calibration_from_sensor_file(tmp_path / "rec.csv", spec, (1, 32, 3))
    assert len(data) == 1 + (100 - 32) // 16
    expected = {i * 16: (rows[i * 16 : i * 16 + 32] - 1.0) / 2.0 for i in range(len(data))}
    for sample in data.inputs:
        assert any(np.allclose(sample, e, atol=1e-5) for e in expected.values())
    few = calibration_from_sensor_file(tmp_path / "rec.csv", spec, (1, 32, 3), count=2, seed=1)
    assert len(few) == 2
    jsonl = tmp_path / "rec.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"ax": float(a), "ay": float(b), "az": float(c)}) for a, b, c in rows)
    )
    assert len(load_calibration(jsonl, spec, (1, 32, 3))) == len(data)


def test_sensor_errors(tmp_path: Path) -> None:
    rows = np.zeros((20, 3), np.float32)
    _write_csv(tmp_path / "short.csv", rows)
    spec = TensorPreprocess(window=32, channels=3)
    with pytest.raises(CalibrationError, match=r"no complete window of 32 samples \(20 good sample lines"):
        calibration_from_sensor_file(tmp_path / "short.csv", spec, (1, 32, 3))
    _write_csv(tmp_path / "two.csv", np.zeros((64, 2), np.float32), header="ax,ay")
    with pytest.raises(CalibrationError, match="2 channels per sample but the preprocessing expects 3"):
        calibration_from_sensor_file(tmp_path / "two.csv", spec, (1, 32, 3))
    with pytest.raises(
        CalibrationError, match="sensor recording but the model's preprocessing is for images"
    ):
        load_calibration(tmp_path / "two.csv", SHAPES_SPEC, SHAPE)
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(tmp_path / "missing.bin", SHAPES_SPEC, SHAPE)


def test_split_model_input_and_float_spec(tmp_path: Path) -> None:
    spec = model_input_spec(DEMO_ONNX)
    assert spec.name == "image" and spec.shape == SHAPE
    assert float_input_spec(TensorSpec("q", (None, 8), "int8", 0.1, 3)) == TensorSpec("q", (1, 8), "float32")
    x = np.arange(20, dtype=np.float32).reshape(10, 1, 2)
    calib, evaluation = split_calibration(
        calibration_from_frames(
            x, TensorPreprocess(window=1, channels=2, layout="flat"), (1, 2), labels=np.arange(10)
        ),
        eval_fraction=0.3,
    )
    assert len(calib) == 7 and len(evaluation) == 3
    assert set(calib.labels.tolist()).isdisjoint(evaluation.labels.tolist())  # type: ignore[union-attr]
    with pytest.raises(CalibrationError, match="between 0 and 1"):
        split_calibration(calib, eval_fraction=1.0)
